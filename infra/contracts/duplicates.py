"""Repeated product_ids across a whole catalog, in memory bounded by a bucket, not by
the catalog.

Catalog order (files sorted, rows in order) decides: the first occurrence is the
product, later ones are rejected. Each file's ids are hashed into buckets and spilled as
a sorted run (one row group per bucket) to a local temporary directory; each bucket is
then read back from every run and sorted alone. A catalog that fits one bucket is
sorted in memory, as it always was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROWS_PER_BUCKET = 4_000_000    # ~ 200 MB of (id, file, row) while a bucket is sorted
_MULT = (np.random.default_rng(0x6d696d).integers(1, 2 ** 63, 64, dtype=np.uint64) | np.uint64(1))


def string_hash(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string (position-weighted byte sum, mixed), vectorised over
    Arrow's buffers: equal strings hash equal, which is all bucketing needs."""
    arr = pc.cast(ids, pa.large_string()).combine_chunks() if isinstance(ids, pa.ChunkedArray) else \
        pc.cast(ids, pa.large_string())
    if len(arr) == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]] if arr.buffers()[2] else \
        np.zeros(0, np.uint8)
    start, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    pos = np.arange(len(data)) - np.repeat(start, lengths)
    with np.errstate(over="ignore"):
        cum = np.concatenate([[np.uint64(0)], np.cumsum(data.astype(np.uint64) * _MULT[pos % 64], dtype=np.uint64)])
        h = cum[start + lengths] - cum[start] + lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return h


def first_in_order(table: pa.Table, key: str, order: list[tuple[str, str]]) -> tuple[pa.Table, np.ndarray]:
    """The one rule of "the first occurrence wins": ``table`` sorted by ``key`` and then
    ``order`` ((column, "ascending" | "descending"), ...), and a mask of each key's first
    row in that order. Catalog order (file, row) picks a product's row for encode, the
    diff and the id map alike; "the newest id map wins" is the same rule on (seq, descending).
    ``key`` must hold no nulls (callers drop rows that are not products first)."""
    table = table.sort_by([(key, "ascending"), *order])
    ids = table[key].combine_chunks()
    first = np.ones(len(ids), bool)
    if len(ids) > 1:
        first[1:] = ~pc.equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    return table, first


def first_positions(product_ids: list) -> dict[str, int]:
    """product_id -> the position of its first row (the product; later rows repeat it);
    null and empty ids are not products."""
    t = pa.table({"id": pa.array(product_ids, pa.string()), "pos": pa.array(np.arange(len(product_ids)))})
    t = t.filter(pc.and_(pc.is_valid(t["id"]), pc.not_equal(t["id"], "")))
    t, first = first_in_order(t, "id", [("pos", "ascending")])
    return dict(zip(t["id"].filter(pa.array(first)).to_pylist(), t["pos"].filter(pa.array(first)).to_pylist()))


def repeats(table: pa.Table, uris: list[str]) -> dict[tuple[int, int], str]:
    """(file, row) -> where its product_id was first seen, for every repeat in ``table``
    (columns id, file, row; null and empty ids are not products and never repeat)."""
    table = table.filter(pc.and_(pc.is_valid(table["id"]), pc.not_equal(table["id"], "")))
    table, first = first_in_order(table, "id", [("file", "ascending"), ("row", "ascending")])
    same = ~first
    files, rows = table["file"].to_numpy(), table["row"].to_numpy()
    run_start = np.maximum.accumulate(np.where(same, 0, np.arange(len(table))))  # each repeat -> its run's first
    return {(int(files[i]), int(rows[i])): f"{uris[files[run_start[i]]]} row {int(rows[run_start[i]])}"
            for i in np.flatnonzero(same)}


def _rows(ids: pa.Array, file: int) -> pa.Table:
    return pa.table({"id": pc.cast(ids, pa.large_string()), "file": pa.array(np.full(len(ids), file, np.int32)),
                     "row": pa.array(np.arange(len(ids), dtype=np.int64))})


def find(uris: list[str], read_ids: Callable[[int], pa.Array], total_rows: int, threads: int = 8,
         rows_per_bucket: int = ROWS_PER_BUCKET) -> dict[tuple[int, int], str]:
    """Every repeated row of the catalog whose files are ``uris``; ``read_ids(i)`` reads
    file i's product_id column. Memory: one file's ids per thread, then one bucket."""
    buckets = max(1, -(-total_rows // rows_per_bucket))
    workers = max(1, min(threads, len(uris)))
    if buckets == 1:
        with ThreadPoolExecutor(workers) as pool:
            tables = list(pool.map(lambda i: _rows(read_ids(i), i), range(len(uris))))
        return repeats(pa.concat_tables(tables), uris) if tables else {}
    spill = tempfile.mkdtemp(prefix="mimdex-dups-")
    try:
        def run(i: int) -> list[int]:  # file i -> a sorted run, one row group per bucket
            t = _rows(read_ids(i), i)
            b = (string_hash(t["id"]) % np.uint64(buckets)).astype(np.int64)
            order = np.argsort(b, kind="stable")
            t, b = t.take(pa.array(order)), b[order]
            bounds = np.searchsorted(b, np.arange(buckets + 1))
            with pq.ParquetWriter(os.path.join(spill, f"{i:06d}.parquet"), t.schema) as w:
                for k in range(buckets):  # an empty bucket is an empty row group: row group k is bucket k
                    w.write_table(t.slice(bounds[k], bounds[k + 1] - bounds[k]), row_group_size=max(1, len(t)))
            return [int(bounds[k + 1] - bounds[k]) for k in range(buckets)]

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, range(len(uris))))
        runs = [pq.ParquetFile(os.path.join(spill, f"{i:06d}.parquet")) for i in range(len(uris))]
        out: dict[tuple[int, int], str] = {}
        for k in range(buckets):
            out.update(repeats(pa.concat_tables([r.read_row_group(k) for r in runs]), uris))
        return out
    finally:
        shutil.rmtree(spill, ignore_errors=True)
