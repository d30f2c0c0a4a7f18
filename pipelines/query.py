"""Search and evaluate a published index with the model its manifest names."""
from __future__ import annotations

import numpy as np

from mimdex.encoders.bundle import Encoder
from mimdex.encoders.queries import model_of, vectors_for
from mimdex.indexing.query_recall import query_recall
from mimdex.indexing.reader import IndexReader
from mimdex.infra.errors import UsageError


def encoder_for(reader: IndexReader) -> Encoder:
    """The model the version was built with, checksum checked."""
    return model_of(reader.manifest.model, f"index version {reader.version}")


def search_vector(enc: Encoder, images: list[bytes] | None, texts: list[str] | None) -> np.ndarray:
    """`mimdex search`'s query: image only, text only, or image + text fused (multimodal search)."""
    if texts and not enc.model.has_text:
        raise UsageError("--text: this index's model is image-only (no text tower)")
    if images and texts:
        return enc.encode_queries(images, texts)
    if images:
        return enc.encode_images(images)
    if texts:
        return enc.encode_texts(texts)
    raise UsageError("give --image FILE, --text TEXT, or both")


def evaluate_queries(reader: IndexReader, queries_uri: str, nprobe: int | None = None, limit: int | None = None) -> dict:
    """The recall the quality gate records (indexing.query_recall), for a published version:
    the same queries at the version's default nprobe give the figures in its manifest."""
    m = reader.manifest
    qv = vectors_for(m.model, f"index version {reader.version}", queries_uri, m.vector, limit)
    return {"version": reader.version, **query_recall(reader, qv, nprobe)}
