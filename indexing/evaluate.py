"""Recall of an ANN index against exact search, the nprobe sweep, and the default nprobe.

recall@k (contracts.recall) here is faiss's "1-recall@k": the share of queries whose
exact nearest neighbour is among the first k results (for held-out catalog vectors the
vector itself is excluded from both lists). The target is stated on recall@10.

The default nprobe is the smallest that reaches the target, unless that costs a large
share of the queries/s for a small gain: doubling nprobe roughly halves the queries/s,
so a doubling must add at least PAYS recall@10 to be taken, and above nlist/16 only a
sweep whose every doubling paid may go. The reason is recorded with the choice.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from mimdex.infra.contracts.recall import KS, recall_at

PAYS = 0.01          # recall@10 a doubling of nprobe must add
FLAT_STEPS = 2       # the sweep stops after this many doublings in a row that did not pay
Ladder = Callable[[np.ndarray, list, list], dict]   # (queries, ks, nprobes) -> {(k, nprobe): (ids, seconds)}


def choose_nprobe(rows: list[dict], nlist: int, target: float) -> tuple[int, str]:
    """(default nprobe, why) from sweep rows in doubling order. Pure: tested on made-up sweeps."""
    cap = max(1, nlist // 16)
    knee = rows[0]
    for prev, row in zip(rows, rows[1:]):
        if row["recall@10"] - prev["recall@10"] < PAYS:
            break
        knee = row
    hit = next((r for r in rows if r["recall@10"] >= target), None)
    if hit is not None and hit["nprobe"] <= cap:
        return hit["nprobe"], f"the smallest nprobe whose recall@10 reaches the target {target}"
    if hit is not None and hit["nprobe"] <= knee["nprobe"]:
        return hit["nprobe"], (f"the smallest nprobe whose recall@10 reaches the target {target}; above nlist/16 = "
                               f"{cap} because every doubling up to it added >= {PAYS} recall@10")
    best = max(rows, key=lambda r: (r["recall@10"], -r["nprobe"]))
    why = (f"the target {target} needs nprobe {hit['nprobe']}" if hit is not None else
           f"recall@10 does not reach the target {target} (best {best['recall@10']} at nprobe {best['nprobe']})")
    return knee["nprobe"], (f"{why}; nprobe {knee['nprobe']} is the last whose doubling added >= {PAYS} "
                            f"recall@10 (recall@10 {knee['recall@10']}, {knee['qps']} queries/s)")


def one_at_a_time(search: Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]) -> Ladder:
    """A Ladder from ``search(queries, k, nprobe) -> (scores, ids)`` (a loaded IndexReader's)."""
    def ladder(queries: np.ndarray, ks: list[int], nprobes: list[int]) -> dict:
        out = {}
        for p in nprobes:
            for k in ks:
                t0 = time.perf_counter()
                _, ids = search(queries, k, p)
                out[(k, p)] = (ids, time.perf_counter() - t0)
        return out
    return ladder


def sweep(search: Ladder, queries: np.ndarray, truth_nn: np.ndarray, nlist: int, target: float,
          exclude_ids: np.ndarray | None = None, ladder: int = 1) -> tuple[list[dict], int, str]:
    """``search(queries, ks, nprobes) -> {(k, nprobe): (ids, seconds)}`` for every pair,
    asked for ``ladder`` doublings of nprobe at a time (shard_search reads every shard once
    per call; a sweep that stops inside a ladder wastes the rest of it). Returns the rows
    of the sweep, the default nprobe and why (choose_nprobe)."""
    rows: list[dict] = []
    nprobe, flat, reached, found = 1, 0, None, {}
    # recall@k from a search for k (+1: a held-out query's own id is dropped), as a caller
    # asking for k gets it: a re-ranking index fetches k x k_factor candidates, so a
    # search for 100 would overstate recall@10. queries/s: the top-10 search.
    ks = [k + 1 for k in sorted(KS, reverse=True)]
    while nprobe <= nlist:
        if (ks[0], nprobe) not in found:
            found = search(queries, ks, [nprobe << i for i in range(ladder) if nprobe << i <= nlist])
        row: dict = {"nprobe": nprobe}
        for k in KS:
            if (k + 1, nprobe) not in found:   # kept lists too short for it (indexing.candidates.kept_k)
                row[f"recall@{k}"] = None
                continue
            ids, seconds = found[(k + 1, nprobe)]
            if exclude_ids is not None:  # drop the query's own id, keep the order
                ids = np.array([[i for i in r if i != own][:k] for r, own in zip(ids, exclude_ids)])
            row.update(recall_at(ids, truth_nn, (k,)))
            if k == 10:
                row["qps"] = round(len(queries) / seconds, 1)
        row = {"nprobe": nprobe, **{f"recall@{k}": row[f"recall@{k}"] for k in KS}, "qps": row["qps"]}
        flat = flat + 1 if rows and row["recall@10"] - rows[-1]["recall@10"] < PAYS else 0
        rows.append(row)
        if reached is None and row["recall@10"] >= target:
            reached = nprobe
        if row["recall@10"] >= 0.999 or (reached and nprobe >= 4 * reached) or flat >= FLAT_STEPS:
            break
        nprobe *= 2
    chosen, why = choose_nprobe(rows, nlist, target)
    return rows, chosen, why


def held_out_at(evaluation: dict, nprobe: int | None) -> dict:
    """The held-out sweep row (recall@k, qps) at ``nprobe``; {} when there is none."""
    return next((r for r in evaluation.get("held_out", {}).get("sweep", []) if r["nprobe"] == nprobe), {})
