"""`mimdex doctor`: an operator's first command on a new node type.

checks.py (what is installed and reachable: torch, CUDA, bf16, nvjpeg, faiss, Ray, Beam,
the object store) -> bench.py (``--bench``: decode, the compiled image tower, the encode
actor's path, text, k-means, measured on this node) -> job.py (table, JSON report, exit
code). Other jobs use only what this package exports.
"""
from mimdex.pipelines.doctor.bench import BenchConfig
from mimdex.pipelines.doctor.job import DoctorConfig, run

__all__ = ["BenchConfig", "DoctorConfig", "run"]
