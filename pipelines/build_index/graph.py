"""The Beam graph of build-index: partial indexes per (input part, shard), merged per shard.

AddPart encodes one embeddings part and writes one partial per shard its products fall
in (id map rows; list numbers and codes cut into list windows) as two Arrow files
(spec.partials: a local temporary directory on the DirectRunner, <version>/_partials/ for
a remote runner); only the partial's name goes through the shuffle (GroupByKey on the
shard number), and MergeShard streams the codes window by window into the shard's file,
so no worker and no runner holds a shard's codes. Raw vectors never leave the worker that
read them. While it has a part's vectors in memory, AddPart also finds, for the
evaluation queries, their exact nearest neighbour in that part: the launcher merges
those, and evaluation never reads the embeddings again.

DoFns write their outputs whole through the contracts layer, plus a small JSON record per
output under <version>/_build/ that the launcher collects after the run.
"""
from __future__ import annotations

import contextlib
import functools
import io
import itertools
import logging

import faiss
import numpy as np
import pyarrow as pa

from mimdex.indexing.exact import ExactTopK
from mimdex.infra import storage
from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.embeddings import PartEntry
from mimdex.infra.contracts.files import use_system_memory_pool
from mimdex.infra.memory import release_free_memory
from mimdex.infra.contracts.vectors import check_unique, shard_of, usable_rows
from mimdex.infra.errors import DataError
from mimdex.pipelines.build_index.spec import BUILD_DIR, QUERIES_FILE, BuildSpec

_level = logging.root.manager.disable
logging.disable(logging.WARNING)  # Beam warns on import about optional GCP clients
import apache_beam as beam  # noqa: E402
logging.disable(_level)

LIST, CODE = "__list", "__code"   # a codes partial's columns beside the id
IDS_FILE, CODES_FILE = ".ids.arrow", ".codes.arrow"   # the two files of a partial, after its name
SIZES_KEY = b"mimdex.list_sizes"   # a codes partial's rows per list (little-endian int64 x nlist)
WINDOWS = 64                       # list ranges a codes partial is cut into: a merge holds 1/64 of a shard


def _trained(spec: BuildSpec) -> faiss.Index:
    use_system_memory_pool()   # also on a remote runner's workers, which do not inherit it
    if spec.threads:  # worker processes share the cores: more threads each only contend
        faiss.omp_set_num_threads(spec.threads)
    return _trained_index(storage.join(spec.version_dir, "trained.index"))


@functools.lru_cache(maxsize=1)
def _trained_index(uri: str) -> faiss.Index:
    """One read per worker process and version: the Dask runner sets a DoFn up for every
    task (one per part), and at 1B the trained index is 0.3 GB. A version's trained index
    never changes once written, and the DoFns only encode with it (const in faiss)."""
    return codec.deserialize(storage.read_bytes(uri))


def _write_arrow(uri: str, batches: list[pa.RecordBatch], schema: pa.Schema) -> None:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, schema) as w:
        for batch in batches:
            w.write_batch(batch)
    storage.write_bytes(uri, sink.getvalue())


def _read_arrow(uri: str) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(storage.read_bytes(uri))).read_all()


def _window_starts(nlist: int) -> np.ndarray:
    step = -(-nlist // WINDOWS)
    return np.arange(0, nlist + step, step).clip(max=nlist)


def _write_codes(uri: str, nlist: int, ids: np.ndarray, lists: np.ndarray, codes: np.ndarray) -> None:
    """A codes partial: (id, list, code) rows sorted by list then id, one record batch per
    list window (empty ones too: batch w is window w in every partial), the rows per list
    in the schema's metadata for the merged file's header."""
    order = np.lexsort((ids, lists))
    ids, lists = ids[order], lists[order]
    cols = [pa.array(ids, pa.int64()), pa.array(lists, pa.int64()), iv.code_column(codes[order])]
    schema = pa.schema([("id", pa.int64()), (LIST, pa.int64()), (CODE, cols[2].type)],
                       metadata={SIZES_KEY: np.bincount(lists, minlength=nlist).astype("<i8").tobytes()})
    edges = np.searchsorted(lists, _window_starts(nlist))
    _write_arrow(uri, [pa.RecordBatch.from_arrays([c.slice(a, b - a) for c in cols], schema=schema)
                       for a, b in zip(edges[:-1].tolist(), edges[1:].tolist())], schema)


class AddPart(beam.DoFn):
    """One embeddings part -> one partial index per shard its products fall in.

    A partial is two files: the id map rows of its vectors (with the re-ranking codes
    when the index has a re-ranking stage), and what the trained index's ``sa_encode``
    makes of them (list number + code, a few dozen bytes each), cut by list windows.
    """

    def __init__(self, spec: BuildSpec):
        self.spec = spec
        self._index = self._queries = None

    def setup(self):
        self._index = _trained(self.spec)
        self._nlist = codec.lists_shape(self._index)[0]
        if self.spec.truth:
            with np.load(io.BytesIO(storage.read_bytes(storage.join(self.spec.partials, QUERIES_FILE)))) as z:
                self._queries = (z["queries"], z["exclude"])

    def process(self, entry: PartEntry):
        spec = self.spec
        part = usable_rows(spec.embeddings, entry, spec.model, spec.dtype, spec.vector, spec.fuse_alpha, spec.metadata,
                           spec.photos)
        lists, codes, refine = codec.encode(self._index, part.vectors)
        idmap = iv.with_refine(part.idmap, refine)
        shards = shard_of(part.product_keys, spec.shards)
        for shard in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == shard)
            name = storage.join(spec.partials, f"{entry.name}-{iv.shard_name(shard)}")
            rows = idmap.take(pa.array(sel, pa.int64()))
            _write_arrow(name + IDS_FILE, rows.to_batches(), rows.schema)
            _write_codes(name + CODES_FILE, self._nlist, part.ids[sel], lists[sel], codes[sel])
            yield int(shard), name
        stats = {"part": entry.name, "rows": part.rows, "indexed": len(part.ids), "skipped": part.skipped,
                 "skipped_ids": list(part.skipped_ids[:1000])}
        if self._queries is not None:
            acc = ExactTopK(self._queries[0], 1, self._queries[1])
            acc.add(part.vectors, part.ids)
            dist, ids = acc.result()
            # null where this part has no candidate for a query (all its rows skipped): JSON has no inf
            stats["truth"] = {"dist": [float(d) if i >= 0 else None for d, i in zip(dist[:, 0], ids[:, 0])],
                              "ids": ids[:, 0].tolist()}
        storage.write_json(storage.join(spec.version_dir, BUILD_DIR, f"stats-{entry.name}.json"), stats)
        del part, lists, codes, refine, idmap
        release_free_memory()   # a worker adds part after part: keep one part's arrays, not the largest seen


class MergeShard(beam.DoFn):
    """All partials of one shard -> the shard's inverted lists and id map. The id maps are
    read whole (a few dozen bytes a vector); the codes stream through one list window at a
    time, straight into the shard's file, so a worker never holds a shard's codes."""

    def __init__(self, spec: BuildSpec):
        self.spec = spec

    def process(self, element):
        shard, names = element
        names = sorted(set(names))   # a task a cluster runner re-ran (lost worker) names its partials again
        nlist, code_size = codec.lists_shape(_trained(self.spec))
        idmap = pa.concat_tables([_read_arrow(n + IDS_FILE) for n in names], promote_options="permissive")
        ids = idmap.column("id").to_numpy()
        check_unique(ids, idmap, f"shard {iv.shard_name(shard)}")
        with contextlib.ExitStack() as stack:
            parts = [pa.ipc.open_file(stack.enter_context(storage.open_read(n + CODES_FILE))) for n in names]
            sizes = sum(np.frombuffer(p.schema.metadata[SIZES_KEY], "<i8") for p in parts)
            if int(sizes.sum()) != len(ids):
                raise DataError(f"shard {iv.shard_name(shard)}: {int(sizes.sum())} codes for {len(ids)} id map rows")

            def body():
                for w in range(parts[0].num_record_batches):
                    window = pa.Table.from_batches([p.get_batch(w) for p in parts])
                    yield from codec.list_chunks(code_size, window.column("id").to_numpy(),
                                                 window.column(LIST).to_numpy(),
                                                 iv.code_matrix(window.column(CODE), code_size))

            chunks = itertools.chain([codec.lists_header(nlist, code_size, sizes)], body())
            record = iv.write_shard(self.spec.version_dir, shard, chunks, len(ids), idmap)
        storage.write_json(storage.join(self.spec.version_dir, BUILD_DIR, f"{record.name}.json"), record.to_json())
        yield record


def build_pipeline(pipeline: beam.Pipeline, spec: BuildSpec, parts: list[PartEntry]) -> None:
    (pipeline
     | "Parts" >> beam.Create(parts, reshuffle=True)
     | "AddPerShard" >> beam.ParDo(AddPart(spec))
     | "GroupByShard" >> beam.GroupByKey()
     # a shard's merge is the heavy step: a key's hash may send every shard to one worker
     # (3 shards, 2 Flink slots: all 3 on one); a Reshuffle, which Flink runs as a
     # round-robin rebalance, spreads them
     | "SpreadShards" >> beam.Reshuffle()
     | "MergeShard" >> beam.ParDo(MergeShard(spec)))
