"""Evaluating a model bundle on a synth dataset's held-out queries (exact search).

Street queries: recall@1/@10 of the photographed product and the wrong-category top-1
rate. Reformulation queries (a product's photo + "in blue"): recall@1 of the sibling
the text names, searched with the image alone and, for text-capable models, with the
fused image + text vector.
"""
from __future__ import annotations

import numpy as np

from mimdex.encoders.bundle import Encoder
from mimdex.infra import storage


def _topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ gallery.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def evaluate_bundle(enc: Encoder, dataset_uri: str, k: int = 10) -> dict:
    catalog = storage.parquet_dataset(storage.join(dataset_uri, "catalog")).to_table(
        columns=["product_id", "image", "category"]).to_pylist()
    queries = storage.parquet_dataset(storage.join(dataset_uri, "queries")).to_table(
        columns=["query_image", "product_id", "query_text", "kind"]).to_pylist()
    index = {r["product_id"]: i for i, r in enumerate(catalog)}
    cats = np.array([r["category"] for r in catalog])
    gallery = enc.encode_images([r["image"] for r in catalog])

    street = [q for q in queries if q["kind"] == "street"]
    truth = np.array([index[q["product_id"]] for q in street])
    top = _topk(enc.encode_images([q["query_image"] for q in street]), gallery, k)
    out = {"street_queries": len(street),
           "recall@1": float(np.mean(top[:, 0] == truth)),
           f"recall@{k}": float(np.mean((top == truth[:, None]).any(axis=1))),
           "wrong_category@1": float(np.mean(cats[top[:, 0]] != cats[truth]))}

    reform = [q for q in queries if q["kind"] == "reformulation"]
    if reform:
        target = np.array([index[q["product_id"]] for q in reform])
        img = enc.encode_images([q["query_image"] for q in reform])
        out["reformulation_queries"] = len(reform)
        out["reform_recall@1_image_only"] = float(np.mean(_topk(img, gallery, 1)[:, 0] == target))
        if enc.model.has_text:
            import torch

            from mimdex.encoders.model import fuse
            txt = enc.encode_texts([q["query_text"] for q in reform])
            fused = fuse(torch.from_numpy(img), torch.from_numpy(txt), enc.cfg.fuse_alpha).numpy()
            out["reform_recall@1_image_text"] = float(np.mean(_topk(fused, gallery, 1)[:, 0] == target))
    return out
