"""Products with several photos: the list columns, their bound, each photo's id and the
product's state, and what a product contributes to an index (docs/contracts.md, "Photos").

A catalog gives a product's photos as ``images`` (list of binary) or ``image_uris``
(list of string), ordered, the first being the main photo. Encode writes one part row
per usable photo, with its ``photo`` position and a content hash per photo; a photo that
cannot be used is a reject row with its position, and the product keeps its good photos.
"""
from __future__ import annotations

import hashlib

import numpy as np

LIST_COLUMNS = {"images": "image", "image_uris": "image_uri"}  # list column -> its single-photo twin
MAX_PHOTOS = 16            # photos a product contributes; the rest are cut (and counted in the report)
MODES = ("every", "main", "pooled")
DEFAULT_MODE = "every"
_MASK = (1 << 63) - 1      # non-negative: faiss reserves -1 for "no result"


def bounded(photos: list | None) -> tuple[list, int]:
    """(the photos encode uses, how many were cut beyond MAX_PHOTOS)."""
    photos = list(photos or [])
    return photos[:MAX_PHOTOS], max(0, len(photos) - MAX_PHOTOS)


def product_state(photo_states: list[str]) -> str:
    """A multi-photo product's state from its photos' states in list order: the content
    hash of each (image bytes, title, model) or the reject state of a photo that cannot be
    used. Any added, removed, changed or moved photo (or a new title or model) changes it."""
    h = hashlib.sha256()
    for state in photo_states:
        h.update(state.encode("ascii"))
        h.update(b"\n")
    return "photos:" + h.hexdigest()


def photo_id(product_key: int, position: int) -> int:
    """The int64 id of a product's photo: the main photo keeps the product's own id (so a
    one-photo product has the id it would have in a single-image catalog); another
    position is a hash of the product's id and the position."""
    if position == 0:
        return int(product_key)
    digest = hashlib.blake2b(f"{int(product_key)}:{int(position)}".encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


def photo_ids(product_keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.fromiter((photo_id(k, p) for k, p in zip(product_keys.tolist(), positions.tolist())),
                       dtype=np.int64, count=len(product_keys))


def groups(product_ids: list[str]) -> np.ndarray:
    """Start offsets of runs of one product_id (encode writes a product's photos together)."""
    if not product_ids:
        return np.zeros(0, np.int64)
    arr = np.asarray(product_ids, dtype=object)
    change = np.ones(len(arr), bool)
    change[1:] = arr[1:] != arr[:-1]
    return np.flatnonzero(change)


def select(vectors: np.ndarray, product_ids: list[str], positions: np.ndarray, mode: str):
    """What each product contributes under ``mode``: (vectors, row of each, pooled?).

    every: each usable photo; main: the product's first usable photo; pooled: the
    normalised mean of its usable photos' vectors (one per product, in the main's row)."""
    if mode == "every":
        return vectors, np.arange(len(vectors)), False
    starts = groups(product_ids)
    if mode == "main":
        return vectors[starts], starts, False
    sums = np.add.reduceat(vectors, starts, axis=0) if len(starts) else vectors[:0]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    pooled = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    return np.ascontiguousarray(pooled, dtype=np.float32), starts, True
