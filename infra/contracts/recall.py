"""recall@k: the share of queries whose target is among the first k results.

One definition for every report: index evaluation against exact search (the target is
the exact nearest neighbour, faiss's "1-recall@k"), street-query evaluation (the target
is the photographed product), training validation and the demo.
"""
from __future__ import annotations

import numpy as np

KS = (1, 10, 100)


def hits(found: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Per query: is ``target`` among the first ``k`` entries of its row of ``found``."""
    return (np.asarray(found)[:, :k] == np.asarray(target)[:, None]).any(1)


def recall_at(found: np.ndarray, target: np.ndarray, ks=KS, digits: int | None = 4) -> dict[str, float]:
    """{"recall@k": share} for each k (rounded to ``digits``; None keeps full precision)."""
    out = {}
    for k in ks:
        value = float(hits(found, target, k).mean()) if len(found) else 0.0
        out[f"recall@{k}"] = round(value, digits) if digits is not None else value
    return out
