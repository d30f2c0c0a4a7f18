"""Exact search over in-memory vectors (pure numpy), for training validation, model
evaluation and the baselines; the figures are contracts.recall's street_recall and
reformulation_recall, as an index's evaluation computes them."""
from __future__ import annotations

import numpy as np

from mimdex.infra.contracts.recall import street_recall


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest inner products per query (ties in gallery order)."""
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :k]


def retrieval_metrics(top: np.ndarray, truth: np.ndarray, categories: np.ndarray | None = None) -> dict:
    """street_recall of exact search, gallery rows as product keys: recall@1, recall@k
    (k = top.shape[1]) and, given each row's category, wrong_category@1."""
    cats = (categories[top[:, 0]], categories[truth]) if categories is not None else (None, None)
    return street_recall(top, truth, sorted({1, top.shape[1]}), *cats, digits=None)
