"""`mimdex encode`: catalog -> embedding shards on Ray (DESIGN.md, "Pipelines -> encode").

plan.py (units, fingerprints, duplicates) -> decode.py (CPU tasks: bytes -> pixels,
tokens, rejects) -> actors.py (encoder actors: pixels/tokens -> vectors) -> shards.py
(part/reject files, commit markers, manifest) -> job.py (the Ray driver loop, report).
"""
