"""Search a version with one shard in memory at a time: the evaluation of a build.

A consolidated reader holds the whole index: at 10M x SQ8 that is 2.7 GB of codes and ids
in the launcher, which made evaluation the build's peak (docs/benchmarks.md). All shards
share one trained quantizer, so a query probes the same lists in every shard: each shard
is searched with one coarse assignment (``search_preassigned``) and the shards' candidates
merged by distance, ties by id, which is what the consolidated IndexReader returns. With
re-ranking codes, each candidate's refined distance is computed while its shard is held
and the merged k x k_factor candidates are ordered by it, as IndexReader.search does.

Shards are read once per call, for a ladder of nprobes: the sweep asks for two at a time.
"""
from __future__ import annotations

import time

import faiss
import numpy as np

from mimdex.indexing.reader import ShardLoader, set_nprobe
from mimdex.indexing.rerank import refined_distances, top_k
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.index_codec import deserialize, one_omp_thread, searched
from mimdex.infra.contracts.vectors import ids_for

Found = dict[tuple[int, int], tuple[np.ndarray, float]]   # (k, nprobe) -> (ids, seconds)


class ShardSearch:
    # nprobes the sweep asks for at once: every call reads all shards once; a sweep that
    # stops at the first of two wastes one search
    LADDER = 2

    def __init__(self, loader: ShardLoader, shards: tuple[iv.ShardEntry, ...]):
        self.loader, self.shards = loader, tuple(shards)
        self._index = searched(deserialize(loader.trained))   # the empty trained index: its quantizer

    def search_ladder(self, queries: np.ndarray, ks: list[int], nprobes: list[int]) -> Found:
        """The ids every (k, nprobe) search returns, and its seconds: the coarse assignment,
        each shard's scan, the merge and re-ranking (not the shards' loading)."""
        x = np.ascontiguousarray(queries, dtype=np.float32)
        xt = _transformed(self._index, x)
        seconds = {(k, p): 0.0 for k in ks for p in nprobes}
        coarse = {}
        for p in nprobes:
            t0 = time.perf_counter()
            set_nprobe(self._index, p)
            coarse[p] = faiss.extract_index_ivf(self._index).quantizer.search(xt, p)
            for k in ks:
                seconds[(k, p)] += time.perf_counter() - t0
        parts: dict[tuple[int, int], list] = {key: [] for key in seconds}
        for entry in self.shards:
            shard, idmap = self.loader.load(entry)
            ivf = faiss.extract_index_ivf(shard)
            refine = self._refine_of(idmap)
            for p in nprobes:
                ivf.nprobe = p
                cdist, assign = coarse[p]
                for k in ks:
                    t0 = time.perf_counter()
                    dist, ids = ivf.search_preassigned(xt, k * self.loader.k_factor, assign, cdist)
                    extra = (refine(x, ids),) if refine else ()
                    parts[(k, p)].append((dist, ids, *extra))
                    seconds[(k, p)] += time.perf_counter() - t0
            del shard, idmap, ivf, refine   # before the next shard is read
        out: Found = {}
        for (k, p), got in parts.items():
            t0 = time.perf_counter()
            dist, ids, *refined = (np.concatenate(column, 1) for column in zip(*got))
            merged = top_k(dist, ids, k * self.loader.k_factor, *refined)
            if self.loader.refine is not None:   # the merged candidates, ordered by their refined distance
                merged = top_k(merged[2], merged[1], k)
            out[(k, p)] = (merged[1], seconds[(k, p)] + time.perf_counter() - t0)
        return out

    def candidates(self, queries: np.ndarray, nprobes: list[int], n: int, pieces=None) -> dict[int, tuple]:
        """What indexing.candidates keeps: for each nprobe, each query's ``n`` candidates
        nearest by code distance over every shard (ties by id), as (code distances, ids,
        product keys, re-ranking distances or None, seconds). ``pieces``: (index, id map)
        pairs to search instead of the version's shards (a refresh's delta alone). The
        coarse assignment runs on one thread: the same lists on every machine."""
        x = np.ascontiguousarray(queries, dtype=np.float32)
        xt = _transformed(self._index, x)
        coarse, seconds = {}, dict.fromkeys(nprobes, 0.0)
        for p in nprobes:
            t0 = time.perf_counter()
            set_nprobe(self._index, p)
            with one_omp_thread():
                coarse[p] = faiss.extract_index_ivf(self._index).quantizer.search(xt, p)
            seconds[p] += time.perf_counter() - t0
        got: dict[int, list] = {p: [] for p in nprobes}
        for index, idmap in (pieces if pieces is not None else map(self.loader.load, self.shards)):
            ivf, rows_of = faiss.extract_index_ivf(index), _rows_of(idmap)
            refine = self._refine_of(idmap, rows_of)
            keys = _product_keys(idmap)
            for p in nprobes:
                t0 = time.perf_counter()
                ivf.nprobe = p
                dist, ids = ivf.search_preassigned(xt, n, *coarse[p][::-1])
                found = np.where(ids >= 0, keys[rows_of(np.maximum(ids, 0))] if len(keys) else -1, -1)
                got[p].append((dist, ids, found, *((refine(x, ids),) if refine else ())))
                seconds[p] += time.perf_counter() - t0
            del index, idmap, ivf, refine
        out = {}
        for p, parts in got.items():
            dist, ids, *rest = (np.concatenate(column, 1) for column in zip(*parts))
            dist, ids, keys, *refined = top_k(dist, ids, n, *rest)
            out[p] = (dist, ids, np.where(ids >= 0, keys, -1), refined[0] if refined else None, seconds[p])
        return out

    def _refine_of(self, idmap, rows_of=None):
        """refined_distances against this shard's re-ranking codes, or None."""
        if self.loader.refine is None:
            return None
        codes = iv.refine_codes(idmap, self.loader.refine.sa_code_size())
        rows_of = rows_of or _rows_of(idmap)
        return lambda x, found: refined_distances(x, found, rows_of, codes, self.loader.refine.sa_decode)


def _rows_of(idmap):
    """found ids -> their rows in ``idmap``."""
    ids = idmap.column("id").to_numpy()
    order = np.argsort(ids, kind="stable")
    return lambda found: order[np.searchsorted(ids, found, sorter=order)]


def _product_keys(idmap) -> np.ndarray:
    """Each row's product key: the id itself for one vector per product (contracts.vectors)."""
    if "photo" not in idmap.column_names:
        return idmap.column("id").to_numpy()
    return ids_for(idmap.column("product_id").to_pylist())


def _transformed(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """The queries as the IVF sees them: an OPQ index rotates them first."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    return x
