"""`mimdex refresh` and `mimdex backfill`: encode what changed, publish the next version.

diff.py (catalog vs embeddings by row state) -> delta encode (the encode pipeline on
the rows to re-encode) -> update.py (previous shards minus removed ids plus new vectors,
reusing the trained quantizer) or a full build-index when drift says retrain -> publish.
"""
from mimdex.pipelines.refresh.job import RefreshConfig, check, run

__all__ = ["RefreshConfig", "check", "run"]
