"""Split a catalog into work units and find what must be rejected before decoding.

A unit is a range of whole row groups of one file (so a decode task reads exactly its
bytes and nothing else). Its fingerprint covers the file's identity (URI, size, ETag or
mtime), the row-group range and the duplicate rows it must reject: a re-run whose
fingerprint and model match a committed unit skips it.

Duplicate product_ids are a property of the whole catalog, so they are found here, in
catalog order, in bounded memory (contracts.duplicates): the first occurrence is
encoded, later ones become reject rows.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

from mimdex.infra import storage
from mimdex.infra.contracts import catalog, duplicates
from mimdex.infra.errors import DataError
from mimdex.pipelines.encode.config import Unit

UNIT_FORMAT = "mimdex-encode-unit/1"


def _read_file_facts(uri: str) -> dict:
    fs, path = storage.resolve(uri)
    with catalog.open_file(uri) as pf:
        columns = catalog.check_schema(uri, pf.schema_arrow)
        meta = pf.metadata
    info = fs.info(path)
    return {
        "uri": uri,
        "columns": columns,
        "row_group_rows": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
        "identity": {"size": int(info.get("size") or 0),
                     "version": str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")},
    }


def _read_ids(uri: str):
    with catalog.open_file(uri) as pf:
        return pf.read(columns=["product_id"]).column("product_id").combine_chunks()


def fingerprint(unit_facts: dict) -> str:
    body = json.dumps({"format": UNIT_FORMAT, **unit_facts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def plan_units(catalog_uri: str, unit_rows: int, threads: int = 8) -> tuple[list[Unit], dict]:
    """The work units of a catalog (stable order and ids) and facts for the report."""
    uris, root = catalog.catalog_files(catalog_uri)
    with ThreadPoolExecutor(max(1, min(threads, len(uris)))) as pool:
        files = list(pool.map(_read_file_facts, uris))
    kinds = {f["columns"] for f in files}
    if len(kinds) > 1:
        raise DataError(f"catalog {catalog_uri}: files disagree on the image/title columns: "
                        + "; ".join(f"{f['uri']}: {f['columns']}" for f in files))
    dups = duplicates.find(uris, lambda i: _read_ids(uris[i]), sum(sum(f["row_group_rows"]) for f in files), threads)
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
    columns = files[0]["columns"]
    return units, {"root": root, "files": len(files), "rows": sum(u.rows for u in units),
                   "image_column": columns.image, "title_kind": columns.title,
                   "duplicate_rows": len(dups)}
