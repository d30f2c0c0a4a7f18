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


def lists_bytes(index: faiss.Index) -> bytes:
    """A shard on storage: only the inverted lists (codes + ids) of an index. The quantizer
    and PQ codebooks live once, in trained.index, not once per shard."""
    writer = faiss.VectorIOWriter()
    faiss.write_InvertedLists(faiss.extract_index_ivf(index).invlists, writer)
    return faiss.vector_to_array(writer.data).tobytes()


def shard_index(trained: bytes, lists: bytes) -> faiss.Index:
    """trained.index + a shard's inverted lists -> a complete, searchable faiss index."""
    index = deserialize(trained)
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.frombuffer(lists, dtype=np.uint8), reader.data)
    invlists = faiss.read_InvertedLists(reader)
    ivf = faiss.extract_index_ivf(index)
    if invlists.nlist != ivf.nlist:
        raise ValueError(f"inverted lists have {invlists.nlist} lists, the trained index {ivf.nlist}")
    if isinstance(invlists, faiss.BlockInvertedLists) and invlists.packer is None:
        packer = ivf.get_CodePacker()  # not serialised; needed to merge shards later
        packer.this.disown()  # BlockInvertedLists deletes its packer
        invlists.packer = packer
    invlists.this.disown()  # the index owns them from here
    ivf.replace_invlists(invlists, True)
    ivf.ntotal = sum(invlists.list_size(i) for i in range(invlists.nlist))
    index.ntotal = ivf.ntotal
    return index
