"""The naive baseline: colour/texture-histogram nearest neighbour over a synth dataset.

It measures the failure mode MIM exists to fix. On the synthetic street photos it
mostly returns products of the wrong category whose *look* (colour + pattern) matches
the background distractor rather than the product in the photo.
"""
from __future__ import annotations

import numpy as np

from mimdex.encoders.histogram import histogram_features
from mimdex.infra import storage


def evaluate_histogram_nn(dataset_uri: str, k: int = 10) -> dict:
    """Top-1 / top-k behaviour of histogram NN on the dataset's street queries."""
    catalog = storage.parquet_dataset(storage.join(dataset_uri, "catalog")).to_table(
        columns=["product_id", "image", "category", "colour", "pattern"]).to_pylist()
    queries = storage.parquet_dataset(storage.join(dataset_uri, "queries")).to_table(
        filter=None, columns=["query_image", "product_id", "kind", "distractor_product_id"]).to_pylist()
    queries = [q for q in queries if q["kind"] == "street"]
    cat_feats = histogram_features([r["image"] for r in catalog])
    query_feats = histogram_features([q["query_image"] for q in queries], ignore_white=False)
    topk = np.argsort(-(query_feats @ cat_feats.T), axis=1)[:, :k]

    row_of = {r["product_id"]: r for r in catalog}
    look = lambda r: (r["colour"], r["pattern"])  # noqa: E731
    hit1 = hitk = wrong_cat = distractor_look = own_look = 0
    for q, top in zip(queries, topk):
        truth, first = row_of[q["product_id"]], catalog[top[0]]
        hit1 += first["product_id"] == truth["product_id"]
        hitk += any(catalog[j]["product_id"] == truth["product_id"] for j in top)
        wrong_cat += first["category"] != truth["category"]
        distractor_look += look(first) == look(row_of[q["distractor_product_id"]])
        own_look += look(first) == look(truth)
    n = max(len(queries), 1)
    return {
        "queries": len(queries),
        "recall@1": hit1 / n,
        f"recall@{k}": hitk / n,
        "wrong_category@1": wrong_cat / n,
        "top1_has_distractor_look": distractor_look / n,
        "top1_has_own_look": own_look / n,
    }
