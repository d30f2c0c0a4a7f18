"""Evaluating a model bundle on a synth dataset's evaluation queries (contracts.queries)
by exact search over the whole catalog: street recall@1/@10 and wrong-category top-1,
reformulation recall@1 from the photo and from photo + text (contracts.recall)."""
from __future__ import annotations

import numpy as np

from mimdex.encoders.bundle import Encoder
from mimdex.encoders.metrics import retrieval_metrics, top_k
from mimdex.encoders.queries import query_vectors
from mimdex.infra import storage
from mimdex.infra.contracts.files import read_dataset
from mimdex.infra.contracts.queries import read_queries
from mimdex.infra.contracts.recall import reformulation_recall


def evaluate_bundle(enc: Encoder, dataset_uri: str, k: int = 10) -> dict:
    catalog = read_dataset(storage.join(dataset_uri, "catalog"), "catalog",
                           columns=["product_id", "image", "category"]).to_pylist()
    qv = query_vectors(enc, read_queries(storage.join(dataset_uri, "queries")), "image")
    index = {r["product_id"]: i for i, r in enumerate(catalog)}
    cats = np.array([r["category"] for r in catalog])
    gallery = enc.encode_images([r["image"] for r in catalog])
    rows = lambda targets: np.array([index[t] for t in targets], dtype=np.int64)  # noqa: E731
    out = retrieval_metrics(top_k(qv.street, gallery, k), rows(qv.street_targets), cats)
    if len(qv.reform_targets):
        fused = None if qv.reform_fused is None else top_k(qv.reform_fused, gallery, 1)
        out.update(reformulation_recall(top_k(qv.reform_image, gallery, 1), fused, rows(qv.reform_targets),
                                        digits=None))
    return out
