"""What compaction's DoFns are handed, and where they write."""
from __future__ import annotations

from dataclasses import dataclass

from mimdex.infra.contracts import index_version as iv

PROGRESS_DIR = "_compact"


@dataclass(frozen=True)
class CompactSpec:
    source_dir: str          # the version being compacted
    out_dir: str             # the new version
    deltas: tuple[iv.DeltaSegment, ...]
    nlist: int               # the shape of the stored lists (the codebooks stay where they are)
    code_size: int
