"""Re-ranking where shards are searched apart (evaluation one shard at a time, a reader
with ``consolidate=False``): the top k x k_factor candidates of the IVF scans, ordered
again by their distance to the query under finer codes. A consolidated reader re-ranks
in faiss's IndexRefine instead (rows.py); ``rerank`` is what that replaced, and the
tests' reference for it.

Pure numerics: ids in, decoded distances and ids out.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

BLOCK_FLOATS = 1 << 23   # candidates x d decoded at once: 32 MB of fp32, whatever k x k_factor is


def refined_distances(x: np.ndarray, ids: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray],
                      codes: np.ndarray, decode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Squared L2 from each query to each of its candidates under the finer codes, queries x
    candidates; inf where the id is -1. ``rows_of(ids)`` gives each candidate's row in
    ``codes``; ``decode(codes)`` the vectors."""
    q, fetched = ids.shape
    out = np.full((q, fetched), np.inf, np.float32)
    step = max(1, BLOCK_FLOATS // max(1, fetched * x.shape[1]))
    for a in range(0, q, step):
        block = ids[a:a + step]
        valid = block >= 0
        if valid.all():   # the common case: no masked copies
            vec = decode(codes[rows_of(block.ravel())]).reshape(*block.shape, x.shape[1])
        else:
            vec = np.zeros((*block.shape, x.shape[1]), np.float32)
            vec[valid] = decode(codes[rows_of(block[valid])])
        xq = x[a:a + step]
        dist = (np.einsum("qd,qd->q", xq, xq)[:, None] - 2 * np.einsum("qd,qkd->qk", xq, vec)
                + np.einsum("qkd,qkd->qk", vec, vec))
        out[a:a + len(block)] = np.where(valid, dist, np.inf)
    return out


def top_k(dist: np.ndarray, ids: np.ndarray, k: int, *carried: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each row's k nearest candidates, ties broken by id (the same order on every run and
    however the candidates were split): (dist, ids, *carried) taken in that order, queries
    x k; inf / -1 past a row's valid candidates (id -1)."""
    dist = np.where(ids >= 0, dist, np.inf).astype(np.float32)
    order = np.lexsort((ids, dist), axis=1)[:, :k]
    kk = order.shape[1]
    out_d = np.full((len(ids), k), np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    out_d[:, :kk] = np.take_along_axis(dist, order, 1)
    out_i[:, :kk] = np.where(np.isfinite(out_d[:, :kk]), np.take_along_axis(ids, order, 1), -1)
    rest = []
    for c in carried:
        r = np.full((len(ids), k), np.inf if np.issubdtype(c.dtype, np.floating) else -1, c.dtype)
        r[:, :kk] = np.take_along_axis(c, order, 1)
        rest.append(r)
    return (out_d, out_i, *rest)


def rerank(x: np.ndarray, ids: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray], codes: np.ndarray,
           decode: Callable[[np.ndarray], np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2, ids), queries x k, best first; -1 / inf where fewer than k candidates."""
    return top_k(refined_distances(x, ids, rows_of, codes, decode), ids, k)
