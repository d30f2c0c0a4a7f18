"""The Beam graph of build-index: partial indexes per (input part, shard), merged per shard.

AddPart encodes one embeddings part and writes one partial per shard its products fall
in (list numbers, codes, id map rows) as an Arrow file (spec.partials: a local temporary
directory on the DirectRunner, <version>/_partials/ for a remote runner); only
the file's name goes through the shuffle (GroupByKey on the shard number), so no worker
and no runner holds more than one shard's codes. Raw vectors never leave the worker that
read them. While it has a part's vectors in memory, AddPart also finds, for the
evaluation queries, their exact nearest neighbour in that part: the launcher merges
those, and evaluation never reads the embeddings again.

DoFns write their outputs whole through the contracts layer, plus a small JSON record per
output under <version>/_build/ that the launcher collects after the run.
"""
from __future__ import annotations

import io
import logging

import faiss
import numpy as np
import pyarrow as pa

from mimdex.indexing.exact import ExactTopK
from mimdex.infra import storage
from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.embeddings import PartEntry
from mimdex.infra.contracts.vectors import check_unique, shard_of, usable_rows
from mimdex.pipelines.build_index.spec import BUILD_DIR, QUERIES_FILE, BuildSpec

_level = logging.root.manager.disable
logging.disable(logging.WARNING)  # Beam warns on import about optional GCP clients
import apache_beam as beam  # noqa: E402
logging.disable(_level)

LIST, CODE = "__list", "__code"   # a partial's columns beside the id map's


def _trained(spec: BuildSpec) -> faiss.Index:
    if spec.threads:  # worker processes share the cores: more threads each only contend
        faiss.omp_set_num_threads(spec.threads)
    return codec.deserialize(storage.read_bytes(storage.join(spec.version_dir, "trained.index")))


def _write_partial(uri: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    storage.write_bytes(uri, sink.getvalue())


def _read_partial(uri: str) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(storage.read_bytes(uri))).read_all()


class AddPart(beam.DoFn):
    """One embeddings part -> one partial index file per shard its products fall in.

    A partial is what the trained index's ``sa_encode`` makes of the vectors (list number
    + code, a few dozen bytes each) plus their id map rows (with the re-ranking codes
    when the index has a re-ranking stage).
    """

    def __init__(self, spec: BuildSpec):
        self.spec = spec
        self._index = self._queries = None

    def setup(self):
        self._index = _trained(self.spec)
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
            table = (idmap.take(pa.array(sel, pa.int64()))
                     .append_column(LIST, pa.array(lists[sel], pa.int64()))
                     .append_column(CODE, iv.code_column(codes[sel])))
            uri = storage.join(spec.partials, f"{entry.name}-{iv.shard_name(shard)}.arrow")
            _write_partial(uri, table)
            yield int(shard), uri
        stats = {"part": entry.name, "rows": part.rows, "indexed": len(part.ids), "skipped": part.skipped,
                 "skipped_ids": list(part.skipped_ids[:1000])}
        if self._queries is not None:
            acc = ExactTopK(self._queries[0], 1, self._queries[1])
            acc.add(part.vectors, part.ids)
            dist, ids = acc.result()
            stats["truth"] = {"dist": dist[:, 0].astype(float).tolist(), "ids": ids[:, 0].tolist()}
        storage.write_json(storage.join(spec.version_dir, BUILD_DIR, f"stats-{entry.name}.json"), stats)


class MergeShard(beam.DoFn):
    """All partial files of one shard -> the shard's inverted lists and id map."""

    def __init__(self, spec: BuildSpec):
        self.spec = spec

    def process(self, element):
        shard, uris = element
        nlist, code_size = codec.lists_shape(_trained(self.spec))
        table = pa.concat_tables([_read_partial(u) for u in sorted(uris)], promote_options="permissive")
        ids = table.column("id").to_numpy()
        idmap = table.drop_columns([LIST, CODE])
        check_unique(ids, idmap, f"shard {iv.shard_name(shard)}")
        codes = iv.code_matrix(table.column(CODE), code_size)
        chunks = codec.encoded_chunks(nlist, code_size, ids, table.column(LIST).to_numpy(), codes)
        record = iv.write_shard(self.spec.version_dir, shard, chunks, len(ids), idmap)
        storage.write_json(storage.join(self.spec.version_dir, BUILD_DIR, f"{record.name}.json"), record.to_json())
        yield record


def build_pipeline(pipeline: beam.Pipeline, spec: BuildSpec, parts: list[PartEntry]) -> None:
    (pipeline
     | "Parts" >> beam.Create(parts, reshuffle=True)
     | "AddPerShard" >> beam.ParDo(AddPart(spec))
     | "GroupByShard" >> beam.GroupByKey()
     | "MergeShard" >> beam.ParDo(MergeShard(spec)))
