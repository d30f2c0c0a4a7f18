"""Train an empty index once, on a sample: coarse centroids from the GEMM k-means
(kmeans.py), then faiss itself for the rest (the HNSW graph over the centroids, PQ
codebooks on the residuals, the re-ranking codes' ranges)."""
from __future__ import annotations

import time

import faiss
import numpy as np

from mimdex.indexing.kmeans import kmeans, two_level
from mimdex.indexing.params import PQ8_TRAIN_POINTS_PER_CENTROID, IndexParams
from mimdex.infra.contracts.index_codec import refine_quantizer, searched, without_pq_tables

# The HNSW graph over the centroids, and the candidates it keeps while it walks at add
# (stored in the trained index). Assigning 50k of the 1M benchmark vectors to 16,384
# two-level centroids (docs/benchmarks.md), agreement with the flat assignment (2.59 s):
# faiss's default graph (efConstruction 40) 93.1% at ef 16, 97.9% at ef 32, 99.7% at 64;
# built with efConstruction 200 (1.8 s instead of 0.5 s) 99.1%, 99.80% (1.05 s) and
# 99.86%. A misassigned vector sits in a list its neighbours' queries may not probe: at
# 10M, efConstruction 40 with ef 32 capped recall@10 at 0.96. Searches use a larger ef
# (reader.py: HNSW_EF_SEARCH): they need nprobe lists, not one.
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_ADD = 32
# SQ8 maps each dimension's [min, max] over the sample to 0..255 and clips outside it. A
# refresh reuses the trained index for weeks of new products: 5% of the range on either
# side keeps their codes unclipped for the cost of 10% coarser steps.
SQ_RANGE_MARGIN = 0.05
# Above this many multiply-adds per k-means iteration (sample x nlist x d) the coarse
# centroids come from two-level k-means (kmeans.two_level) and then TWO_LEVEL_REFINE flat
# iterations (docs/benchmarks.md); at or below it, flat k-means takes a few seconds. On
# isotropic 50-d vectors (the hard case for IVF) two-level alone costs 0.01-0.03 recall@10
# at a fixed nprobe and 2 flat iterations from its centroids recover about half of it; on
# GloVe 100-d (131,072 x 2,048 lists, 2.7e10) flat takes 3.2 s against 1.6 s and gains
# 0.006-0.017 recall@10 at nprobe 32 (0.004 at 64); on the clustered benchmark vectors
# two-level alone matches flat k-means (1M -> 4,096 lists, 2.7e11: 0.984 against 0.979 at
# nprobe 4, flat 23.7 s against 3.4 s; 1M -> 16,384: 0.996 at nprobe 16 after 0, 2 or 6
# flat iterations).
FLAT_KMEANS_MAX_MACS = 3e10
TWO_LEVEL_REFINE = 2
IVF_NITER = 10   # the k-means iterations faiss's IndexIVF gives its coarse quantizer (cp.niter)


def train_index(sample: np.ndarray, params: IndexParams, seed: int = 0,
                coarse: tuple[np.ndarray, float, str] | None = None) -> tuple[faiss.Index, dict]:
    """The trained, empty index and what training measured (seconds, k-means error).
    ``coarse``: centroids (coarse_centroids' result) shared by several indexes (trial.py)."""
    d = sample.shape[1]
    index = faiss.index_factory(d, params.factory, faiss.METRIC_L2)
    ivf = faiss.extract_index_ivf(index)
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    t0 = time.perf_counter()
    mse, how = None, "faiss"
    if not isinstance(searched(index), faiss.IndexPreTransform):  # OPQ rotates first: faiss trains it all
        centroids, mse, how = coarse if coarse is not None else coarse_centroids(sample, params.nlist, ivf.cp.niter, seed)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            quantizer.hnsw.efSearch = HNSW_EF_ADD
        quantizer.add(centroids)  # a full quantizer: faiss skips its own coarse training
    t_coarse = time.perf_counter() - t0
    ivf.cp.seed = seed
    pq_ivf = faiss.downcast_index(ivf)
    if isinstance(pq_ivf, faiss.IndexIVFPQ) and not isinstance(pq_ivf, faiss.IndexIVFPQFastScan):
        if pq_ivf.pq.nbits == 8:
            pq_ivf.pq.cp.max_points_per_centroid = PQ8_TRAIN_POINTS_PER_CENTROID
        # index_factory's "PQmx8" turns on polysemous training (re-ordering the centroids for
        # Hamming-distance filtering, which our searches never use): 100 s of PQ128x8's 120
        pq_ivf.do_polysemous_training = False
        without_pq_tables(index)    # not built at train either
    refine = refine_quantizer(index)
    for sq_index in (searched(index), refine):
        if isinstance(sq_index, (faiss.IndexScalarQuantizer, faiss.IndexIVFScalarQuantizer)):
            sq_index.sq.rangestat_arg = SQ_RANGE_MARGIN
    index.train(sample)
    return index, {"coarse_seconds": round(t_coarse, 3), "pq_seconds": round(time.perf_counter() - t0 - t_coarse, 3),
                   "coarse_mse": mse, "sample": len(sample),
                   "kmeans": how,
                   "device": "cuda" if _cuda() else "cpu"}


def coarse_centroids(sample: np.ndarray, nlist: int, niter: int = IVF_NITER, seed: int = 0) -> tuple[np.ndarray, float, str]:
    """The coarse centroids, k-means' error, and which k-means made them (for the manifest)."""
    if len(sample) * nlist * sample.shape[1] <= FLAT_KMEANS_MAX_MACS:
        return *kmeans(sample, nlist, niter=niter, seed=seed), "flat"
    start, _ = two_level(sample, nlist, niter=niter, seed=seed)
    return *kmeans(sample, nlist, niter=TWO_LEVEL_REFINE, seed=seed, init=start), f"two-level + {TWO_LEVEL_REFINE} flat"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
