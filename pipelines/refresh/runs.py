"""The refresh diff's sorted runs (diff_graph.py): each side's rows as a Parquet file with
one row group per bucket, sorted by bucket, the buckets present named in the footer.

The catalog side's run of each unit and the previous side's run of each batch of
embeddings parts (and id map) are kept under ``<embeddings>/state_runs/`` for the next
night: a part is immutable but for its deletion file, so a batch's run is named by what
it was made from; a catalog unit's run is named by its place and rewritten only when its
rows moved.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.infra.contracts.files import column_bytes, parquet_metadata
from mimdex.pipelines.refresh.diff import RUN_FORMAT, STATE_RUNS, DiffSpec, bucket_of

# digests do not compress; the order rises within a bucket (a stable sort), so deltas are small
_ENCODING = {"product_id": "PLAIN", "state": "PLAIN", "order": "DELTA_BINARY_PACKED", "attrs": "PLAIN",
             "encoded": "PLAIN", "part": "PLAIN", "seq": "PLAIN", "vectors": "PLAIN"}
_BUCKETS_KEY = b"mimdex.buckets"   # a run's footer: the bucket of each row group


@dataclass(frozen=True)
class RunRef:
    side: str        # "cat", "prev" or "shown"
    uri: str
    row_group: int


def by_bucket(spec: DiffSpec, table: pa.Table) -> tuple[pa.Table, list[tuple[int, int, int]]]:
    """``table`` sorted by bucket (stable), and (bucket, start, end) of each bucket present."""
    buckets = bucket_of(table.column("product_id").to_pylist(), spec.buckets)
    order = np.argsort(buckets, kind="stable")
    table, buckets = table.take(pa.array(order)), buckets[order]
    cuts = np.flatnonzero(np.diff(buckets)) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(buckets)]])
    return table, [(int(buckets[a]), int(a), int(b)) for a, b in zip(starts, ends)] if len(buckets) else []


def refs_of(side: str, uri: str, present: list[int]) -> list[tuple[int, RunRef]]:
    return [(b, RunRef(side, uri, rg)) for rg, b in enumerate(present)]


def write_run(spec: DiffSpec, uri: str, side: str, table: pa.Table, groups: list | None = None
               ) -> tuple[list[tuple[int, RunRef]], int]:
    """``table`` as a run at ``uri`` sorted by bucket, one row group per bucket present (an
    empty table too: a kept run of a part with no product is still known); (its
    references, bytes written). ``groups``: the table is sorted already (_by_bucket)."""
    if groups is None:
        table, groups = by_bucket(spec, table)
    present = [b for b, _, _ in groups]
    schema = table.schema.with_metadata({_BUCKETS_KEY: json.dumps(present).encode()})
    encoding = {c: _ENCODING[c] for c in table.column_names}
    with storage.open_write(uri) as f:
        with pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=False, column_encoding=encoding) as w:
            for _, a, b in groups:
                w.write_table(table.slice(a, b - a).replace_schema_metadata(schema.metadata), row_group_size=b - a)
        written = f.bytes_written
    return refs_of(side, uri, present), written


def read_run(uri: str) -> tuple[pa.Table, list[int], int]:
    """A kept run whole: (rows, the bucket of each row group, stored bytes)."""
    with storage.open_read(uri) as f:
        pf = pq.ParquetFile(f)
        present = json.loads(pf.schema_arrow.metadata[_BUCKETS_KEY])
        return pf.read().replace_schema_metadata(None), present, column_bytes(
            pf.metadata, range(pf.metadata.num_row_groups), pf.schema_arrow.names)


def kept_run(spec: DiffSpec, side: str, name: str, made_from: object, make) -> tuple[list, dict]:
    """The previous side's run of one immutable input (an embeddings part with its
    deletion file, an id map), kept under STATE_RUNS and named by a hash of ``made_from``
    and the bucket count: written the first night it is needed, read again on the next.
    (references, its record: rows, bytes read to make it, bytes written.)"""
    uri = storage.join(spec.embeddings, STATE_RUNS, kept_run_name(side, name, made_from, spec.buckets))
    if storage.exists(uri):
        meta = parquet_metadata(uri, "a kept diff run")
        present = json.loads(meta.schema.to_arrow_schema().metadata[_BUCKETS_KEY])
        return refs_of(side, uri, present), {"rows": meta.num_rows, "kept": True}
    table, read = make()
    refs, written = write_run(spec, uri, side, table)
    return refs, {"rows": table.num_rows, "read_bytes": read, "written_bytes": written}


def kept_run_name(side: str, name: str, made_from: object, buckets: int) -> str:
    key = hashlib.sha256(json.dumps([side, made_from, buckets, RUN_FORMAT], sort_keys=True).encode()).hexdigest()[:16]
    return f"{side}-{name}-{key}.parquet"


def cat_run_name(unit: int, buckets: int) -> str:
    return f"cat-{unit:06d}-b{buckets}-f{RUN_FORMAT}.parquet"
