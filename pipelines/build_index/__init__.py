"""`mimdex build-index`: embeddings -> sharded IVF-PQ index version, evaluated, published.

job.py (launcher: validate, sample, train once, run the Beam graph) -> graph.py (Beam: add
vectors per (input part, shard) into partial indexes, merge per shard, write shards and
id maps) -> indexing.release (evaluate, gate, publish). Beam is imported only when a
graph is built. Other jobs use only what this package exports.

The exports load on first use (PEP 562): a Beam worker that unpickles graph.py's DoFns
imports this package too, and the launcher's modules would bring torch (k-means), 190 MB
of resident memory, into every worker process that never trains.
"""
__all__ = ["BuildConfig", "run"]


def __getattr__(name: str):
    if name in __all__:
        from mimdex.pipelines.build_index import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
