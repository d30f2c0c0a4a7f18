"""Evaluation queries (contracts.queries) as vectors of one model: the one rule for how a
query is embedded, used by every job that evaluates (build-index's and the refresh's
gates, `mimdex eval`, the demo) before it hands the vectors to the index layer."""
from __future__ import annotations

import numpy as np

from mimdex.encoders.bundle import Encoder, load_bundle
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.contracts.queries import LIMIT, Queries, QueryRows, QueryVectors, read_queries
from mimdex.infra.errors import DataError

VECTORS = ("image", "text", "fused")


def street_vectors(enc: Encoder, rows: QueryRows, vector: str) -> np.ndarray:
    """A street query searches an index of ``vector`` with: its photo (image index, or
    a query without text); its text (title index); its photo fused with its text
    (fused index), as the catalog's own vectors were made."""
    if vector not in VECTORS:
        raise ValueError(f"vector {vector!r} is not one of {VECTORS}")
    if not len(rows):
        return np.zeros((0, enc.model.cfg.embed_dim), np.float32)
    has_text = enc.model.has_text and all(t for t in rows.texts)
    if vector == "image" or not has_text:
        return enc.encode_images(list(rows.images))
    if vector == "text":
        return enc.encode_texts(list(rows.texts))
    return enc.encode_queries(list(rows.images), list(rows.texts))


def query_vectors(enc: Encoder, queries: Queries, vector: str) -> QueryVectors:
    """Every query of ``queries`` embedded for an index of ``vector``; exit 65 naming the
    file for a query photo that does not decode."""
    try:
        street = street_vectors(enc, queries.street, vector)
        reform = queries.reformulation
        images = list(reform.images)
        reform_image = enc.encode_images(images) if images else np.zeros((0, enc.model.cfg.embed_dim), np.float32)
        fused = (enc.encode_queries(images, list(reform.texts)) if images else reform_image) \
            if enc.model.has_text else None
    except ValueError as exc:  # an undecodable query photo
        raise DataError(f"queries {queries.uri}: {exc}") from exc
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return QueryVectors(queries.uri, f32(street), queries.street.targets, f32(reform_image),
                        None if fused is None else f32(fused), reform.targets)


def model_of(ref: ModelRef, made: str) -> Encoder:
    """The bundle ``ref`` names, refused (exit 65) unless it is the one ``made`` was made with."""
    enc = load_bundle(ref.uri)
    if enc.sha256 != ref.sha256:
        raise DataError(f"model {ref.uri} has sha256 {enc.sha256}, but {made} was made with {ref.sha256}")
    return enc


def vectors_for(ref: ModelRef, made: str, queries_uri: str, vector: str, limit: int | None = LIMIT) -> QueryVectors:
    """The queries at ``queries_uri`` embedded by the model ``made`` (embeddings, an index
    version) was made with, for an index of ``vector``: what an evaluating job hands the
    index layer."""
    return query_vectors(model_of(ref, made), read_queries(queries_uri, limit), vector)
