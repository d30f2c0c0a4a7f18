"""Retrieval metrics over exact search (pure numpy), shared by training validation,
model evaluation and the baselines; recall@k is contracts.recall's."""
from __future__ import annotations

import numpy as np

from mimdex.infra.contracts.recall import recall_at


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest inner products per query (ties in gallery order)."""
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :k]


def retrieval_metrics(top: np.ndarray, truth: np.ndarray, categories: np.ndarray | None = None) -> dict:
    """recall@1, recall@k (k = top.shape[1]) and, given categories, wrong_category@1."""
    out = recall_at(top, truth, sorted({1, top.shape[1]}), digits=None)
    if categories is not None:
        out["wrong_category@1"] = float(np.mean(categories[top[:, 0]] != categories[truth]))
    return out
