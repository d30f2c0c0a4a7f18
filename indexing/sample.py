"""The training sample and the held-out evaluation queries, drawn in one streaming pass.

Each part draws one uniform number per usable row from a generator seeded by (seed, the
part's name): rows below p_train are training candidates, rows above 1 - p_eval are
held-out candidates (disjoint). Candidates are over-drawn by OVERSAMPLE and cut back to
the exact counts by their smallest draws, so memory is the sample's size, never the
catalog's, and the sample is the same for a seed whatever order the parts are read in.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable

import numpy as np

OVERSAMPLE = 1.1   # Bernoulli counts fall short of p * n by about sqrt(n p); 10% covers it from ~1k rows


@dataclass(frozen=True)
class Sample:
    train: np.ndarray          # train_size x d float32
    held: np.ndarray           # held-out query vectors (still indexed, excluded from their own results)
    held_ids: np.ndarray       # their int64 ids
    rows: int                  # usable rows seen


def _draws(seed: int, name: str, rows: int) -> np.ndarray:
    return np.random.default_rng([seed, zlib.crc32(name.encode())]).random(rows)


def _smallest(keys: list[np.ndarray], count: int, *columns: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """The ``count`` rows with the smallest keys, in block order. Only the keys are
    concatenated (8 bytes a row); each block's rows are copied into the result and the
    block let go as it is assembled, so the peak is the candidates, not twice them."""
    flat = np.concatenate(keys)
    threshold = np.partition(flat, count - 1)[count - 1] if 0 < count < len(flat) else np.inf
    if count == 0:
        threshold = -np.inf
    picks = [k <= threshold for k in keys]   # keys are distinct draws: exactly ``count`` rows
    total = int(sum(p.sum() for p in picks))
    out = []
    for col in columns:
        result = np.empty((total,) + col[0].shape[1:], col[0].dtype)
        at = 0
        for pick in picks:
            rows = col.pop(0)[pick]
            result[at:at + len(rows)] = rows
            at += len(rows)
        out.append(result)
    return tuple(out)


def draw(blocks: Iterable[tuple[str, np.ndarray, np.ndarray]], n: int, train_size: int, eval_queries: int,
         d: int, seed: int = 0) -> Sample:
    """``blocks``: (part name, vectors, ids) of every usable row, part by part, where ids
    may be a function of row positions (only held-out candidates need theirs); ``n`` the
    expected usable rows (an upper bound is fine: a shortfall only shrinks the sample)."""
    n_eval = min(eval_queries, n // 5)  # held out of training (still indexed)
    train_size = min(train_size, n - n_eval)
    p_eval = min(1.0, n_eval / max(n, 1) * OVERSAMPLE)
    p_train = min(1.0 - p_eval, train_size / max(n, 1) * OVERSAMPLE)
    t_keys, t_vecs, e_keys, e_vecs, e_ids = [], [], [], [], []
    rows = 0
    for name, v, ids in blocks:
        u = _draws(seed, name, len(v))
        t, e = np.flatnonzero(u < p_train), np.flatnonzero(u >= 1.0 - p_eval)
        t_keys.append(u[t])
        t_vecs.append(v[t])
        e_keys.append(1.0 - u[e])
        e_vecs.append(v[e])
        e_ids.append(ids(e) if callable(ids) else ids[e])
        rows += len(v)
    if not t_keys:
        return Sample(np.zeros((0, d), np.float32), np.zeros((0, d), np.float32), np.zeros(0, np.int64), 0)
    (train,) = _smallest(t_keys, train_size, t_vecs)
    held, held_ids = _smallest(e_keys, n_eval, e_vecs, e_ids)
    return Sample(np.ascontiguousarray(train, np.float32).reshape(-1, d),
                  np.ascontiguousarray(held, np.float32).reshape(-1, d), held_ids.astype(np.int64), rows)
