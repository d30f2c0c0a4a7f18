"""The next index version from the previous one: its trained quantizer and codebooks are
reused, ids of deleted and changed products removed, the new vectors added.

Drift decides whether that is good enough: the mean coarse-quantisation error of the new
vectors against the error the quantizer was trained to (and the share of the catalog
that changed). Past either threshold the caller retrains with a full build.
"""
from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimdex.indexing.ids import check_unique, ids_for
from mimdex.indexing.publish import read_checked
from mimdex.indexing.train import deserialize
from mimdex.infra import storage
from mimdex.infra.errors import DataError
from mimdex.pipelines.build_index.graph import (BuildSpec, decoded_lists, encoded_lists, index_rows, split_codes,
                                                 write_shard)


def new_vectors(spec: BuildSpec, entries: list[dict]) -> tuple[np.ndarray, np.ndarray, pa.Table | None, dict]:
    """Vectors, ids and id-map rows (with catalog metadata) of the delta parts."""
    parts = [index_rows(spec, entry) for entry in entries]
    skipped: dict[str, int] = {}
    for part in parts:
        for reason, count in part.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), None, skipped
    idmap = pa.concat_tables([p.idmap for p in parts], promote_options="permissive")
    return np.concatenate([p.vectors for p in parts]), idmap.column("id").to_numpy(), idmap, skipped


def drift(trained: bytes, vectors: np.ndarray, training: dict | None) -> dict:
    """Coarse-quantisation MSE of the new vectors vs the training MSE."""
    if not len(vectors):
        return {"new_vectors": 0, "coarse_mse": None, "training_mse": (training or {}).get("coarse_mse"), "ratio": None}
    index = deserialize(trained)  # keep the owner alive while its quantizer is used
    quantizer = faiss.extract_index_ivf(index).quantizer
    dist, _ = quantizer.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    mse = float(dist.mean())
    base = (training or {}).get("coarse_mse")
    return {"new_vectors": int(len(vectors)), "coarse_mse": round(mse, 6), "training_mse": base,
            "ratio": round(mse / base, 4) if base else None}


def update_shards(spec: BuildSpec, prev_dir: str, prev: dict, trained: bytes, remove: list[str],
                  vectors: np.ndarray, ids: np.ndarray, idmap: pa.Table | None) -> list[dict]:
    """Write the new version's shards: previous minus ``remove`` (product_ids) plus the new rows.

    Works on the stored (flat) inverted lists: rows are filtered and the new vectors'
    codes (faiss ``sa_encode`` with the reused trained index) appended, then written as
    build-index writes them. (Removing from faiss's in-memory fast-scan blocks and adding
    after it corrupted the re-added codes in faiss-cpu 1.15.1; see the README.)
    """
    index = deserialize(trained)
    ivf = faiss.extract_index_ivf(index)
    remove_ids = ids_for(remove)
    new_lists, new_codes = (split_codes(ivf.nlist, index.sa_encode(np.ascontiguousarray(vectors)))
                            if len(ids) else (np.zeros(0, np.int64), np.zeros((0, ivf.code_size), np.uint8)))
    shard_of = ids % spec.shards
    records = []
    for entry in prev["shards"]:
        shard = entry["shard"]
        old_ids, old_lists, old_codes = decoded_lists(
            read_checked(storage.join(prev_dir, entry["index"]["file"]), entry["index"]))
        ids_table = pq.read_table(pa.BufferReader(read_checked(storage.join(prev_dir, entry["ids"]["file"]), entry["ids"])))
        keep = ~np.isin(old_ids, remove_ids)
        ids_table = ids_table.filter(pc.invert(pc.is_in(ids_table["id"], pa.array(remove_ids, pa.int64()))))
        sel = np.flatnonzero(shard_of == shard)
        all_ids = np.concatenate([old_ids[keep], ids[sel]])
        if len(sel):
            ids_table = pa.concat_tables([ids_table, idmap.take(pa.array(sel))], promote_options="permissive")
        check_unique(ids_table.column("id").to_numpy(), ids_table.column("product_id").to_pylist(),
                     f"shard {entry['name']}")
        if len(all_ids) != ids_table.num_rows:
            raise DataError(f"shard {entry['name']}: {len(all_ids)} vectors but {ids_table.num_rows} id map rows "
                            "after the update (the previous version's id map and index disagree)")
        blob = encoded_lists(ivf.nlist, ivf.code_size, all_ids, np.concatenate([old_lists[keep], new_lists[sel]]),
                             np.concatenate([old_codes[keep], new_codes[sel]]))
        records.append(write_shard(spec, shard, blob, len(all_ids), ids_table.sort_by("id")))
    return records


def self_recall(reader, vectors: np.ndarray, ids: np.ndarray, nprobe: int, k: int = 10) -> float | None:
    """Share of vectors that find their own id in the top k: how well the reused
    codebooks represent them."""
    if not len(vectors):
        return None
    _, found = reader.search(vectors, k, nprobe)
    return round(float((found == ids[:, None]).any(1).mean()), 4)
