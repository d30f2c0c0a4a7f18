"""The quality gate's ground truth, kept and updated from a refresh's change instead of
recomputed from every vector (docs/contracts.md, "Ground truth").

The gate needs each evaluation query's exact nearest neighbour. A version keeps, per
query, its exact neighbours up to a *bound*: every vector nearer than ``bound`` is in the
list (at most K of them, nearest first, ties to the smaller id). A refresh then needs only
its change:

- a removed product (changed, deleted, retagged) leaves every list: the rest of the list
  stays exact below the bound;
- an added vector enters a list when it is nearer than the bound (faiss.knn of the
  queries against the added vectors only);
- a list with nothing left within its bound is recomputed against the current vectors
  (a full pass, for those queries only; rare with K = 10);
- a held-out query whose own product was removed leaves the set; the set is redrawn (a
  full pass) only when fewer than REDRAW_BELOW of the requested queries remain.

Pure numerics: no I/O (contracts.ground_truth owns the data and its file).
"""
from __future__ import annotations

from dataclasses import replace

import faiss
import numpy as np

from mimdex.indexing.exact import ExactTopK
from mimdex.infra.contracts.ground_truth import QueryTruth

K = 10              # neighbours kept per query
REDRAW_BELOW = 0.9  # redraw the held-out set when fewer than this share of it remains


def _ordered(dists: np.ndarray, ids: np.ndarray, *rest: np.ndarray, k: int = K) -> tuple[np.ndarray, ...]:
    """Rows sorted by (distance, id), cut to k; -1 / inf pad past the found ones."""
    order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), dists), axis=1)[:, :k]
    return tuple(np.take_along_axis(a, order, 1) for a in (dists, ids, *rest))


def _pad(a: np.ndarray, k: int, fill) -> np.ndarray:
    return a if a.shape[1] >= k else np.concatenate([a, np.full((len(a), k - a.shape[1]), fill, a.dtype)], 1)


def full(name: str, vectors: np.ndarray, own: np.ndarray | None, own_keys: np.ndarray | None,
         blocks, k: int = K) -> QueryTruth:
    """Exact neighbours by one pass over ``blocks`` ((vectors, ids, product keys) of every
    indexed vector). The bound is the (k+1)-th distance: inf when the catalog has at most k.
    ``own_keys`` None with ``own`` given: the pass finds the own vectors' product keys."""
    n = len(vectors)
    own = np.full(n, -1, np.int64) if own is None else np.asarray(own, np.int64)
    acc = ExactTopK(vectors, k + 1, own)
    wanted, found = (own[own >= 0], {}) if own_keys is None else (own[:0], None)
    for v, ids, keys in blocks:
        acc.add(v, ids, keys)
        hit = np.isin(ids, wanted) if len(wanted) else None
        if hit is not None and hit.any():
            found.update(zip(np.asarray(ids)[hit].tolist(), np.asarray(keys)[hit].tolist()))
    if own_keys is None:
        own_keys = np.array([found.get(i, -1) if i >= 0 else -1 for i in own.tolist()], np.int64)
    dists, ids, keys = _ordered(acc.dist, acc.ids, acc.keys, k=k + 1)
    return QueryTruth(name, np.ascontiguousarray(vectors, np.float32), own, np.asarray(own_keys, np.int64),
                      ids[:, :k], keys[:, :k], dists[:, :k].astype(np.float32), dists[:, k].astype(np.float32))


def update(truth: QueryTruth, removed_keys: np.ndarray, vectors: np.ndarray, ids: np.ndarray,
           keys: np.ndarray) -> QueryTruth:
    """The same truth after a change: products ``removed_keys`` gone (all their vectors),
    then ``vectors`` (with their ``ids`` and product ``keys``) added. Held-out queries of
    removed products are dropped; lists left with nothing below their bound are marked
    ``stale()`` for recomputation."""
    removed = np.asarray(removed_keys, np.int64)
    t = truth.take(np.flatnonzero(~np.isin(truth.own_keys, removed) | (truth.own_keys < 0)))
    k = t.ids.shape[1]
    gone = np.isin(t.keys, removed)
    dists = np.where(gone, np.inf, t.dists).astype(np.float32)
    nids, nkeys = np.where(gone, -1, t.ids), np.where(gone, -1, t.keys)
    if len(vectors) and len(t.vectors):
        x = np.ascontiguousarray(vectors, np.float32)
        kk = min(k + 1, len(x))
        d, pos = faiss.knn(np.ascontiguousarray(t.vectors, np.float32), x, kk)
        found = np.where(pos >= 0, np.asarray(ids, np.int64)[np.maximum(pos, 0)], -1)
        fkeys = np.where(pos >= 0, np.asarray(keys, np.int64)[np.maximum(pos, 0)], -1)
        d = np.where((pos < 0) | (found == t.own[:, None]), np.inf, d)
        dists, nids, nkeys = (np.concatenate(p, 1) for p in ((dists, d), (nids, found), (nkeys, fkeys)))
    # only what lies within the bound is known (one at it ties with any unseen vector);
    # past k, the (k+1)-th bounds it
    dists = np.where(dists <= t.bound[:, None], dists, np.inf).astype(np.float32)
    nids, nkeys = np.where(np.isfinite(dists), nids, -1), np.where(np.isfinite(dists), nkeys, -1)
    dists, nids, nkeys = (_pad(a, k + 1, f) for a, f in ((dists, np.inf), (nids, -1), (nkeys, -1)))
    dists, nids, nkeys = _ordered(dists, nids, nkeys, k=k + 1)
    bound = np.minimum(t.bound, dists[:, k]).astype(np.float32)
    return replace(t, ids=nids[:, :k], keys=nkeys[:, :k], dists=dists[:, :k], bound=bound)


def recompute(truths: tuple[QueryTruth, ...], rows: list[np.ndarray], blocks) -> tuple[QueryTruth, ...]:
    """``truths`` with the queries at ``rows`` (one array per set) recomputed, all sets in
    one full pass over ``blocks``."""
    if not sum(len(r) for r in rows):
        return truths
    picked = [t.take(r) for t, r in zip(truths, rows)]
    fresh = full("", np.concatenate([p.vectors for p in picked]), np.concatenate([p.own for p in picked]),
                 np.concatenate([p.own_keys for p in picked]), blocks, truths[0].ids.shape[1])
    out, at = [], 0
    for t, r in zip(truths, rows):
        cols = {f: getattr(t, f).copy() for f in ("ids", "keys", "dists", "bound")}
        for f in cols:
            cols[f][r] = getattr(fresh, f)[at:at + len(r)]
        out.append(replace(t, **cols))
        at += len(r)
    return tuple(out)
