"""The next index version from the previous one: its trained quantizer and codebooks are
reused, ids of changed and deleted products removed, the new vectors added.

Drift decides whether that is good enough: the mean coarse-quantisation error of the new
vectors against the error the quantizer was trained to (and the share of the catalog
that changed). Past either threshold the caller retrains with a full build. No Beam here:
the update works on the stored inverted lists directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.embeddings import EmbeddingsManifest, PartEntry
from mimdex.infra.contracts.recall import hits
from mimdex.infra.contracts.vectors import check_unique, labels, merge_skipped, shard_of, usable_rows
from mimdex.infra.errors import DataError


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


def update_shards(version_dir: str, prev_dir: str, prev: iv.IndexManifest, trained: bytes, remove: set[str],
                  delta: Delta) -> tuple[iv.ShardEntry, ...]:
    """Write the new version's shards: previous minus ``remove`` (product_ids) plus the delta.

    Works on the stored (flat) inverted lists: rows are filtered and the new vectors'
    codes (faiss ``sa_encode`` with the reused trained index) appended. (Removing from
    faiss's in-memory fast-scan blocks and adding after it corrupted the re-added codes
    in faiss-cpu 1.15.1; see docs/operations.md.)
    """
    nlist, code_size = codec.lists_shape(trained)
    removed = pa.array(sorted(remove), pa.string())
    new_lists, new_codes = codec.encode(codec.deserialize(trained), delta.vectors)
    shards = shard_of(delta.keys, len(prev.shards))
    records = []
    for entry in prev.shards:
        lists_blob, ids_table = iv.read_shard(prev_dir, entry)
        old_ids, old_lists, old_codes = codec.decoded_lists(lists_blob)
        # every vector of a removed product (all its photos) goes, found by product_id in the id map
        gone = pc.fill_null(pc.is_in(ids_table["product_id"], removed), False)
        keep = ~np.isin(old_ids, ids_table.filter(gone).column("id").to_numpy())
        ids_table = ids_table.filter(pc.invert(gone))
        sel = np.flatnonzero(shards == entry.shard)
        all_ids = np.concatenate([old_ids[keep], delta.ids[sel]])
        if len(sel):
            ids_table = pa.concat_tables([ids_table, delta.idmap.take(pa.array(sel, pa.int64()))],
                                         promote_options="permissive")
        check_unique(ids_table.column("id").to_numpy(), labels(ids_table), f"shard {entry.name}")
        if len(all_ids) != ids_table.num_rows:
            raise DataError(f"shard {entry.name}: {len(all_ids)} vectors but {ids_table.num_rows} id map rows "
                            "after the update (the previous version's id map and index disagree)")
        blob = codec.encoded_lists(nlist, code_size, all_ids, np.concatenate([old_lists[keep], new_lists[sel]]),
                                   np.concatenate([old_codes[keep], new_codes[sel]]))
        records.append(iv.write_shard(version_dir, entry.shard, blob, len(all_ids), ids_table))
    return tuple(records)


def self_recall(reader, vectors: np.ndarray, ids: np.ndarray, nprobe: int, k: int = 10) -> float | None:
    """Share of vectors that find their own id in the top k: how well the reused
    codebooks represent them."""
    if not len(vectors):
        return None
    _, found = reader.search(vectors, k, nprobe)
    return round(float(hits(found, ids, k).mean()), 4)
