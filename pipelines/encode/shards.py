"""Embedding shards on storage: part files, reject files, commit markers, the manifest.

Layout under an embeddings root (DESIGN.md, "Embedding shards"):

    part-00042.parquet           product_id, image_emb, text_emb, content_hash
    rejects/part-00042.parquet   product_id, reason, detail, source, row
    _commits/part-00042.json     written after the part (and its rejects): the unit is done
    manifest.json                written last, only when every unit is committed

A commit marker is the unit's durable "done": a driver killed at any point loses at
most the units whose markers were not yet written, and a re-run recomputes only those.
"""
from __future__ import annotations

import datetime as dt
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.pipelines.encode.config import Unit
from mimdex.pipelines.encode.decode import REJECT_SCHEMA

MANIFEST_FORMAT = "mimdex-embeddings/1"
PA_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def part_schema(d: int, dtype: str, has_text: bool, metadata: dict[str, str]) -> pa.Schema:
    # An image-only model has no text tower, so its parts have no text_emb column (an
    # all-null fixed_size_list column does not survive a Parquet round trip in pyarrow).
    vec = pa.list_(PA_DTYPES[dtype], d)
    fields = [("product_id", pa.string()), ("image_emb", vec)] + ([("text_emb", vec)] if has_text else [])
    return pa.schema(fields + [("content_hash", pa.string())],
                     metadata={f"mimdex.{k}": str(v) for k, v in metadata.items()})


def _vectors(emb: np.ndarray, d: int, dtype: str) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(emb, dtype=dtype).reshape(-1), PA_DTYPES[dtype])
    return pa.FixedSizeListArray.from_arrays(flat, d)


def _write_parquet(uri: str, table: pa.Table) -> dict:
    with storage.open_write(uri) as f:
        pq.write_table(table, f, compression="zstd", row_group_size=max(1, table.num_rows))
    return {"rows": table.num_rows, "sha256": f.sha256(), "bytes": f.bytes_written}


def write_unit(out: str, unit: Unit, meta: dict, emb: dict, model: dict, dtype: str) -> dict:
    """Write one unit's part (and rejects) whole; return what its commit marker records."""
    t0 = time.perf_counter()
    n, d = len(meta["product_ids"]), model["d"]
    if emb["image_emb"].shape != (n, d):
        raise RuntimeError(f"{unit.name}: encoder returned {emb['image_emb'].shape}, expected {(n, d)}")
    schema = part_schema(d, dtype, model["has_text"], {"model_sha256": model["sha256"], "variant": model["variant"], "d": d,
                                    "dtype": dtype, "unit": unit.name, "fingerprint": unit.fingerprint})
    columns = [pa.array(meta["product_ids"], pa.string()), _vectors(emb["image_emb"], d, dtype)]
    if model["has_text"]:
        columns.append(_vectors(emb["text_emb"], d, dtype))
    table = pa.table(columns + [pa.array(meta["content_hash"], pa.string())], schema=schema)
    part = {"file": f"{unit.name}.parquet", **_write_parquet(storage.join(out, f"{unit.name}.parquet"), table)}
    rejects = None
    if meta["rejects"]:
        rej = pa.Table.from_pylist(meta["rejects"], REJECT_SCHEMA)
        name = f"rejects/{unit.name}.parquet"
        rejects = {"file": name, **_write_parquet(storage.join(out, name), rej),
                   "reasons": dict(Counter(r["reason"] for r in meta["rejects"]))}
    elif storage.exists(stale := storage.join(out, f"rejects/{unit.name}.parquet")):
        storage.delete(stale)  # an earlier run of this unit had rejects; this one has none
    seconds = {**meta["seconds"], "encode": emb["seconds"], "write": time.perf_counter() - t0}
    return {"name": unit.name, "unit": unit.index, "fingerprint": unit.fingerprint, "source": unit.file,
            "row_groups": list(unit.row_groups), "input_rows": unit.rows, "part": part,
            "rejects": rejects, "model_sha256": model["sha256"], "dtype": dtype, "seconds": seconds}


def marker_uri(out: str, name: str) -> str:
    return storage.join(out, "_commits", f"{name}.json")


def commit(out: str, record: dict) -> None:
    storage.write_json(marker_uri(out, record["name"]), record)


def committed(out: str) -> dict[str, dict]:
    """Commit markers present under ``out`` (name -> record)."""
    root = storage.join(out, "_commits")
    if not storage.exists(root):
        return {}
    records = {}
    for uri in storage.list_files(root, ".json"):
        record = storage.read_json(uri)
        records[record["name"]] = record
    return records


def still_valid(out: str, record: dict | None, unit: Unit, model_sha256: str, dtype: str) -> bool:
    """A marker counts only for the same input, model and dtype, with its part in place."""
    if not record or (record["fingerprint"], record["model_sha256"], record["dtype"]) != (
            unit.fingerprint, model_sha256, dtype):
        return False
    files = [record["part"]] + ([record["rejects"]] if record["rejects"] else [])
    return all(storage.exists(storage.join(out, f["file"])) and storage.size(storage.join(out, f["file"])) == f["bytes"]
               for f in files)


def manifest_uri(out: str) -> str:
    return storage.join(out, "manifest.json")


def build_manifest(records: list[dict], model: dict, dtype: str, catalog: str, unit_rows: int) -> dict:
    reasons: Counter[str] = Counter()
    for r in records:
        reasons.update((r["rejects"] or {}).get("reasons", {}))
    return {
        "format": MANIFEST_FORMAT,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model, "dtype": dtype, "catalog": catalog, "unit_rows": unit_rows,
        "counts": {"input_rows": sum(r["input_rows"] for r in records),
                   "encoded": sum(r["part"]["rows"] for r in records),
                   "rejected": sum((r["rejects"] or {}).get("rows", 0) for r in records),
                   "rejects_by_reason": dict(sorted(reasons.items()))},
        "parts": [{k: r[k] for k in ("name", "unit", "fingerprint", "source", "row_groups", "input_rows",
                                       "part", "rejects")} for r in records],
    }


def read_manifest(root: str, name: str = "manifest.json") -> dict:
    """The manifest of a complete embeddings root, or exit 65 saying why it is not one."""
    return storage.read_manifest(storage.join(root, name), MANIFEST_FORMAT,
                                 f"embeddings {root}: no manifest.json (the encode run has not completed)")


def remove_orphans(out: str, keep: set[str]) -> list[str]:
    """Delete parts, rejects and markers of units no longer in the plan (a shrunken catalog)."""
    removed = []
    for folder, suffix in (("", ".parquet"), ("rejects", ".parquet"), ("_commits", ".json")):
        base = storage.join(out, folder) if folder else out
        if not storage.exists(base):
            continue
        for uri in storage.list_files(base, suffix):
            name = uri.rsplit("/", 1)[-1].removesuffix(suffix)
            if name.startswith("part-") and name not in keep:
                storage.delete(uri)
                removed.append(uri)
    return removed


def live_rows(table: pa.Table, entry: dict) -> pa.Table:
    """A part's rows minus the product_ids a refresh superseded or deleted (``exclude``):
    a composite manifest reuses a part instead of rewriting it."""
    excluded = entry.get("exclude")
    if not excluded:
        return table
    import pyarrow.compute as pc

    return table.filter(pc.invert(pc.is_in(table["product_id"], pa.array(excluded, pa.string()))))


def read_files(root: str, manifest: dict, which: str = "part") -> pa.Table:
    """All part (or rejects) tables a manifest lists, concatenated in unit order."""
    tables = []
    for entry in manifest["parts"]:
        if entry[which]:
            fs, path = storage.resolve(storage.join(root, entry[which]["file"]))
            table = pq.read_table(path, filesystem=fs)
            tables.append(live_rows(table, entry) if which == "part" else table)
    if not tables:
        return REJECT_SCHEMA.empty_table() if which == "rejects" else pa.table({"product_id": pa.array([], pa.string())})
    return pa.concat_tables(tables)


def write_vectors(root: str, vectors: np.ndarray, product_ids: list[str], model: dict, dtype: str = "float16",
                  parts: int = 1, text_vectors: np.ndarray | None = None) -> dict:
    """An embeddings root from vectors computed elsewhere (an import, a benchmark, a test):
    the same parts and manifest encode writes, content_hash "-" (no catalog behind them).
    ``model`` needs uri, sha256, variant, d, has_text. Returns the manifest."""
    d = model["d"]
    records = []
    for i, sl in enumerate(np.array_split(np.arange(len(product_ids)), max(1, parts))):
        name = f"part-{i:05d}"
        schema = part_schema(d, dtype, model["has_text"], {"model_sha256": model["sha256"], "variant": model["variant"],
                                                           "d": d, "dtype": dtype, "unit": name, "fingerprint": "-"})
        cols = [pa.array([product_ids[j] for j in sl], pa.string()), _vectors(vectors[sl], d, dtype)]
        if model["has_text"]:
            cols.append(_vectors((vectors if text_vectors is None else text_vectors)[sl], d, dtype))
        table = pa.table(cols + [pa.array(["-"] * len(sl), pa.string())], schema=schema)
        info = _write_parquet(storage.join(root, f"{name}.parquet"), table)
        records.append({"name": name, "unit": i, "fingerprint": "-", "source": None, "row_groups": [],
                        "input_rows": len(sl), "part": {"file": f"{name}.parquet", **info}, "rejects": None})
    manifest = build_manifest(records, model, dtype, "-", 0)
    storage.write_json(manifest_uri(root), manifest)
    return manifest
