"""Parquet files that others read: written whole with their checksum, read back with
errors that name the file (exit 65), never an Arrow traceback."""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Callable, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.infra.errors import DataError

T = TypeVar("T")


@dataclass(frozen=True)
class FileRef:
    """A file a manifest lists: its path relative to the manifest's root, checksum, size."""

    file: str
    sha256: str
    bytes: int
    rows: int | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, obj: dict | None) -> "FileRef | None":
        if obj is None:
            return None
        return cls(file=obj["file"], sha256=obj["sha256"], bytes=int(obj["bytes"]), rows=obj.get("rows"))


def _floats(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or (pa.types.is_list(t) or pa.types.is_fixed_size_list(t)) and _floats(t.value_type)


def encodings(schema: pa.Schema) -> dict:
    """Parquet writer options per column. Floating-point columns (embeddings) are stored
    plain: a dictionary of fp16 values never pays and zstd saves 3% of them, while
    decoding both made reading a 250k x 256 part 6x slower (2.1 s against 0.35 s).
    Strings, ids and flags keep dictionaries and zstd."""
    plain = {f.name for f in schema if _floats(f.type)}
    return {"use_dictionary": [f.name for f in schema if f.name not in plain],
            "compression": {f.name: "none" if f.name in plain else "zstd" for f in schema}}


def use_system_memory_pool() -> None:
    """Arrow buffers from the C library's allocator, in this process and the ones it starts.

    pyarrow's default pool (mimalloc) keeps freed pages for reuse: a job that reads a
    128 MB embeddings part, converts it and lets it go kept 670 MB it no longer used
    (build-index at 1M: the launcher sat at 1.05 GB through the Beam job, and peaked at
    1.24 GB sampling, against 0.57 GB with the system allocator, which returns large
    frees at once)."""
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"   # read by pyarrow in child processes
    pa.set_memory_pool(pa.system_memory_pool())


def write_parquet(root: str, name: str, table: pa.Table, row_group_size: int | None = None,
                  page_checksums: bool = False) -> FileRef:
    with storage.open_write(storage.join(root, name)) as f:
        pq.write_table(table, f, row_group_size=row_group_size or max(1, table.num_rows),
                       write_page_checksum=page_checksums, **encodings(table.schema))
    return FileRef(name, f.sha256(), f.bytes_written, table.num_rows)


def table_from_bytes(data: bytes, uri: str, what: str, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{what} {uri}: not a readable Parquet file: {exc}") from exc


def read_parquet(uri: str, what: str, columns: list[str] | None = None) -> pa.Table:
    """A whole Parquet file; exit 65 naming it if it is missing, not Parquet or lacks columns."""
    return table_from_bytes(storage.read_bytes(uri), uri, what, columns)


def read_checked(root: str, ref: FileRef, what: str, recorded_in: str) -> bytes:
    """A listed file's bytes, refused (exit 65) unless they match the recorded sha256."""
    return storage.read_verified(storage.join(root, ref.file), ref.sha256, recorded_in)


def consume_checked(root: str, ref: FileRef, recorded_in: str, consume: Callable[[Callable[[int], bytes]], T]) -> T:
    """``consume(read)`` of a listed file streamed (read(n) -> up to n bytes), as
    read_checked but never holding it whole. The stream is hashed as it goes and read to
    its end after ``consume``: a file longer, shorter or other than recorded is refused
    (exit 65), and that refusal comes first when ``consume`` failed on it."""
    uri = storage.join(root, ref.file)
    digest, seen = hashlib.sha256(), [0]
    with storage.open_read(uri) as f:
        def read(n: int) -> bytes:
            chunk = f.read(n)
            digest.update(chunk)
            seen[0] += len(chunk)
            return chunk

        try:
            result, error = consume(read), None
        except Exception as exc:  # noqa: BLE001 - re-raised below unless the bytes explain it
            result, error = None, exc
        while read(1 << 20):
            pass
    if digest.hexdigest() != ref.sha256 or seen[0] != ref.bytes:
        raise storage.not_as_recorded(uri, recorded_in)
    if error is not None:
        raise error
    return result


def read_table_checked(root: str, ref: FileRef, what: str, recorded_in: str,
                       columns: list[str] | None = None) -> pa.Table:
    uri = storage.join(root, ref.file)
    return table_from_bytes(read_checked(root, ref, what, recorded_in), uri, what, columns)


def parquet_metadata(uri: str, what: str) -> pq.FileMetaData:
    """The footer of a Parquet file (schema, row groups) without reading its data."""
    with storage.open_read(uri) as f:
        try:
            return pq.ParquetFile(f).metadata
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{what} {uri}: not a readable Parquet file: {exc}") from exc


def column_bytes(meta: pq.FileMetaData, row_groups, columns) -> int:
    """The stored (compressed) bytes of some columns in some row groups: what a reader of
    just those asks the store for (jobs report it; pyarrow reads on its own IO threads,
    where a per-task count of the bytes cannot follow)."""
    wanted = set(columns)
    return sum(meta.row_group(rg).column(c).total_compressed_size for rg in row_groups
               for c in range(meta.num_columns) if meta.row_group(rg).column(c).path_in_schema in wanted)


def read_dataset(uri: str, what: str, required: tuple[str, ...] = (), columns: list[str] | None = None) -> pa.Table:
    """A Parquet file or directory as one table (or some of its columns); exit 65 naming
    it if unreadable or if a required column is missing."""
    try:
        dataset = storage.parquet_dataset(uri)
        for col in (*required, *(columns or ())):
            if col not in dataset.schema.names:
                raise DataError(f"{what} {uri}: missing required column '{col}' (has {dataset.schema.names})")
        return dataset.to_table(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{what} {uri}: not a readable Parquet file or directory: {exc}") from exc
