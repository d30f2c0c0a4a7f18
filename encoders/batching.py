"""How training batches are grouped: hard in-batch negatives from the data alone
(colour statistics of catalog images) or from the catalog's categories."""
from __future__ import annotations

import numpy as np

BATCHINGS = ("random", "similar", "category")


def category_groups(categories: list, products: np.ndarray) -> list[np.ndarray]:
    """``products`` grouped by catalog category (None: a group of its own), in first-seen order."""
    groups: dict = {}
    for p in products:
        groups.setdefault(categories[int(p)], []).append(int(p))
    return [np.array(g, np.int64) for g in groups.values()]


def colour_clusters(pixels: np.ndarray, products: np.ndarray, seed: int, per_cluster: int = 48) -> list[np.ndarray]:
    """Group ``products`` by k-means (faiss) on colour histograms of their catalog images."""
    import faiss

    px = pixels[products].reshape(len(products), -1, 3).astype(np.int32)
    codes = (px // 64) @ np.array([16, 4, 1])  # 4x4x4 colour bins
    keep = px.min(axis=2) <= 235  # ignore the studio-white background
    hist = np.stack([np.bincount(c[k], minlength=64) for c, k in zip(codes, keep)]).astype(np.float32)
    hist = np.sqrt(hist / np.maximum(hist.sum(1, keepdims=True), 1))
    k = max(1, len(products) // per_cluster)
    km = faiss.Kmeans(hist.shape[1], k, niter=20, seed=seed, verbose=False)
    km.train(hist)
    _, assign = km.index.search(hist, 1)
    return [products[assign[:, 0] == c] for c in range(k) if np.any(assign[:, 0] == c)]
