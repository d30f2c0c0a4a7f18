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
from mimdex.infra.contracts.recall import hits
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
                         photo_mode=photo_mode or "every") for e in entries]
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
                delta: Delta) -> iv.DeltaSegment:
    """The new version's delta segment (contracts.index_delta): the new vectors' codes (faiss
    ``sa_encode`` with the reused trained index) per shard, and the deletion list of the
    ``removed`` product_ids (changed or deleted: all their earlier vectors go). Nothing of
    the previous version is read or rewritten."""
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
    return index_delta.write_segment(version_dir, version, out, removed)


def self_recall(reader, vectors: np.ndarray, ids: np.ndarray, nprobe: int, k: int = 10) -> float | None:
    """Share of vectors that find their own id in the top k: how well the reused
    codebooks represent them."""
    if not len(vectors):
        return None
    _, found = reader.search(vectors, k, nprobe)
    return round(float(hits(found, ids, k).mean()), 4)
