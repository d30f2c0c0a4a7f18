"""Train an empty index once, on a sample: coarse centroids from the GEMM k-means
(kmeans.py), then faiss itself for the rest (the HNSW graph over the centroids, PQ
codebooks on the residuals, the re-ranking codes' ranges)."""
from __future__ import annotations

import time

import faiss
import numpy as np

from mimdex.indexing.kmeans import kmeans
from mimdex.indexing.params import IndexParams
from mimdex.infra.contracts.index_codec import refine_quantizer, searched

# candidates the HNSW coarse quantizer keeps while it walks, at add (stored in the trained
# index). Assigning 50k vectors to 16,384 centroids (docs/benchmarks.md): ef 16 (faiss's
# default) agrees with the flat assignment for 99.84% in 0.86 s, ef 32 for 99.996% in
# 1.73 s, ef 128 for 99.998% in 5.61 s, slower than the flat scan (2.36 s). Searches use
# more (reader.py: HNSW_EF_SEARCH): they need nprobe lists, not one.
HNSW_EF_ADD = 32
# SQ8 maps each dimension's [min, max] over the sample to 0..255 and clips outside it. A
# refresh reuses the trained index for weeks of new products: 5% of the range on either
# side keeps their codes unclipped for the cost of 10% coarser steps.
SQ_RANGE_MARGIN = 0.05


def train_index(sample: np.ndarray, params: IndexParams, seed: int = 0) -> tuple[faiss.Index, dict]:
    """The trained, empty index and what training measured (seconds, k-means error)."""
    d = sample.shape[1]
    index = faiss.index_factory(d, params.factory, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    t0 = time.perf_counter()
    mse = None
    if not isinstance(searched(index), faiss.IndexPreTransform):  # OPQ rotates first: faiss trains it all
        centroids, mse = kmeans(sample, params.nlist, niter=ivf.cp.niter, seed=seed)
        quantizer = faiss.downcast_index(ivf.quantizer)
        quantizer.add(centroids)  # a full quantizer: faiss skips its own coarse training
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = HNSW_EF_ADD
    t_coarse = time.perf_counter() - t0
    ivf.cp.seed = seed
    refine = refine_quantizer(index)
    for sq_index in (searched(index), refine):
        if isinstance(sq_index, (faiss.IndexScalarQuantizer, faiss.IndexIVFScalarQuantizer)):
            sq_index.sq.rangestat_arg = SQ_RANGE_MARGIN
    index.train(sample)
    return index, {"coarse_seconds": round(t_coarse, 3), "pq_seconds": round(time.perf_counter() - t0 - t_coarse, 3),
                   "coarse_mse": mse, "sample": len(sample), "device": "cuda" if _cuda() else "cpu"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
