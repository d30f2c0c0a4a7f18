"""What the Beam graph's DoFns are handed: one frozen spec, pickled once per worker."""
from __future__ import annotations

from dataclasses import dataclass

from mimdex.infra.contracts.model import ModelRef

BUILD_DIR = "_build"
PARTIALS_DIR = "_partials"      # beside _build (a remote runner's): the progress watch counts _build's only
QUERIES_FILE = "queries.npz"    # under the partials: evaluation queries whose exact neighbours AddPart finds


@dataclass(frozen=True)
class BuildSpec:
    embeddings: str
    version_dir: str
    shards: int
    vector: str
    fuse_alpha: float
    model: ModelRef
    dtype: str
    metadata: bool = True
    photos: str = "every"          # what a multi-photo product contributes (contracts.photos.MODES)
    truth: bool = False            # find the exact nearest neighbour of QUERIES_FILE's queries per part
    partials: str = ""             # where AddPart's partial files go (job.partials_dir)
    threads: int = 0               # faiss threads per worker (0: faiss's default, every core)
