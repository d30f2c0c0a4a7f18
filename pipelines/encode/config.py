"""Frozen configs that pickle into Ray tasks and actors."""
from __future__ import annotations

from dataclasses import dataclass

from mimdex.infra.contracts.catalog import Problem


@dataclass(frozen=True)
class EncodeConfig:
    model: str                      # model bundle URI
    catalog: str                    # catalog Parquet file or directory URI
    out: str                        # embeddings root URI
    ray_address: str | None = None  # join this cluster; None starts an embedded local Ray
    runtime_env: str | None = None  # Ray runtime env file (YAML/JSON) for the job's tasks and actors
    unit_rows: int = 2048           # target rows per work unit (whole row groups)
    dtype: str = "float16"
    batch_size: int = 256           # encoder forward batch (use 1024+ on a GPU)
    encoders: int | None = None     # encoder actors (default: one per GPU, else 1)
    encoder_cpus: int | None = None  # CPUs (torch threads) per CPU encoder actor
    decode_cpus: float = 1.0        # CPUs reserved per decode task
    max_in_flight: int | None = None  # units decoded or encoding at once (backpressure)
    fetch_threads: int = 16         # parallel image_uri reads inside one decode task
    max_attempts: int = 3           # tries per unit (actor restarts, lost workers)
    compile: bool | None = None     # torch.compile the image tower in the actors (None: on GPUs)
    gpu_decode: bool = False        # decode JPEGs on the actors' GPUs (nvjpeg), CPU fallback per image
    stall_timeout: float = 900.0    # exit 75 when no unit is committed for this long
    progress: bool = True
    reuse: str | None = None        # Parquet of earlier photo vectors (refresh): a photo found there is not re-encoded


@dataclass(frozen=True)
class Unit:
    """A work unit: a range of whole row groups of one catalog file."""

    index: int                      # stable id within the plan -> part-{index:05d}
    file: str                       # catalog file URI
    row_groups: tuple[int, ...]
    first_row: int                  # row offset of the unit within its file
    rows: int
    duplicates: tuple[tuple[int, str], ...]  # (row in unit, "first seen at ...") rejects
    fingerprint: str

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode task needs from the model bundle, without torch."""

    image_size: int
    has_text: bool
    tokenizer_json: str
    context_length: int
    model_sha256: str
    catalog_root: str
    image_column: str               # "image" (bytes), "image_uri", or their lists (contracts.photos)
    fetch_threads: int = 16
    jpeg_draft: bool = False        # the bundle's preprocessing (images.load_pixels)
    gpu_jpeg: bool = False          # hand JPEG bytes to the encoder actor (nvjpeg) instead of decoding
    reuse: str | None = None        # EncodeConfig.reuse


@dataclass(frozen=True)
class RejectRow:
    product_id: str | None
    problem: Problem
    row: int                        # row in the catalog file
    state: str                      # the row state the refresh diff compares (catalog.content_hash or rejected_state)
    photo: int | None = None        # the photo's position (a multi-photo catalog), None for the whole row


@dataclass(frozen=True)
class DecodedUnit:
    """What a decode task hands the writer (its pixels and token ids travel apart, as
    tensors the encoder actor reads without copying)."""

    product_ids: tuple[str, ...]
    content_hashes: tuple[str, ...]
    rows: tuple[int, ...]           # the catalog row of each product (for late rejects)
    rejects: tuple[RejectRow, ...]
    seconds: dict
    node: str = ""                  # the Ray node that decoded it
    retries: int = 0                # storage retries the decode task needed
    photos: tuple[int, ...] | None = None  # a multi-photo catalog: each output row's photo position ...
    photo_sha256: tuple[str, ...] | None = None  # ... and the sha256 of its bytes
    stats: dict | None = None       # a multi-photo catalog: photos encoded, reused and cut
    # a by-URI catalog: each output row's image fingerprint and source state (contracts.fingerprint)
    sources: tuple[tuple[str, ...], tuple[str, ...]] | None = None
