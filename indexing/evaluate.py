"""Recall of an ANN index against exact search, and the nprobe sweep.

recall@k (contracts.recall) here is faiss's "1-recall@k": the share of queries whose
exact nearest neighbour is among the first k results (for held-out catalog vectors the
vector itself is excluded from both lists).
"""
from __future__ import annotations

import time

import numpy as np

from mimdex.infra.contracts.recall import KS, recall_at


def sweep(search, queries: np.ndarray, truth_nn: np.ndarray, nlist: int, target: float,
          exclude_ids: np.ndarray | None = None) -> tuple[list[dict], int]:
    """``search(queries, k, nprobe) -> (scores, ids)``; returns the rows of the sweep and
    the smallest nprobe whose recall@10 reaches ``target`` (else the best one tried)."""
    rows, chosen = [], None
    nprobe = 1
    while nprobe <= nlist:
        t0 = time.perf_counter()
        _, ids = search(queries, max(KS) + 1, nprobe)
        seconds = time.perf_counter() - t0
        if exclude_ids is not None:  # drop the query's own id, keep the order
            ids = np.array([[i for i in row if i != own][: max(KS)] for row, own in zip(ids, exclude_ids)])
        row = {"nprobe": nprobe, **recall_at(ids, truth_nn), "qps": round(len(queries) / seconds, 1)}
        rows.append(row)
        if chosen is None and row["recall@10"] >= target:
            chosen = nprobe
        if row["recall@10"] >= 0.999 or (chosen and nprobe >= 4 * chosen):
            break
        nprobe *= 2
    if chosen is None:
        chosen = max(rows, key=lambda r: (r["recall@10"], -r["nprobe"]))["nprobe"]
    return rows, chosen


def held_out_at(evaluation: dict, nprobe: int | None) -> dict:
    """The held-out sweep row (recall@k, qps) at ``nprobe``; {} when there is none."""
    return next((r for r in evaluation.get("held_out", {}).get("sweep", []) if r["nprobe"] == nprobe), {})
