"""The next index version from the previous one: its trained quantizer and codebooks are
reused, and a delta segment holds the new vectors and the products removed
(contracts.index_delta); the previous version's files are referenced, not rewritten.

Drift decides whether that is good enough: the mean coarse-quantisation error of the new
vectors against the error the quantizer was trained to (and the share of the catalog
that changed). Past either threshold the caller retrains with a full build. No Beam here:
the update touches only the change.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_delta
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.embeddings import EmbeddingsManifest, PartEntry
from mimdex.infra.contracts.vectors import check_unique, merge_skipped, shard_of, usable_rows


@dataclass(frozen=True)
class Delta:
    vectors: np.ndarray
    ids: np.ndarray
    idmap: pa.Table | None
    skipped: dict
    keys: np.ndarray                 # each vector's product id (its shard)


def new_vectors(root: str, manifest: EmbeddingsManifest, entries: list[PartEntry], kind: str, alpha: float,
                photo_mode: str | None = None) -> Delta:
    """Vectors, ids and id-map rows (with catalog metadata) of the delta parts."""
    parts = [usable_rows(root, e, manifest.model, manifest.dtype, kind, alpha, metadata=True,
                         photo_mode=photo_mode or "every", paged=True) for e in entries]
    skipped = merge_skipped(p.skipped for p in parts)
    if not parts:
        empty = np.zeros(0, np.int64)
        return Delta(np.zeros((0, manifest.model.d), np.float32), empty, None, skipped, empty)
    idmap = pa.concat_tables([p.idmap for p in parts], promote_options="permissive")
    return Delta(np.concatenate([p.vectors for p in parts]), idmap.column("id").to_numpy(), idmap, skipped,
                 np.concatenate([p.product_keys for p in parts]))


def drift(trained: bytes, vectors: np.ndarray, training: dict | None) -> dict:
    """Coarse-quantisation MSE of the new vectors vs the training MSE."""
    base = (training or {}).get("coarse_mse")
    if not len(vectors):
        return {"new_vectors": 0, "coarse_mse": None, "training_mse": base, "ratio": None}
    index = codec.deserialize(trained)  # keep the owner alive while its quantizer is used
    dist, _ = faiss.extract_index_ivf(index).quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    mse = float(dist.mean())
    return {"new_vectors": int(len(vectors)), "coarse_mse": round(mse, 6), "training_mse": base,
            "ratio": round(mse / base, 4) if base else None}


def write_delta(version_dir: str, version: str, trained: bytes, shards: int, removed: list[str],
                delta: Delta) -> tuple[iv.DeltaSegment, tuple | None]:
    """The new version's delta segment (contracts.index_delta): the new vectors' codes (faiss
    ``sa_encode`` with the reused trained index) per shard, and the deletion list of the
    ``removed`` product_ids (changed or deleted: all their earlier vectors go). Nothing of
    the previous version is read or rewritten. Also the delta alone as one searchable
    (index, id map with re-ranking codes), for the evaluation (indexing.carried_search);
    None without new vectors."""
    index = codec.deserialize(trained)
    nlist, code_size = codec.lists_shape(index)
    lists, codes, refine = codec.encode(index, delta.vectors)
    with_codes = iv.with_refine(delta.idmap, refine)
    shard_of_row = shard_of(delta.keys, shards)
    out = {}
    for shard in np.unique(shard_of_row).tolist():
        sel = np.flatnonzero(shard_of_row == shard)
        idmap = with_codes.take(pa.array(sel, pa.int64()))
        check_unique(delta.ids[sel], idmap, f"delta of shard {shard}")
        out[int(shard)] = (codec.encoded_lists(nlist, code_size, delta.ids[sel], lists[sel], codes[sel]), len(sel),
                           idmap)
    piece = (codec.shard_index(trained, codec.encoded_lists(nlist, code_size, delta.ids, lists, codes)), with_codes) \
        if len(delta.ids) else None
    return index_delta.write_segment(version_dir, version, out, removed), piece


def code_error(trained: bytes, vectors: np.ndarray) -> float | None:
    """Mean squared distance between vectors and what their list codes decode to under the
    trained index: how well the reused codebooks represent them."""
    if not len(vectors):
        return None
    index = codec.searched(codec.deserialize(trained))
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    with codec.one_omp_thread():   # the same bits on every machine (codec.encode)
        x, decoded = _decoded(index, x)
    return float(((x - decoded) ** 2).sum(1).mean())


def _decoded(index: faiss.Index, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, its codes decoded), in the space the lists code (after an OPQ rotation, which
    keeps distances). faiss's sa_decode of fast-scan lists is unsupported: their PQ
    decodes the residual from the vector's centroid."""
    ivf = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    if not isinstance(ivf, faiss.IndexIVFPQFastScan):
        return x, index.sa_decode(index.sa_encode(x))
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    _, lists = ivf.quantizer.search(x, 1)
    centroids = ivf.quantizer.reconstruct_batch(lists.ravel()) if ivf.by_residual else np.zeros_like(x)
    return x, centroids + ivf.pq.decode(ivf.pq.compute_codes(np.ascontiguousarray(x - centroids)))
