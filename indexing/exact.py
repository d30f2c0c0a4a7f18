"""Exact top-k by blockwise brute force: the ground truth every recall is measured against.

Database blocks stream through; a running top-k per query is merged with each block's,
so memory is O(queries x k + block), never the whole catalog.
"""
from __future__ import annotations

from typing import Iterable

import faiss
import numpy as np

BLOCK_ROWS = 65536   # rows converted to fp32 at a time (faiss.knn blocks its distances itself)


def merge_nearest(dists: list[np.ndarray], ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the nearest of several partial top-1 results (the same as one pass over
    all their blocks): the smallest distance, ties to the smaller id; -1 where none found."""
    d, i = np.stack(dists, 1), np.stack(ids, 1)
    d = np.where(i >= 0, d, np.inf)
    best = np.lexsort((i, d), axis=1)[:, 0]
    rows = np.arange(len(d))
    return d[rows, best], i[rows, best]


class ExactTopK:
    """A running exact top-k of some queries over database blocks (faiss.knn: its blocked
    GEMM runs at the machine's flop rate, and a worker that needs only this imports no torch)."""

    def __init__(self, queries: np.ndarray, k: int, exclude_ids: np.ndarray | None = None):
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.exclude = None if exclude_ids is None else np.asarray(exclude_ids, np.int64)
        self.dist = np.full((len(queries), k), np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)
        self.keys = np.full((len(queries), k), -1, np.int64)  # the neighbours' product keys, where given

    def add(self, vectors: np.ndarray, ids: np.ndarray, keys: np.ndarray | None = None) -> None:
        for a in range(0, len(vectors), BLOCK_ROWS):  # fp32 copies of a block, never of the part
            self._add(vectors[a:a + BLOCK_ROWS], ids[a:a + BLOCK_ROWS],
                      None if keys is None else keys[a:a + BLOCK_ROWS])

    def _add(self, vectors: np.ndarray, ids: np.ndarray, keys: np.ndarray | None = None) -> None:
        if not len(vectors) or not len(self.q):
            return
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        # one more than k where a query's own vector may be in the block, to drop it
        kk = min(self.k + (self.exclude is not None), len(x))
        d, pos = faiss.knn(self.q, x, kk)
        found = np.where(pos >= 0, np.asarray(ids, np.int64)[np.maximum(pos, 0)], -1)
        d = np.where(pos >= 0, d, np.inf)
        if self.exclude is not None:  # a held-out catalog vector must not find itself
            own = found == self.exclude[:, None]
            d, found = np.where(own, np.inf, d), np.where(own, -1, found)
        cat_d = np.concatenate([self.dist, d], 1)
        cat_i = np.concatenate([self.ids, found], 1)
        order = np.argsort(cat_d, axis=1, kind="stable")[:, :self.k]
        self.dist, self.ids = np.take_along_axis(cat_d, order, 1), np.take_along_axis(cat_i, order, 1)
        if keys is not None:  # carried only for callers that give them (the hot path of a build does not)
            fkeys = np.where(found >= 0, np.asarray(keys, np.int64)[np.maximum(pos, 0)], -1)
            self.keys = np.take_along_axis(np.concatenate([self.keys, fkeys], 1), order, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.dist, self.ids


def exact_search(queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
                 exclude_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    acc = ExactTopK(queries, k, exclude_ids)
    for vectors, ids in blocks:
        acc.add(vectors, ids)
    return acc.result()
