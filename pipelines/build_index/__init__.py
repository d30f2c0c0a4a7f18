"""`mimdex build-index`: embeddings -> sharded IVF-PQ index version, evaluated, published.

job.py (launcher: validate, sample, train once, run the Beam graph) -> graph.py (Beam: add
vectors per (input part, shard) into partial indexes, merge per shard, write shards and
id maps) -> indexing.release (evaluate, gate, publish). Beam is imported only when a
graph is built. Other jobs use only what this package exports.
"""
from mimdex.pipelines.build_index.job import BuildConfig, run

__all__ = ["BuildConfig", "run"]
