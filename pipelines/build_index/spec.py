"""What the Beam graph's DoFns are handed: one frozen spec, pickled once per worker."""
from __future__ import annotations

from dataclasses import dataclass

from mimdex.infra.contracts.model import ModelRef

BUILD_DIR = "_build"


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
