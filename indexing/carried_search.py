"""The sweep of a refreshed version from the previous version's kept search lists
(indexing.candidates), not from its loaded index.

    kept lists --update(removed products, the delta searched alone)--> lists of this version
    rows the lists cannot answer (a new query, a list the change cut below what a search
    needs, an nprobe the parent did not sweep) --one pass over the version's shards--> lists
    lists --answer(k, k_factor)--> the Ladder evaluate.sweep runs on

Queries/s are not measured on lists: a row carries the queries/s of the version whose
index last measured it (the report says which).
"""
from __future__ import annotations

import hashlib

import numpy as np

from mimdex.indexing import candidates as cand
from mimdex.indexing.shard_search import ShardSearch
from mimdex.infra.contracts.search_lists import Lists


def _key(queries: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(queries, np.float32).tobytes()).hexdigest()


class CarriedSearch:
    """Every query set's lists at the nprobes of ``grid``, carried or searched again."""

    def __init__(self, search: ShardSearch, sets: dict[str, tuple[np.ndarray, np.ndarray]],
                 kept: dict[str, Lists], removed_keys: np.ndarray, delta_piece, grid: list[int],
                 qps: dict[tuple[str, int], float]):
        """``sets``: name -> (query vectors, query keys); ``kept``: the parent's lists;
        ``delta_piece``: the delta's (index, id map with re-ranking codes), None without
        vectors; ``qps``: (set, nprobe) -> the queries/s the parent's sweep recorded."""
        self.search, self.sets, self.qps = search, sets, dict(qps)
        self.k_factor = search.loader.k_factor
        self.c, self.k = cand.capacity(self.k_factor), cand.kept_k(self.k_factor)
        self.by_vectors = {_key(q): name for name, (q, _) in sets.items()}
        self.lists: dict[str, Lists] = {}
        self.searched_again = 0
        for name, (queries, qkeys) in sets.items():
            rows = kept.get(name)
            if rows is not None and rows.ids.shape[1] == self.c:   # (another k_factor: searched again)
                rows = rows.take(np.flatnonzero(np.isin(rows.query, qkeys) & np.isin(rows.nprobe, grid)))
                added = self._delta(queries, qkeys, rows, delta_piece) if delta_piece is not None else None
                self.lists[name] = cand.update(rows, removed_keys, added)
        self._fill(grid)

    def _delta(self, queries: np.ndarray, qkeys: np.ndarray, rows: Lists, piece) -> Lists:
        """Each kept row's C + 1 nearest among the delta's vectors alone, at its nprobe."""
        pos = {q: i for i, q in enumerate(qkeys.tolist())}
        at = np.array([pos[q] for q in rows.query.tolist()], np.int64)
        found = self.search.candidates(queries, sorted(set(rows.nprobe.tolist())), self.c + 1, pieces=[piece])
        out = [np.zeros((len(at), self.c + 1), dt) for dt in (np.float32, np.int64, np.int64, np.float32)]
        for p, (dist, ids, keys, refined, _) in found.items():
            sel = np.flatnonzero(rows.nprobe == p)
            for col, got in zip(out, (dist, ids, keys, refined)):
                if got is not None:
                    col[sel] = got[at[sel]]
        return Lists(rows.query, rows.nprobe, out[1], out[2], out[0],
                     out[3] if rows.refined is not None else None, rows.bound)

    def _fill(self, nprobes: list[int], timed: bool = False) -> None:
        """Search again, in one pass over the shards, every (query, nprobe) of ``nprobes``
        whose row is missing or cannot answer the largest kept search (and, ``timed``: every
        query of an nprobe whose queries/s no version measured: the sweep reports it)."""
        want: dict[str, list[tuple[int, np.ndarray]]] = {}
        for name, (_, qkeys) in self.sets.items():
            rows = self.lists.get(name)
            for p in nprobes:
                have = np.zeros(len(qkeys), bool)
                if rows is not None and (not timed or (name, p) in self.qps):
                    mine = rows.take(np.flatnonzero(rows.nprobe == p))
                    _, known = cand.answer(mine, self.k + 1, self.k_factor)
                    have = np.isin(qkeys, mine.query[known])
                if not have.all():
                    want.setdefault(name, []).append((p, np.flatnonzero(~have)))
        if not want:
            return
        names = list(want)
        stacked = np.concatenate([self.sets[n][0] for n in names])
        starts = dict(zip(names, np.cumsum([0] + [len(self.sets[n][0]) for n in names])))
        found = self.search.candidates(stacked, sorted({p for n in names for p, _ in want[n]}), self.c + 1)
        for name in names:
            qkeys, fresh = self.sets[name][1], []
            for p, todo in want[name]:
                dist, ids, keys, refined, seconds = found[p]
                sel = starts[name] + todo
                fresh.append(cand.from_search(qkeys[todo], p, dist[sel], ids[sel], keys[sel],
                                              None if refined is None else refined[sel], self.c))
                self.qps.setdefault((name, p), round(len(stacked) / max(seconds, 1e-9), 1))
                self.searched_again += len(todo)
            old = self.lists.get(name)
            if old is not None:
                stale = np.zeros(len(old.query), bool)
                for f in fresh:
                    stale |= (old.nprobe == f.nprobe[0]) & np.isin(old.query, f.query)
                fresh.insert(0, old.take(np.flatnonzero(~stale)))
            self.lists[name] = Lists.concat(fresh)

    def ladder(self, queries: np.ndarray, ks: list[int], nprobes: list[int]) -> dict:
        """evaluate.Ladder: searches for k above the kept one are left out (recall@k null)."""
        name = self.by_vectors[_key(queries)]
        self._fill(nprobes, timed=True)
        qkeys, rows, out = self.sets[name][1], self.lists[name], {}
        for p in nprobes:
            mine = rows.take(np.flatnonzero(rows.nprobe == p))
            order = np.argsort(mine.query)
            mine = mine.take(order[np.searchsorted(mine.query[order], qkeys)])   # in the queries' order
            for k in ks:
                if k <= self.k + 1:
                    ids, known = cand.answer(mine, k, self.k_factor)
                    assert known.all(), "_fill leaves every row able to answer"
                    out[(k, p)] = (ids, len(queries) / self.qps[(name, p)])
        return out

    def report(self) -> dict:
        rows = sum(len(r.query) for r in self.lists.values())
        return {"lists": rows, "carried": rows - self.searched_again, "searched_again": self.searched_again,
                "candidates_per_list": self.c, "largest_k": self.k}

    def describe(self, parent: str | None) -> str:
        r = self.report()
        return (f"the search lists of {parent} carried through the change ({r['carried']} of {r['lists']}; "
                f"{r['searched_again']} searched again on this version's shards); queries/s as last measured "
                "on a loaded index")


def grid_of(evaluation: dict, name: str, nlist: int) -> list[int]:
    """The nprobes to keep lists at: the parent's sweep of the set (the held-out one for a
    new set), and one doubling past it (a sweep that needs one more step next night)."""
    rows = (evaluation.get(name) or evaluation.get("held_out") or {}).get("sweep") or [{"nprobe": 1}]
    ps = sorted({r["nprobe"] for r in rows})
    return [p for p in ps + [ps[-1] * 2] if p <= nlist]

