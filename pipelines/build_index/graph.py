"""The Beam graph of build-index: partial indexes per (input part, shard), merged per shard.

Only compressed codes and ids cross the shuffle (GroupByKey on the shard number); raw
vectors never leave the worker that read them. DoFns get one frozen BuildSpec and write
their outputs whole through mimdex.infra.storage, plus a small JSON record per output
under <version>/_build/ that the launcher collects after the run.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimdex.indexing.ids import check_unique, ids_for
from mimdex.indexing.train import deserialize
from mimdex.indexing.vectors import index_vectors, invalid_reasons
from mimdex.infra import storage
from mimdex.infra.errors import DataError
from mimdex.pipelines.encode.shards import live_rows

_level = logging.root.manager.disable
logging.disable(logging.WARNING)  # Beam warns on import about optional GCP clients
import apache_beam as beam  # noqa: E402
logging.disable(_level)

BUILD_DIR = "_build"


@dataclass(frozen=True)
class BuildSpec:
    embeddings: str
    version_dir: str
    shards: int
    vector: str
    fuse_alpha: float
    metadata: bool = True


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def read_part(spec: BuildSpec, entry: dict) -> pa.Table:
    """A part file, checked against the embeddings manifest's sha256."""
    data = storage.read_verified(storage.join(spec.embeddings, entry["part"]["file"]), entry["part"]["sha256"],
                                 "the embeddings manifest")
    return live_rows(pq.read_table(pa.BufferReader(data)), entry)


def catalog_metadata(entry: dict, product_ids: list[str]) -> pa.Table | None:
    """The catalog rows behind a part (its source file and row groups), minus image bytes,
    aligned with ``product_ids`` (first occurrence wins, as encode decided)."""
    source = entry.get("source")
    if not source:
        return None
    with storage.open_read(source) as f:
        try:
            pf = pq.ParquetFile(f)
            cols = [c for c in pf.schema_arrow.names if c not in ("image",)]
            table = pf.read_row_groups(entry["row_groups"], columns=cols)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"catalog {source}: cannot read the metadata of row groups {entry['row_groups']}: {exc}") from exc
    first: dict[str, int] = {}
    for i, pid in enumerate(table.column("product_id").to_pylist()):
        first.setdefault(pid, i)
    idx = [first.get(p, -1) for p in product_ids]
    taken = table.take(pa.array([max(i, 0) for i in idx]))
    mask = pa.array([i < 0 for i in idx])
    cols = {c: pc.if_else(mask, pa.nulls(len(idx), taken.column(c).type), taken.column(c))
            for c in taken.column_names if c != "product_id"}
    return pa.table(cols) if cols else None


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


def coarse_bytes(nlist: int) -> int:
    """Bytes faiss's IVF sa_encode puts before each code for its list number."""
    nbytes, nl = 0, nlist - 1
    while nl > 0:
        nbytes, nl = nbytes + 1, nl >> 8
    return nbytes


@dataclass
class PartRows:
    """A part's usable vectors, their int64 ids and id-map rows, and what was skipped."""

    vectors: np.ndarray
    ids: np.ndarray
    idmap: pa.Table
    rows: int
    skipped: dict[str, int]
    skipped_ids: list[str]


def index_rows(spec: BuildSpec, entry: dict) -> PartRows:
    """One embeddings part -> what goes into the index (NaN/inf/zero vectors skipped)."""
    table = read_part(spec, entry)
    vectors = index_vectors(table, spec.vector, spec.fuse_alpha)
    reasons = invalid_reasons(vectors)
    keep = reasons == ""
    pids = table.column("product_id").to_pylist()
    kept = [p for p, k in zip(pids, keep) if k]
    ids = ids_for(kept)
    idmap = pa.table({"id": pa.array(ids, pa.int64()), "product_id": pa.array(kept, pa.string())})
    meta = catalog_metadata(entry, kept) if spec.metadata else None
    for name in (meta.column_names if meta is not None else []):
        idmap = idmap.append_column(name, meta.column(name))
    return PartRows(np.ascontiguousarray(vectors[keep]), ids, idmap, len(pids),
                    {r: int((reasons == r).sum()) for r in set(reasons.tolist()) - {""}},
                    [p for p, r in zip(pids, reasons) if r])


class AddPart(beam.DoFn):
    """One embeddings part -> one partial index per shard its products fall in.

    A partial is what faiss's IVF ``sa_encode`` makes of the vectors (list number + PQ
    code, a few dozen bytes each) plus their ids: the trained index does the coarse
    assignment and the quantisation, and no raw vector crosses the shuffle.
    """

    def __init__(self, spec: BuildSpec):
        self.spec = spec
        self._trained = None

    def setup(self):
        self._trained = deserialize(storage.read_bytes(storage.join(self.spec.version_dir, "trained.index")))

    def process(self, entry: dict):
        spec = self.spec
        part = index_rows(spec, entry)
        codes = self._trained.sa_encode(part.vectors) if len(part.ids) else None
        shard_of = part.ids % spec.shards
        for shard in np.unique(shard_of).tolist():
            sel = np.flatnonzero(shard_of == shard)
            yield int(shard), {"part": entry["name"], "ids": part.ids[sel], "codes": codes[sel],
                               "idmap": _ipc(part.idmap.take(pa.array(sel)))}
        storage.write_json(storage.join(spec.version_dir, BUILD_DIR, f"stats-{entry['name']}.json"),
                           {"part": entry["name"], "rows": part.rows, "indexed": len(part.ids),
                            "skipped": part.skipped, "skipped_ids": part.skipped_ids[:1000]})


def split_codes(nlist: int, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss IVF sa_encode output -> (list numbers, PQ codes)."""
    cb = coarse_bytes(nlist)
    lists = np.zeros(len(codes), np.int64)
    for b in range(cb):
        lists |= codes[:, b].astype(np.int64) << (8 * b)
    return lists, np.ascontiguousarray(codes[:, cb:])


def encoded_lists(nlist: int, code_size: int, ids: np.ndarray, lists: np.ndarray, codes: np.ndarray) -> bytes:
    """(id, list number, PQ code) rows -> faiss inverted lists, serialised.

    Stored flat (ArrayInvertedLists): the quantizer and codebooks are in trained.index,
    once, and fast-scan's 32-code blocks are rebuilt when a reader loads the shard.
    """
    order = np.lexsort((ids, lists))  # by list, then id: byte-identical shards on re-runs
    ids, lists, codes = ids[order], lists[order], np.ascontiguousarray(codes[order])
    flat = faiss.ArrayInvertedLists(nlist, code_size)
    bounds = np.searchsorted(lists, np.arange(nlist + 1))
    for lst in np.flatnonzero(np.diff(bounds)).tolist():
        a, b = bounds[lst], bounds[lst + 1]
        flat.add_entries(lst, int(b - a), faiss.swig_ptr(np.ascontiguousarray(ids[a:b])),
                         faiss.swig_ptr(np.ascontiguousarray(codes[a:b])))
    writer = faiss.VectorIOWriter()
    faiss.write_InvertedLists(flat, writer)
    return faiss.vector_to_array(writer.data).tobytes()


def decoded_lists(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of encoded_lists: (ids, list numbers, PQ codes) of a stored shard."""
    reader = faiss.VectorIOReader()
    faiss.copy_array_to_vector(np.frombuffer(data, dtype=np.uint8), reader.data)
    flat = faiss.downcast_InvertedLists(faiss.read_InvertedLists(reader))
    ids, lists, codes = [], [], []
    for lst in range(flat.nlist):
        n = flat.list_size(lst)
        if n:
            ids.append(faiss.rev_swig_ptr(flat.get_ids(lst), n).copy())
            codes.append(faiss.rev_swig_ptr(flat.get_codes(lst), n * flat.code_size).copy().reshape(n, -1))
            lists.append(np.full(n, lst, np.int64))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, flat.code_size), np.uint8)
    return np.concatenate(ids), np.concatenate(lists), np.concatenate(codes)


def write_shard(spec: BuildSpec, shard: int, lists: bytes, ntotal: int, idmap: pa.Table) -> dict:
    name = shard_name(shard)
    with storage.open_write(storage.join(spec.version_dir, f"{name}.index")) as f:
        f.write(lists)
    index_rec = {"file": f"{name}.index", "sha256": f.sha256(), "bytes": f.bytes_written}
    with storage.open_write(storage.join(spec.version_dir, f"{name}.ids.parquet")) as f:
        pq.write_table(idmap, f, compression="zstd")
    ids_rec = {"file": f"{name}.ids.parquet", "sha256": f.sha256(), "bytes": f.bytes_written}
    return {"shard": shard, "name": name, "ntotal": int(ntotal), "index": index_rec, "ids": ids_rec}


class MergeShard(beam.DoFn):
    """All partial indexes of one shard -> the shard index and its id map."""

    def __init__(self, spec: BuildSpec):
        self.spec = spec

    def process(self, element):
        shard, partials = element
        partials = sorted(partials, key=lambda p: p["part"])
        trained = deserialize(storage.read_bytes(storage.join(self.spec.version_dir, "trained.index")))
        ivf = faiss.extract_index_ivf(trained)
        idmap = pa.concat_tables([_from_ipc(p["idmap"]) for p in partials], promote_options="permissive")
        ids = np.concatenate([p["ids"] for p in partials])
        check_unique(ids, idmap.column("product_id").to_pylist(), f"shard {shard_name(shard)}")
        lists, codes = split_codes(ivf.nlist, np.concatenate([p["codes"] for p in partials]))
        blob = encoded_lists(ivf.nlist, ivf.code_size, ids, lists, codes)
        record = write_shard(self.spec, shard, blob, len(ids), idmap.sort_by("id"))
        storage.write_json(storage.join(self.spec.version_dir, BUILD_DIR, f"{record['name']}.json"), record)
        yield record


def build_pipeline(pipeline: beam.Pipeline, spec: BuildSpec, parts: list[dict]) -> None:
    (pipeline
     | "Parts" >> beam.Create(parts, reshuffle=True)
     | "AddPerShard" >> beam.ParDo(AddPart(spec))
     | "GroupByShard" >> beam.GroupByKey()
     | "MergeShard" >> beam.ParDo(MergeShard(spec)))
