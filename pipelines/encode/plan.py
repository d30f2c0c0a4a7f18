"""Split a catalog into work units and find what must be rejected before decoding.

A unit is a range of whole row groups of one file (so a decode task reads exactly its
bytes and nothing else). Its fingerprint covers the file's identity (URI, size, ETag or
mtime), the row-group range and the duplicate rows it must reject: a re-run whose
fingerprint and model match a committed unit skips it.

Duplicate product_ids are a property of the whole catalog, so they are found here, in
catalog order: the first occurrence is encoded, later ones become reject rows.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.infra.errors import DataError
from mimdex.pipelines.encode.config import Unit

UNIT_FORMAT = "mimdex-encode-unit/1"

STRING = (pa.types.is_string, pa.types.is_large_string)
BINARY = (pa.types.is_binary, pa.types.is_large_binary)


def _is(t: pa.DataType, kinds) -> bool:
    return any(check(t) for check in kinds)


def catalog_files(catalog: str) -> tuple[list[str], str]:
    """Sorted Parquet file URIs of the catalog, and the root relative image_uris resolve against."""
    dataset = storage.parquet_dataset(catalog)
    fs, path = storage.resolve(catalog)
    files = sorted(dataset.files)
    if not files:
        raise DataError(f"catalog {catalog}: no Parquet files found")
    root = catalog if fs.isdir(path) else posixpath.dirname(str(catalog).rstrip("/"))
    return [fs.unstrip_protocol(f) for f in files], root


def check_schema(uri: str, schema: pa.Schema) -> tuple[str, str]:
    """(image column, title kind) for a catalog file, or exit 65 naming column and file."""
    names = set(schema.names)

    def need(col: str, kinds, expected: str) -> None:
        if col not in names:
            raise DataError(f"catalog {uri}: missing required column '{col}' ({expected})")
        if not _is(schema.field(col).type, kinds):
            raise DataError(f"catalog {uri}: column '{col}' has type {schema.field(col).type}; "
                            f"expected {expected}")

    need("product_id", STRING, "string")
    if "title" in names and _is(schema.field("title").type, BINARY):
        title_kind = "binary"
    else:
        need("title", STRING, "string")
        title_kind = "string"
    if "image" in names:
        need("image", BINARY, "binary: encoded JPEG/PNG/WebP bytes")
        return "image", title_kind
    if "image_uri" in names:
        need("image_uri", STRING, "string: an fsspec URI, relative to the catalog root")
        return "image_uri", title_kind
    raise DataError(f"catalog {uri}: missing required column 'image' (binary) or 'image_uri' (string)")


def _read_file_facts(uri: str) -> dict:
    fs, path = storage.resolve(uri)
    with storage.open_read(uri) as f:
        try:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            columns = check_schema(uri, schema)
            ids = pf.read(columns=["product_id"]).column("product_id")
        except DataError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"catalog {uri}: not a readable Parquet file: {exc}") from exc
    info = fs.info(path)
    meta = pf.metadata
    return {
        "uri": uri,
        "columns": columns,
        "row_group_rows": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
        "ids": ids,
        "identity": {"size": int(info.get("size") or 0),
                     "version": str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")},
    }


def _duplicates(files: list[dict]) -> dict[tuple[int, int], str]:
    """(file index, row) -> where the first occurrence is, for every repeat of a product_id."""
    ids = pa.chunked_array([f["ids"].cast(pa.large_string()) for f in files], pa.large_string())
    file_of = np.concatenate([np.full(len(f["ids"]), i, np.int64) for i, f in enumerate(files)])
    row_of = np.concatenate([np.arange(len(f["ids"]), dtype=np.int64) for f in files])
    table = pa.table({"id": ids, "pos": np.arange(len(ids), dtype=np.int64)})
    table = table.filter(pc.and_(pc.is_valid(table["id"]), pc.not_equal(table["id"], "")))
    order = pc.sort_indices(table, sort_keys=[("id", "ascending"), ("pos", "ascending")])
    table = table.take(order)
    sorted_ids = table["id"].combine_chunks()
    same = np.zeros(len(table), bool)
    if len(table) > 1:
        same[1:] = pc.equal(sorted_ids[1:], sorted_ids[:-1]).to_numpy(zero_copy_only=False)
    pos = table["pos"].to_numpy()
    # each row of a run of equal ids points at the run's first row: the one that is kept
    run_start = np.maximum.accumulate(np.where(same, 0, np.arange(len(table))))
    out: dict[tuple[int, int], str] = {}
    for i in np.flatnonzero(same):
        keep = pos[run_start[i]]
        out[(int(file_of[pos[i]]), int(row_of[pos[i]]))] = (
            f"{files[file_of[keep]]['uri']} row {int(row_of[keep])}")
    return out


def fingerprint(unit_facts: dict) -> str:
    body = json.dumps({"format": UNIT_FORMAT, **unit_facts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def plan_units(catalog: str, unit_rows: int, threads: int = 8) -> tuple[list[Unit], dict]:
    """The work units of a catalog (stable order and ids) and facts for the report."""
    uris, root = catalog_files(catalog)
    with ThreadPoolExecutor(max(1, min(threads, len(uris)))) as pool:
        files = list(pool.map(_read_file_facts, uris))
    kinds = {f["columns"] for f in files}
    if len(kinds) > 1:
        raise DataError(f"catalog {catalog}: files disagree on the image/title columns: "
                        + "; ".join(f"{f['uri']}: {f['columns']}" for f in files))
    dups = _duplicates(files)
    units: list[Unit] = []
    for fi, f in enumerate(files):
        group: list[int] = []
        start = rows = 0
        sizes = f["row_group_rows"]
        for rg, n in enumerate(sizes):
            group.append(rg)
            rows += n
            if rows >= unit_rows or rg == len(sizes) - 1:
                dup = tuple((r - start, dups[(fi, r)]) for r in range(start, start + rows) if (fi, r) in dups)
                facts = {"file": f["uri"], **f["identity"], "row_groups": group, "first_row": start,
                         "rows": rows, "duplicates": dup}
                units.append(Unit(len(units), f["uri"], tuple(group), start, rows, dup, fingerprint(facts)))
                group, start, rows = [], start + rows, 0
    image_column, title_kind = files[0]["columns"]
    return units, {"root": root, "files": len(files), "rows": sum(u.rows for u in units),
                   "image_column": image_column, "title_kind": title_kind,
                   "duplicate_rows": len(dups)}
