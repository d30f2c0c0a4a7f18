"""Deletion files of embeddings parts: the product_ids that later refresh runs superseded
in a part (re-encoded, re-judged, deleted, retagged), as the index's delta segments record
their deletions: in a file, not in the manifest.

    runs/<run>/deleted/<part>.parquet   product_id (sorted): every id superseded in that
                                        part so far, by this run and the ones before it

A part's manifest entry names its newest deletion file (``PartEntry.deleted``), so a
reader reads one small file per part (at most the part's own rows), verified against its
sha256, and a manifest is the same size whatever the change. Entries written before
deletion files existed list the ids inline (``exclude``); a run that touches such a part
folds them into its file.
"""
from __future__ import annotations

import functools

import pyarrow as pa

from mimdex.infra import storage
from mimdex.infra.contracts.files import FileRef, read_table_checked, write_parquet

SCHEMA = pa.schema([("product_id", pa.string())])
RECORDED_IN = "the embeddings manifest"


def read(root: str, ref: FileRef | None) -> pa.Array:
    """The ids a deletion file holds (exit 65 naming it when it is not as recorded)."""
    if ref is None:
        return pa.array([], pa.string())
    return _read(storage.join(root, ref.file), root, ref)


@functools.lru_cache(maxsize=256)   # every column read of a part reads its deletions: once per process
def _read(uri: str, root: str, ref: FileRef) -> pa.Array:
    table = read_table_checked(root, ref, "embeddings deletion file", RECORDED_IN, columns=["product_id"])
    return table.column("product_id").combine_chunks()


def write(root: str, run_prefix: str, part: str, ids: set[str], previous: FileRef | None,
          inline: tuple[str, ...] = ()) -> FileRef:
    """The part's next deletion file, under ``run_prefix`` (``runs/<run>``): ``ids``, the
    previous file's and any ``inline`` ones (a legacy entry's ``exclude``)."""
    every = set(read(root, previous).to_pylist()) | set(inline) | set(ids)
    table = pa.table({"product_id": pa.array(sorted(every), pa.string())}, schema=SCHEMA)
    return write_parquet(root, f"{run_prefix}/deleted/{part}.parquet", table)
