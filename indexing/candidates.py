"""The gate's search results carried from one version to the next by the change
(docs/contracts.md, "Kept search results"), so that a refresh evaluates without loading
its index.

A refresh reuses the trained index: a vector's code, a query's probed lists at an nprobe
and the code distance between them are the same in every version. A version keeps, per
evaluation query and nprobe, the C candidates nearest by code distance in the probed
lists (ties by id), their re-ranking distances, and a *bound*: every candidate nearer
than it is in the list. The next version's list is the kept one without the removed
products, plus the delta's vectors in the same lists below the bound (an IVF of the delta
alone, searched at that nprobe). A search for k (k x k_factor candidates, re-ranked as the
reader does) is answered from a list whose first k x k_factor lie below the bound; the
rest are searched again on the version (the caller's fallback, one pass over its shards).

Pure numerics: no I/O (contracts.search_lists owns the file).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from mimdex.indexing.rerank import top_k
from mimdex.infra.contracts.recall import KS
from mimdex.infra.contracts.search_lists import Lists

MARGIN = 1.25   # kept candidates over the most a sweep search needs: removals eat into it night by night
MOST = 256      # candidates kept per query and nprobe at most: the file stays a few MB, whatever the catalog


def kept_k(k_factor: int) -> int:
    """The largest sweep k (from KS) whose search the lists answer: each needs (k + 1, its
    own id dropped) x k_factor candidates. Re-ranking indexes (k_factor 4 to 10) keep
    recall@1 and @10, the gate's; recall@100 would need up to 1,010 a query."""
    return max(k for k in KS if MARGIN * (k + 1) * k_factor <= MOST or k == min(KS))


def capacity(k_factor: int) -> int:
    """C: the largest kept search x k_factor, and a margin."""
    return math.ceil(MARGIN * (kept_k(k_factor) + 1) * k_factor)


def from_search(query: np.ndarray, nprobe: int, dists: np.ndarray, ids: np.ndarray, keys: np.ndarray,
                refined: np.ndarray | None, c: int) -> Lists:
    """Rows from a search for c + 1 candidates by (code distance, id): the (c+1)-th bounds the first c."""
    d = np.where(ids >= 0, dists, np.inf).astype(np.float32)
    return Lists(np.asarray(query, np.int64), np.full(len(ids), nprobe, np.int32), ids[:, :c], keys[:, :c],
                 d[:, :c], None if refined is None else refined[:, :c].astype(np.float32), d[:, c].copy())


def update(kept: Lists, removed_keys: np.ndarray, added: Lists | None) -> Lists:
    """``kept`` after a change: the candidates of ``removed_keys`` gone, ``added`` (the same
    rows searched in the delta alone, C + 1 candidates each, so that none nearer than the
    new bound is unseen) in where nearer than the bound; the bound tightens to the first
    candidate cut off."""
    c, m = kept.ids.shape[1], len(kept.query)
    gone = np.isin(kept.keys, np.asarray(removed_keys, np.int64)) | (kept.ids < 0)

    def pad(fill, dtype):   # a column of room: the (C+1)-th, the bound, exists in every row
        return np.full((m, 1), fill, dtype)

    cols = [[np.where(gone, np.inf, kept.dists), pad(np.inf, np.float32)], [np.where(gone, -1, kept.ids),
            pad(-1, np.int64)], [kept.keys, pad(-1, np.int64)]]
    if kept.refined is not None:
        cols.append([kept.refined, pad(np.inf, np.float32)])
    if added is not None:
        for col, more in zip(cols, (added.dists, added.ids, added.keys, added.refined)):
            col.append(more)
    dists, ids, *rest = (np.concatenate(col, 1) for col in cols)
    dists = np.where((ids >= 0) & (dists <= kept.bound[:, None]), dists, np.inf)
    dists, ids, *rest = top_k(dists, np.where(np.isfinite(dists), ids, -1), c + 1, *rest)
    bound = np.minimum(kept.bound, dists[:, c]).astype(np.float32)
    valid = ids[:, :c] >= 0
    return replace(kept, ids=ids[:, :c], keys=np.where(valid, rest[0][:, :c], -1), dists=dists[:, :c],
                   refined=np.where(valid, rest[1][:, :c], np.inf) if kept.refined is not None else None,
                   bound=bound)


def answer(lists: Lists, k: int, k_factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, known): each row's top k as the reader returns it (k x k_factor candidates by
    code distance, re-ranked by the finer codes where the index has them), and whether the
    row's list holds all of those candidates. A candidate *at* the bound counts: one not
    in the row is at least as far, so only the order among tied distances may differ, as
    it does between two faiss searches (fast-scan distances are quantised: ties are common)."""
    m = k * k_factor
    c = lists.ids.shape[1]
    held = (lists.ids >= 0).sum(1)
    last = lists.dists[:, min(m, c) - 1]
    known = (m <= c) & (last <= lists.bound) | (held < m) & ~np.isfinite(lists.bound)
    _, ids, *refined = top_k(lists.dists, lists.ids, m, *([lists.refined] if lists.refined is not None else []))
    if refined:
        _, ids = top_k(refined[0], ids, k)
    return ids[:, :k], known
