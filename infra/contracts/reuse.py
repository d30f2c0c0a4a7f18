"""The reuse table a multi-photo refresh hands its encode (docs/contracts.md, "Photos"):
the current image vectors of changed products by (product_id, photo_sha256), so that a
photo the product still has is copied, not encoded again.

    runs/<run>/input/reuse.parquet   product_id, photo_sha256, image_emb (sorted by product_id)
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from mimdex.infra import storage
from mimdex.infra.contracts.embeddings import EmbeddingsManifest, has_photos, read_part
from mimdex.infra.contracts.files import write_parquet


def write_reuse(root: str, manifest: EmbeddingsManifest, where: dict[str, str], products: set[str],
                out_root: str, name: str) -> str | None:
    """The reuse table a multi-photo refresh hands its encode: the current image vectors of
    ``products`` by (product_id, photo_sha256), sorted by product_id so a decode task reads
    only its row groups (``read_reuse``). None for a single-image catalog or no such rows."""
    wanted = pa.array(sorted(products), pa.string())
    tables = []
    for entry in (e for e in manifest.parts if e.name in {where[p] for p in products if p in where}):
        part = read_part(root, entry, manifest.model, manifest.dtype)
        if not has_photos(part):
            return None
        tables.append(part.filter(pc.is_in(part["product_id"], wanted)).select(["product_id", "photo_sha256",
                                                                                 "image_emb"]))
    if not tables:
        return None
    write_parquet(out_root, name, pa.concat_tables(tables).sort_by("product_id"), row_group_size=4096)
    return storage.join(out_root, name)


def read_reuse(uri: str, product_ids: list[str]) -> tuple[dict[tuple[str, str], int], pa.Table]:
    """(product_id, photo_sha256) -> row, and the rows of the reuse table for these products."""
    table = storage.parquet_dataset(uri).to_table(filter=pc.field("product_id").isin(product_ids))
    keys = zip(table.column("product_id").to_pylist(), table.column("photo_sha256").to_pylist())
    return {key: row for row, key in enumerate(keys)}, table
