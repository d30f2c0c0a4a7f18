"""The Beam graph of compaction: one CompactShard per shard of the version."""
from __future__ import annotations

import logging

from mimdex.infra import storage
from mimdex.infra.contracts import index_delta
from mimdex.infra.contracts import index_version as iv
from mimdex.pipelines.compact.spec import PROGRESS_DIR, CompactSpec

_level = logging.root.manager.disable
logging.disable(logging.WARNING)  # Beam warns on import about optional GCP clients
import apache_beam as beam  # noqa: E402
logging.disable(_level)

class CompactShard(beam.DoFn):
    """A shard's base + its deltas - deletions -> the new version's base shard."""

    def __init__(self, spec: CompactSpec):
        self.spec = spec
        self._deletions = None

    def setup(self):  # the deletion lists, read once per worker rather than once per shard
        self._deletions = index_delta.later_deletions(self.spec.source_dir, self.spec.deltas)

    def process(self, entry: iv.ShardEntry):
        s = self.spec
        blob, idmap, n = index_delta.combine(
            index_delta.shard_pieces(s.source_dir, entry, s.deltas, self._deletions), s.nlist, s.code_size)
        record = iv.write_shard(s.out_dir, entry.shard, blob, n, idmap)
        storage.write_json(storage.join(s.out_dir, PROGRESS_DIR, f"{record.name}.json"), record.to_json())
        yield record


def build_pipeline(p: beam.Pipeline, spec: CompactSpec, shards: list[iv.ShardEntry]) -> None:
    p | "Shards" >> beam.Create(shards, reshuffle=True) | "CompactShard" >> beam.ParDo(CompactShard(spec))
