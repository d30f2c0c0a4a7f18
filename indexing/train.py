"""Train an empty index once, on a sample: coarse centroids from the GEMM k-means
(kmeans.py), then faiss itself for the rest (the HNSW graph over the centroids, PQ
codebooks on the residuals, the re-ranking codes' ranges)."""
from __future__ import annotations

import time

import faiss
import numpy as np

from mimdex.indexing.kmeans import kmeans
from mimdex.indexing.params import IndexParams

# candidates the HNSW coarse quantizer keeps while it walks: 16 (faiss's default) puts
# 1 vector in 10 in a wrong list at add; 128 matches the flat quantizer's recall at the
# same nprobe (tests/test_index_scale.py) and raises to nprobe when a search asks for more
HNSW_EF_SEARCH = 128


def train_index(sample: np.ndarray, params: IndexParams, seed: int = 0) -> tuple[faiss.Index, dict]:
    """The trained, empty index and what training measured (seconds, k-means error)."""
    d = sample.shape[1]
    index = faiss.index_factory(d, params.factory, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    t0 = time.perf_counter()
    mse = None
    if not isinstance(index, faiss.IndexPreTransform):  # OPQ rotates first: faiss trains it all
        centroids, mse = kmeans(sample, params.nlist, niter=ivf.cp.niter, seed=seed)
        quantizer = faiss.downcast_index(ivf.quantizer)
        quantizer.add(centroids)  # a full quantizer: faiss skips its own coarse training
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = HNSW_EF_SEARCH
    t_coarse = time.perf_counter() - t0
    ivf.cp.seed = seed
    index.train(sample)
    return index, {"coarse_seconds": round(t_coarse, 3), "pq_seconds": round(time.perf_counter() - t0 - t_coarse, 3),
                   "coarse_mse": mse, "sample": len(sample), "device": "cuda" if _cuda() else "cpu"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
