"""Exact top-k by blockwise brute force: the ground truth every recall is measured against.

Database blocks stream through; a running top-k per query is merged with each block's,
so memory is O(queries x k + block), never the whole catalog.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

BLOCK_ROWS = 16384   # 1,000 queries x 16k rows of fp32 distances: 64 MB


def merge_nearest(dists: list[np.ndarray], ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the nearest of several partial top-1 results (the same as one pass over
    all their blocks): the smallest distance, ties to the smaller id; -1 where none found."""
    d, i = np.stack(dists, 1), np.stack(ids, 1)
    d = np.where(i >= 0, d, np.inf)
    best = np.lexsort((i, d), axis=1)[:, 0]
    rows = np.arange(len(d))
    return d[rows, best], i[rows, best]


class ExactTopK:
    def __init__(self, queries: np.ndarray, k: int, exclude_ids: np.ndarray | None = None):
        self.q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        self.k = k
        self.exclude = None if exclude_ids is None else torch.from_numpy(exclude_ids)
        self.dist = torch.full((len(queries), k), float("inf"))
        self.ids = torch.full((len(queries), k), -1, dtype=torch.long)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        for a in range(0, len(vectors), BLOCK_ROWS):  # queries x block distances, never queries x n
            self._add(vectors[a:a + BLOCK_ROWS], ids[a:a + BLOCK_ROWS])

    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        xid = torch.from_numpy(ids.astype(np.int64))
        d = (self.q * self.q).sum(1, keepdim=True) - 2 * self.q @ x.T + (x * x).sum(1)[None]
        if self.exclude is not None:  # a held-out catalog vector must not find itself
            d[self.exclude[:, None] == xid[None]] = float("inf")
        kk = min(self.k, d.shape[1])
        bd, bi = torch.topk(d, kk, dim=1, largest=False)
        cat_d = torch.cat([self.dist, bd], 1)
        cat_i = torch.cat([self.ids, xid[bi]], 1)
        order = torch.argsort(cat_d, dim=1, stable=True)[:, : self.k]
        self.dist, self.ids = torch.gather(cat_d, 1, order), torch.gather(cat_i, 1, order)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.dist.numpy(), self.ids.numpy()


def exact_search(queries: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int,
                 exclude_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    acc = ExactTopK(queries, k, exclude_ids)
    for vectors, ids in blocks:
        acc.add(vectors, ids)
    return acc.result()
