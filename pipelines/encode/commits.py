"""Encode's commit protocol: each unit's part (and rejects) written whole, then its commit
marker; the manifest (contracts.embeddings) only when every unit is committed.

    _commits/part-00042.json     the unit is done: its PartEntry + model sha256, dtype, timings

A commit marker is the unit's durable "done": a driver killed at any point loses at
most the units whose markers were not yet written, and a re-run recomputes only those.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts.model import ModelRef
from mimdex.pipelines.encode.config import DecodedUnit, Unit


@dataclass(frozen=True)
class Commit:
    entry: emb.PartEntry
    model_sha256: str
    dtype: str
    seconds: dict
    nodes: dict = field(default_factory=dict)  # {"decode": node id, "encode": node id}
    retries: int = 0               # storage retries its decode and write tasks needed
    photos: dict = field(default_factory=dict)  # a multi-photo unit: photos encoded, reused, cut

    def to_json(self) -> dict:
        return {**self.entry.to_json(), "model_sha256": self.model_sha256, "dtype": self.dtype,
                "seconds": self.seconds, "nodes": self.nodes, "retries": self.retries,
                **({"photos": self.photos} if self.photos else {})}

    @classmethod
    def from_json(cls, obj: dict) -> "Commit":
        return cls(emb.PartEntry.from_json(obj), obj["model_sha256"], obj["dtype"], dict(obj.get("seconds", {})),
                   dict(obj.get("nodes") or {}), int(obj.get("retries", 0)), dict(obj.get("photos") or {}))


def write_unit(out: str, unit: Unit, decoded: DecodedUnit, vectors: dict, model: ModelRef, dtype: str) -> Commit:
    """Write one unit's part (and rejects) whole; return what its commit marker records."""
    t0, retries = time.perf_counter(), storage.retry_count()
    multi = decoded.photos is not None  # a multi-photo catalog: rejects name the photo
    rejects = [{"product_id": r.product_id, "reason": r.problem.reason, "detail": r.problem.detail,
                "source": unit.file, "row": r.row, "content_hash": r.state, **({"photo": r.photo} if multi else {})}
               for r in decoded.rejects]
    keep = np.ones(len(decoded.product_ids), bool)
    for pos, reason, detail in vectors.get("late_rejects", ()):  # images the encoder actor could not decode
        keep[pos] = False
        rejects.append({"product_id": decoded.product_ids[pos], "reason": reason, "detail": detail,
                        "source": unit.file, "row": decoded.rows[pos],
                        "content_hash": (decoded.sources[1] if decoded.sources else decoded.content_hashes)[pos],
                        **({"photo": decoded.photos[pos]} if multi else {})})
    rejects.sort(key=lambda r: (r["row"], -1 if r.get("photo") is None else r["photo"]))
    text = vectors["text_emb"][keep] if vectors["text_emb"] is not None else None
    table = emb.part_table(model, dtype, unit.name, unit.fingerprint,
                           [p for p, k in zip(decoded.product_ids, keep) if k],
                           [h for h, k in zip(decoded.content_hashes, keep) if k], vectors["image_emb"][keep], text,
                           [p for p, k in zip(decoded.photos, keep) if k] if multi else None,
                           [h for h, k in zip(decoded.photo_sha256, keep) if k] if multi else None,
                           tuple([v for v, k in zip(col, keep) if k] for col in decoded.sources)
                           if decoded.sources else None)
    part, rej, reasons = emb.write_part(out, unit.name, table, rejects)
    entry = emb.PartEntry(name=unit.name, part=part, rejects=rej, reject_reasons=reasons, unit=unit.index,
                          fingerprint=unit.fingerprint, source=unit.file, row_groups=unit.row_groups,
                          input_rows=unit.rows)
    seconds = {**decoded.seconds, "encode": vectors["seconds"],
               "device_decode": vectors.get("device_decode_seconds", 0.0),
               "transfer": vectors.get("transfer_seconds", 0.0), "write": time.perf_counter() - t0}
    nodes = {k: v for k, v in (("decode", decoded.node), ("encode", vectors.get("node", ""))) if v}
    return Commit(entry, model.sha256, dtype, seconds, nodes, decoded.retries + storage.retry_count() - retries,
                  dict(decoded.stats or {}))


def marker_uri(out: str, name: str) -> str:
    return storage.join(out, "_commits", f"{name}.json")


def commit(out: str, record: Commit) -> None:
    storage.write_json(marker_uri(out, record.entry.name), record.to_json())


def committed(out: str) -> dict[str, Commit]:
    """Commit markers present under ``out`` (name -> record)."""
    root = storage.join(out, "_commits")
    if not storage.exists(root):
        return {}
    records = (Commit.from_json(storage.read_json(uri)) for uri in storage.list_files(root, ".json"))
    return {r.entry.name: r for r in records}


def still_valid(out: str, record: Commit | None, unit: Unit, model_sha256: str, dtype: str) -> bool:
    """A marker counts only for the same input, model and dtype, with its files in place."""
    if not record or (record.entry.fingerprint, record.model_sha256, record.dtype) != (
            unit.fingerprint, model_sha256, dtype):
        return False
    files = [record.entry.part] + ([record.entry.rejects] if record.entry.rejects else [])
    return all(storage.exists(uri := storage.join(out, f.file)) and storage.size(uri) == f.bytes for f in files)


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
