"""Train an empty IVF-PQ index once, on a sample: coarse centroids from the GEMM k-means
(kmeans.py), PQ codebooks on the residuals by faiss itself."""
from __future__ import annotations

import time

import faiss
import numpy as np

from mimdex.indexing.kmeans import kmeans
from mimdex.indexing.params import IndexParams


def train_index(sample: np.ndarray, params: IndexParams, seed: int = 0) -> tuple[faiss.Index, dict]:
    """The trained, empty index and what training measured (seconds, k-means error)."""
    d = sample.shape[1]
    index = faiss.index_factory(d, params.factory, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    t0 = time.perf_counter()
    centroids, mse = kmeans(sample, params.nlist, niter=ivf.cp.niter, seed=seed)
    t_coarse = time.perf_counter() - t0
    ivf.quantizer.add(centroids)  # a full quantizer: faiss skips its own coarse training
    ivf.cp.seed = seed
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index, {"coarse_seconds": round(t_coarse, 3), "pq_seconds": round(time.perf_counter() - t0 - t_coarse, 3),
                   "coarse_mse": mse, "sample": len(sample), "device": "cuda" if _cuda() else "cpu"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
