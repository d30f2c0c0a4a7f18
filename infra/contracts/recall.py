"""recall@k: the share of queries whose target is among the first k results.

One definition for every report: index evaluation against exact search (the target is
the exact nearest neighbour, faiss's "1-recall@k"), street-query evaluation (the target
is the photographed product), training validation and the demo.
"""
from __future__ import annotations

import numpy as np

KS = (1, 10, 100)


def hits(found: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    """Per query: is ``target`` among the first ``k`` entries of its row of ``found``."""
    return (np.asarray(found)[:, :k] == np.asarray(target)[:, None]).any(1)


def recall_at(found: np.ndarray, target: np.ndarray, ks=KS, digits: int | None = 4) -> dict[str, float]:
    """{"recall@k": share} for each k (rounded to ``digits``; None keeps full precision)."""
    out = {}
    for k in ks:
        value = float(hits(found, target, k).mean()) if len(found) else 0.0
        out[f"recall@{k}"] = round(value, digits) if digits is not None else value
    return out


def street_recall(found: np.ndarray, targets: np.ndarray, ks=KS, found_categories=None, target_categories=None,
                  digits: int | None = 4) -> dict:
    """Street queries (contracts.queries): ``found`` holds each query's distinct products
    in rank order (any key: product ids, catalog rows; a short row padded with a key no
    target has), ``targets`` the product each must find. recall@k for each k and, given
    the first result's and the target's categories, wrong_category@1: the share of
    queries whose first result is of another category (none found counts as wrong)."""
    out = {"street_queries": len(targets), **recall_at(found, targets, ks, digits)}
    if found_categories is not None:
        found_c, target_c = np.asarray(found_categories, dtype=object), np.asarray(target_categories, dtype=object)
        wrong = float(np.mean([f is None or f != t for f, t in zip(found_c, target_c)])) if len(target_c) else 0.0
        out["wrong_category@1"] = round(wrong, digits) if digits is not None else wrong
    return out


def reformulation_recall(found_image: np.ndarray, found_fused: np.ndarray | None, targets: np.ndarray,
                         digits: int | None = 4) -> dict:
    """Reformulation queries (a sibling's photo + text naming the target): recall@1 of
    the target from the photo alone and, for a model with a text tower, from the fused
    photo + text vector."""
    out = {"reformulation_queries": len(targets),
           "reform_recall@1_image": recall_at(found_image, targets, (1,), digits)["recall@1"]}
    if found_fused is not None:
        out["reform_recall@1_image_text"] = recall_at(found_fused, targets, (1,), digits)["recall@1"]
    return out
