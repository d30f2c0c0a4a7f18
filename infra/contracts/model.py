"""The model description that embeddings and index manifests carry."""
from __future__ import annotations

from dataclasses import asdict, dataclass

# Two runs of one bundle give a product the same vector bit for bit only under the same
# kernels and thread count: oneDNN (AMX, AVX-512) splits a reduction by thread, so float32
# sums run in another order on another count, as they do for a product embedded alone
# rather than in a batch. Across those, every component agrees within this bound (measured:
# <= 6e-8 between 1 and 2 threads on an AMX CPU, ~3e-7 batch against alone).
VECTOR_ROUNDING = 2e-6


@dataclass(frozen=True)
class ModelRef:
    uri: str
    sha256: str        # of model.safetensors: two vector sets are comparable only if equal
    variant: str       # image-only | 3-tower | 4-tower
    d: int
    has_text: bool     # image-only models have no text tower, so no text_emb column

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "ModelRef":
        return cls(uri=obj["uri"], sha256=obj["sha256"], variant=obj["variant"], d=int(obj["d"]),
                   has_text=bool(obj["has_text"]))
