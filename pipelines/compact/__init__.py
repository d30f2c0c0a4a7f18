"""`mimdex compact`: fold an index version's delta segments into new base shards (Beam)."""
from mimdex.pipelines.compact.job import CompactConfig, run

__all__ = ["CompactConfig", "run"]
