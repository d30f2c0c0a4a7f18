"""The naive baseline: colour/texture-histogram nearest neighbour over a synth dataset.

It measures the failure mode MIM exists to fix. On the synthetic street photos it
mostly returns products of the wrong category whose *look* (colour + pattern) matches
the background distractor rather than the product in the photo.
"""
from __future__ import annotations

import numpy as np

from mimdex.encoders.histogram import histogram_features
from mimdex.encoders.metrics import retrieval_metrics, top_k
from mimdex.infra import storage
from mimdex.infra.contracts.files import read_dataset
from mimdex.infra.contracts.queries import read_queries


def evaluate_histogram_nn(dataset_uri: str, k: int = 10) -> dict:
    """Top-1 / top-k behaviour of histogram NN on the dataset's street queries."""
    table = read_dataset(storage.join(dataset_uri, "catalog"), "catalog")
    image = "image" if "image" in table.column_names else "images"  # several photos: the main one
    catalog = table.select(["product_id", image, "category", "colour", "pattern"]).to_pylist()
    uri = storage.join(dataset_uri, "queries")
    street = read_queries(uri, limit=None).street
    # the synthetic tables' provenance column, in the street rows' order (contracts.queries)
    rows = read_dataset(uri, "queries", columns=["kind", "distractor_product_id"]).to_pylist()
    distractors = [r["distractor_product_id"] for r in rows if r["kind"] == "street"]
    cat_feats = histogram_features([r["image"] if image == "image" else r["images"][0] for r in catalog])
    query_feats = histogram_features(list(street.images), ignore_white=False)
    top = top_k(query_feats, cat_feats, k)

    index = {r["product_id"]: i for i, r in enumerate(catalog)}
    truth = np.array([index[t] for t in street.targets])
    categories = np.array([r["category"] for r in catalog])
    look = lambda i: (catalog[i]["colour"], catalog[i]["pattern"])  # noqa: E731
    n = max(len(street), 1)
    distractor_look = sum(look(t) == look(index[d]) for t, d in zip(top[:, 0], distractors))
    own_look = sum(look(t) == look(i) for t, i in zip(top[:, 0], truth))
    return {
        **retrieval_metrics(top, truth, categories),
        "top1_has_distractor_look": distractor_look / n,
        "top1_has_own_look": own_look / n,
    }
