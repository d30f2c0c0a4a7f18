"""Train an empty index once, on a sample: coarse centroids from the GEMM k-means
(kmeans.py), then faiss itself for the rest (the HNSW graph over the centroids, PQ
codebooks on the residuals, the re-ranking codes' ranges)."""
from __future__ import annotations

import time

import faiss
import numpy as np

from mimdex.indexing.kmeans import kmeans, two_level
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
# From this many lists the coarse centroids come from two-level k-means (kmeans.two_level)
# and then TWO_LEVEL_REFINE flat iterations. On isotropic 50-d vectors (the hard case for
# IVF) two-level alone costs 0.01-0.03 recall@10 at a fixed nprobe; 4 flat iterations
# from its centroids bring the error to flat k-means' after 10 and recall within seed
# noise (docs/benchmarks.md), for 0.4-0.5x its time. On clustered vectors two-level alone
# matches flat. Below it, flat k-means is cheap enough.
TWO_LEVEL_MIN_NLIST = 1024
TWO_LEVEL_REFINE = 2


def train_index(sample: np.ndarray, params: IndexParams, seed: int = 0) -> tuple[faiss.Index, dict]:
    """The trained, empty index and what training measured (seconds, k-means error)."""
    d = sample.shape[1]
    index = faiss.index_factory(d, params.factory, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    t0 = time.perf_counter()
    mse = None
    if not isinstance(searched(index), faiss.IndexPreTransform):  # OPQ rotates first: faiss trains it all
        centroids, mse = coarse_centroids(sample, params.nlist, ivf.cp.niter, seed)
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
                   "coarse_mse": mse, "sample": len(sample),
                   "kmeans": "flat" if params.nlist < TWO_LEVEL_MIN_NLIST else f"two-level + {TWO_LEVEL_REFINE} flat",
                   "device": "cuda" if _cuda() else "cpu"}


def coarse_centroids(sample: np.ndarray, nlist: int, niter: int, seed: int) -> tuple[np.ndarray, float]:
    if nlist < TWO_LEVEL_MIN_NLIST:
        return kmeans(sample, nlist, niter=niter, seed=seed)
    start, _ = two_level(sample, nlist, niter=niter, seed=seed)
    return kmeans(sample, nlist, niter=TWO_LEVEL_REFINE, seed=seed, init=start)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
