"""The model description that embeddings and index manifests carry."""
from __future__ import annotations

from dataclasses import asdict, dataclass


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
