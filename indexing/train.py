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


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def shard_index(trained: bytes, lists: bytes) -> faiss.Index:
    """trained.index + a shard's inverted lists -> a complete, searchable faiss index."""
    index = deserialize(trained)
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.frombuffer(lists, dtype=np.uint8), reader.data)
    flat = faiss.read_InvertedLists(reader)
    ivf = faiss.extract_index_ivf(index)
    if flat.nlist != ivf.nlist or flat.code_size != ivf.code_size:
        raise ValueError(f"inverted lists ({flat.nlist} lists of {flat.code_size}-byte codes) do not fit the "
                         f"trained index ({ivf.nlist}, {ivf.code_size})")
    dst = faiss.downcast_InvertedLists(ivf.invlists)
    packer = ivf.get_CodePacker() if isinstance(dst, faiss.BlockInvertedLists) else None
    for lst in range(flat.nlist):
        n = flat.list_size(lst)
        if not n:
            continue
        if packer is None:
            dst.add_entries(lst, n, flat.get_ids(lst), flat.get_codes(lst))
            continue
        # BlockInvertedLists.add_entries into an empty list copies whole packed blocks
        codes = faiss.rev_swig_ptr(flat.get_codes(lst), n * ivf.code_size)
        nblocks = (n + packer.nvec - 1) // packer.nvec
        padded = np.zeros(nblocks * packer.nvec * ivf.code_size, np.uint8)
        padded[: len(codes)] = codes
        packed = np.empty(nblocks * packer.block_size, np.uint8)
        for b in range(nblocks):
            packer.pack_all(faiss.swig_ptr(padded[b * packer.nvec * ivf.code_size:]),
                            faiss.swig_ptr(packed[b * packer.block_size:]))
        dst.add_entries(lst, n, flat.get_ids(lst), faiss.swig_ptr(packed))
    ivf.ntotal = sum(flat.list_size(i) for i in range(flat.nlist))
    index.ntotal = ivf.ntotal
    return index
