"""What changed between the catalog and the embeddings, by content_hash.

content_hash covers the image bytes, the title and the model sha256 (decode.py), so a
new image, a retitled product or a new model all show up as "changed".
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.pipelines.encode import shards
from mimdex.pipelines.encode.decode import content_hash, resolve_uri
from mimdex.pipelines.encode.plan import catalog_files, check_schema


@dataclass
class Diff:
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0
    unindexable: int = 0  # rows encode would reject (empty id/title, no image): never indexed

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.deleted)

    def counts(self) -> dict:
        return {"new": len(self.new), "changed": len(self.changed), "deleted": len(self.deleted),
                "unchanged": self.unchanged, "unindexable_rows": self.unindexable}


def _file_hashes(uri: str, root: str, model_sha: str) -> tuple[dict[str, str], int]:
    with storage.open_read(uri) as f:
        pf = pq.ParquetFile(f)
        image_col, _ = check_schema(uri, pf.schema_arrow)
        table = pf.read(columns=["product_id", "title", image_col])
    ids = table.column("product_id").to_pylist()
    titles = table.column("title").cast(pa.large_binary()).to_pylist()
    images = table.column(image_col).to_pylist()
    if image_col == "image_uri":
        def fetch(u):
            try:
                return storage.read_bytes(resolve_uri(root, u)) if u else None
            except (storage.ObjectNotFound, ValueError):
                return None
        with ThreadPoolExecutor(16) as pool:
            images = list(pool.map(fetch, images))
    out, bad = {}, 0
    for pid, title, image in zip(ids, titles, images):
        try:
            text = title.decode("utf-8") if title else ""
        except UnicodeDecodeError:
            text = ""
        if not pid or not text.strip() or not image or pid in out:
            bad += 1
            continue
        out[pid] = content_hash(image, text, model_sha)
    return out, bad


def catalog_hashes(catalog: str, model_sha: str) -> tuple[dict[str, str], int]:
    """product_id -> content_hash of every indexable catalog row (first occurrence wins)."""
    files, root = catalog_files(catalog)
    merged: dict[str, str] = {}
    bad = 0
    for uri in files:
        hashes, b = _file_hashes(uri, root, model_sha)
        bad += b
        for pid, h in hashes.items():
            if pid in merged:
                bad += 1
            else:
                merged[pid] = h
    return merged, bad


def embedding_hashes(root: str, manifest: dict) -> tuple[dict[str, str], dict[str, str]]:
    """product_id -> content_hash of every live row of an embeddings manifest, and
    product_id -> the name of the part that holds it."""
    hashes: dict[str, str] = {}
    where: dict[str, str] = {}
    for entry in manifest["parts"]:
        fs, path = storage.resolve(storage.join(root, entry["part"]["file"]))
        table = shards.live_rows(pq.read_table(path, filesystem=fs, columns=["product_id", "content_hash"]), entry)
        pids = table.column("product_id").to_pylist()
        hashes.update(zip(pids, table.column("content_hash").to_pylist()))
        where.update((p, entry["name"]) for p in pids)
    return hashes, where


def diff(current: dict[str, str], previous: dict[str, str], unindexable: int = 0) -> Diff:
    d = Diff(unindexable=unindexable)
    for pid, h in current.items():
        old = previous.get(pid)
        if old is None:
            d.new.append(pid)
        elif old != h:
            d.changed.append(pid)
        else:
            d.unchanged += 1
    d.deleted = sorted(set(previous) - set(current))
    d.new.sort()
    d.changed.sort()
    return d
