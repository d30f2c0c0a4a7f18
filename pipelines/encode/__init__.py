"""`mimdex encode`: catalog -> embedding shards on Ray.

plan.py (units, fingerprints, duplicates) -> decode.py (CPU tasks: bytes -> pixels,
tokens, rejects) -> actors.py (encoder actors: pixels/tokens -> vectors) -> commits.py
(part/reject files, commit markers) -> job.py (the Ray driver loop, manifest, report).
Other jobs use only what this package exports.
"""
from mimdex.pipelines.encode.actors import EncoderActor
from mimdex.pipelines.encode.config import EncodeConfig
from mimdex.pipelines.encode.job import EncodeResult, ray_session, run

# EncoderActor: `mimdex doctor --bench` times the actor's own path on a node
__all__ = ["EncodeConfig", "EncodeResult", "EncoderActor", "ray_session", "run"]
