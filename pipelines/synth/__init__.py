"""`mimdex synth-catalog`: a deterministic synthetic street-to-shop dataset.

plan.py (products, families, held-out split) -> render.py (catalog shots and street
photos) -> rows.py (table rows) -> job.py (parallel render, Parquet tables, manifest).
Other jobs use only what this package exports.
"""
from mimdex.pipelines.synth.job import run
from mimdex.pipelines.synth.plan import SynthConfig

__all__ = ["SynthConfig", "run"]
