"""Evaluating a model bundle on a synth dataset's held-out queries (exact search).

Street queries: recall@1/@10 of the photographed product and the wrong-category top-1
rate. Reformulation queries (a product's photo + "in blue"): recall@1 of the sibling
the text names, searched with the image alone and, for text-capable models, with the
fused image + text vector.
"""
from __future__ import annotations

import numpy as np

from mimdex.encoders.bundle import Encoder
from mimdex.encoders.metrics import retrieval_metrics, top_k
from mimdex.infra import storage
from mimdex.infra.contracts.files import read_dataset


def evaluate_bundle(enc: Encoder, dataset_uri: str, k: int = 10) -> dict:
    catalog = read_dataset(storage.join(dataset_uri, "catalog"), "catalog",
                           columns=["product_id", "image", "category"]).to_pylist()
    queries = read_dataset(storage.join(dataset_uri, "queries"), "queries",
                           columns=["query_image", "product_id", "query_text", "kind"]).to_pylist()
    index = {r["product_id"]: i for i, r in enumerate(catalog)}
    cats = np.array([r["category"] for r in catalog])
    gallery = enc.encode_images([r["image"] for r in catalog])

    street = [q for q in queries if q["kind"] == "street"]
    truth = np.array([index[q["product_id"]] for q in street])
    top = top_k(enc.encode_images([q["query_image"] for q in street]), gallery, k)
    out = {"street_queries": len(street), **retrieval_metrics(top, truth, cats)}

    reform = [q for q in queries if q["kind"] == "reformulation"]
    if reform:
        target = np.array([index[q["product_id"]] for q in reform])
        images = [q["query_image"] for q in reform]
        out["reformulation_queries"] = len(reform)
        out["reform_recall@1_image_only"] = retrieval_metrics(
            top_k(enc.encode_images(images), gallery, 1), target)["recall@1"]
        if enc.model.has_text:
            fused = enc.encode_queries(images, [q["query_text"] for q in reform])
            out["reform_recall@1_image_text"] = retrieval_metrics(top_k(fused, gallery, 1), target)["recall@1"]
    return out
