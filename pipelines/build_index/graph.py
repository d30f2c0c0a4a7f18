"""The Beam graph of build-index: partial indexes per (input part, shard), merged per shard.

Only compressed codes and ids cross the shuffle (GroupByKey on the shard number); raw
vectors never leave the worker that read them. DoFns get one frozen BuildSpec and write
their outputs whole through the contracts layer, plus a small JSON record per output
under <version>/_build/ that the launcher collects after the run.
"""
from __future__ import annotations

import io
import logging

import faiss
import numpy as np
import pyarrow as pa

from mimdex.infra import storage
from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.embeddings import PartEntry
from mimdex.infra.contracts.vectors import check_unique, labels, shard_of, usable_rows
from mimdex.pipelines.build_index.spec import BUILD_DIR, BuildSpec

_level = logging.root.manager.disable
logging.disable(logging.WARNING)  # Beam warns on import about optional GCP clients
import apache_beam as beam  # noqa: E402
logging.disable(_level)


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


def _trained(spec: BuildSpec) -> faiss.Index:
    return codec.deserialize(storage.read_bytes(storage.join(spec.version_dir, "trained.index")))


class AddPart(beam.DoFn):
    """One embeddings part -> one partial index per shard its products fall in.

    A partial is what faiss's IVF ``sa_encode`` makes of the vectors (list number + PQ
    code, a few dozen bytes each) plus their ids: the trained index does the coarse
    assignment and the quantisation, and no raw vector crosses the shuffle.
    """

    def __init__(self, spec: BuildSpec):
        self.spec = spec
        self._index = None

    def setup(self):
        self._index = _trained(self.spec)

    def process(self, entry: PartEntry):
        spec = self.spec
        part = usable_rows(spec.embeddings, entry, spec.model, spec.dtype, spec.vector, spec.fuse_alpha, spec.metadata,
                           spec.photos)
        lists, codes = codec.encode(self._index, part.vectors)
        shards = shard_of(part.product_keys, spec.shards)
        for shard in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == shard)
            yield int(shard), {"part": entry.name, "ids": part.ids[sel], "lists": lists[sel], "codes": codes[sel],
                               "idmap": _ipc(part.idmap.take(pa.array(sel, pa.int64())))}
        storage.write_json(storage.join(spec.version_dir, BUILD_DIR, f"stats-{entry.name}.json"),
                           {"part": entry.name, "rows": part.rows, "indexed": len(part.ids),
                            "skipped": part.skipped, "skipped_ids": list(part.skipped_ids[:1000])})


class MergeShard(beam.DoFn):
    """All partial indexes of one shard -> the shard's inverted lists and id map."""

    def __init__(self, spec: BuildSpec):
        self.spec = spec

    def process(self, element):
        shard, partials = element
        partials = sorted(partials, key=lambda p: p["part"])
        nlist, code_size = codec.lists_shape(_trained(self.spec))
        idmap = pa.concat_tables([_from_ipc(p["idmap"]) for p in partials], promote_options="permissive")
        ids = np.concatenate([p["ids"] for p in partials])
        check_unique(ids, labels(idmap), f"shard {iv.shard_name(shard)}")
        blob = codec.encoded_lists(nlist, code_size, ids, np.concatenate([p["lists"] for p in partials]),
                                   np.concatenate([p["codes"] for p in partials]))
        record = iv.write_shard(self.spec.version_dir, shard, blob, len(ids), idmap)
        storage.write_json(storage.join(self.spec.version_dir, BUILD_DIR, f"{record.name}.json"), record.to_json())
        yield record


def build_pipeline(pipeline: beam.Pipeline, spec: BuildSpec, parts: list[PartEntry]) -> None:
    (pipeline
     | "Parts" >> beam.Create(parts, reshuffle=True)
     | "AddPerShard" >> beam.ParDo(AddPart(spec))
     | "GroupByShard" >> beam.GroupByKey()
     | "MergeShard" >> beam.ParDo(MergeShard(spec)))
