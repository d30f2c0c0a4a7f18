"""Index vectors from embedding rows: image, text, or the two fused (multimodal)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from mimdex.infra.errors import DataError

KINDS = ("image", "text", "fused")


def column_matrix(table: pa.Table, column: str) -> np.ndarray:
    arr = table.column(column).combine_chunks()
    d = arr.type.list_size
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), d).astype(np.float32)


def index_vectors(table: pa.Table, kind: str, fuse_alpha: float) -> np.ndarray:
    """float32 N x d; fused = normalize((1 - alpha) * image + alpha * text), as the
    model fuses a query image with its reformulation text."""
    if kind in ("text", "fused") and "text_emb" not in table.column_names:
        raise DataError(f"--vector {kind}: the embeddings have no text_emb (an image-only model)")
    if kind == "image":
        return column_matrix(table, "image_emb")
    if kind == "text":
        return column_matrix(table, "text_emb")
    v = (1.0 - fuse_alpha) * column_matrix(table, "image_emb") + fuse_alpha * column_matrix(table, "text_emb")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


def invalid_reasons(v: np.ndarray) -> np.ndarray:
    """Per row: '' for a usable vector, else why it is skipped (nan_or_inf, zero)."""
    out = np.full(len(v), "", dtype=object)
    finite = np.isfinite(v).all(1)
    out[~finite] = "nan_or_inf"
    out[finite & ~(np.abs(v) > 0).any(1)] = "zero"
    return out
