"""Search and evaluate a published index with the model its manifest names."""
from __future__ import annotations

import numpy as np

from mimdex.encoders.bundle import Encoder, load_bundle
from mimdex.indexing.reader import IndexReader
from mimdex.infra.contracts.files import read_dataset
from mimdex.infra.contracts.recall import recall_at
from mimdex.infra.contracts.vectors import ids_for
from mimdex.infra.errors import DataError, UsageError


def encoder_for(reader: IndexReader) -> Encoder:
    model = reader.manifest.model
    enc = load_bundle(model.uri)
    if enc.sha256 != model.sha256:
        raise DataError(f"model {model.uri} has sha256 {enc.sha256}, but index version {reader.version} "
                        f"was built with {model.sha256}")
    return enc


def query_vectors(enc: Encoder, images: list[bytes] | None, texts: list[str] | None) -> np.ndarray:
    """Image only, text only, or image + text fused (multimodal search)."""
    if texts and not enc.model.has_text:
        raise UsageError("--text: this index's model is image-only (no text tower)")
    if images and texts:
        return enc.encode_queries(images, texts)
    if images:
        return enc.encode_images(images)
    if texts:
        return enc.encode_texts(texts)
    raise UsageError("give --image FILE, --text TEXT, or both")


def evaluate_queries(reader: IndexReader, queries_uri: str, nprobe: int | None = None,
                     limit: int | None = None) -> dict:
    """recall@k of the true product_id for street queries (query_image [+ query_text])."""
    enc = encoder_for(reader)
    table = read_dataset(queries_uri, "queries", required=("query_image", "product_id"))
    if limit:
        table = table.slice(0, limit)
    texts = table.column("query_text").to_pylist() if "query_text" in table.column_names else None
    use_text = reader.manifest.vector != "image" and texts is not None
    try:
        vectors = query_vectors(enc, table.column("query_image").to_pylist(), texts if use_text else None)
    except ValueError as exc:  # an undecodable query image
        raise DataError(f"queries {queries_uri}: {exc}") from exc
    _, _, found = reader.search_distinct(vectors, 100, nprobe)  # found: any photo of the product
    return {"queries": table.num_rows, "nprobe": nprobe or reader.default_nprobe, "version": reader.version,
            **recall_at(found, ids_for(table.column("product_id").to_pylist()))}
