"""`mimdex build-index`: embeddings -> sharded IVF-PQ index version, evaluated, published.

job.py (launcher: validate, sample, train once, run the Beam graph, evaluate, publish)
-> graph.py (Beam: add vectors per (input part, shard) into partial indexes, merge per
shard, write shards and id maps).
"""
