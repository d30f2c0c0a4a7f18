"""The demo's evaluation through the *published* indexes (IVF-PQ at the default nprobe,
read back from storage by IndexReader), so its numbers are what a serving fleet would
see, not exact search over in-memory vectors.

Street queries: recall@1/@10 of the photographed product and how often the top-1 is of
another category. Reformulation queries (a sibling's photo + "in blue"): recall@1 of
the product the text names, with the image alone and with image + text fused.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mimdex.encoders.bundle import Encoder
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.infra.contracts.files import read_dataset
from mimdex.infra.contracts.recall import recall_at

K = 10


@dataclass(frozen=True)
class Queries:
    street: list[dict]   # query_image, product_id, distractor_product_id
    reform: list[dict]   # query_image, product_id (the target), query_text, source_product_id
    category: dict       # product_id -> category, for the whole catalog
    title: dict          # product_id -> title


def load_queries(dataset: str) -> Queries:
    catalog = read_dataset(storage.join(dataset, "catalog"), "catalog", columns=["product_id", "title", "category"])
    rows = read_dataset(storage.join(dataset, "queries"), "queries",
                        columns=["query_image", "product_id", "query_text", "kind", "source_product_id",
                                 "distractor_product_id"]).to_pylist()
    pids = catalog.column("product_id").to_pylist()
    return Queries(street=[q for q in rows if q["kind"] == "street"],
                   reform=[q for q in rows if q["kind"] == "reformulation"],
                   category=dict(zip(pids, catalog.column("category").to_pylist())),
                   title=dict(zip(pids, catalog.column("title").to_pylist())))


def search(reader: IndexReader, enc: Encoder, queries: list[dict], with_text: bool) -> list[list[dict]]:
    """Top-K id map rows (product_id, title, category, ..., score) per query."""
    if not queries:
        return []
    images = [q["query_image"] for q in queries]
    vectors = (enc.encode_queries(images, [q["query_text"] for q in queries]) if with_text
               else enc.encode_images(images))
    return reader.search_products(vectors, K)


def _recall(results: list[list[dict]], queries: list[dict], ks) -> dict:
    found = np.array([[r["product_id"] for r in res] + [None] * (K - len(res)) for res in results], dtype=object)
    target = np.array([t["product_id"] for t in queries], dtype=object)
    return recall_at(found.reshape(len(results), K), target, ks, digits=None)


def metrics(q: Queries, street: list[list[dict]], reform_image: list[list[dict]],
            reform_text: list[list[dict]] | None) -> dict:
    wrong = [bool(res) and res[0]["category"] != q.category[s["product_id"]] for res, s in zip(street, q.street)]
    out = {"street_queries": len(q.street), **_recall(street, q.street, (1, K)),
           "wrong_category@1": sum(wrong) / max(len(q.street), 1)}
    if q.reform:
        out["reformulation_queries"] = len(q.reform)
        out["reform_recall@1_image"] = _recall(reform_image, q.reform, (1,))["recall@1"]
        if reform_text is not None:
            out["reform_recall@1_image_text"] = _recall(reform_text, q.reform, (1,))["recall@1"]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def sample(n_total: int, n: int, seed: int) -> list[int]:
    """A seeded random sample of query positions: the report shows these, not picked ones."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_total, size=min(n, n_total), replace=False).tolist())


def marked(results: list[dict], target: str, q: Queries, top: int = 5) -> list[dict]:
    """The first ``top`` results with hit / wrong-category marks for the report."""
    want = q.category[target]
    return [{"product_id": r["product_id"], "title": r.get("title", ""), "score": round(r["score"], 3),
             "hit": r["product_id"] == target, "wrong_category": r.get("category") != want,
             **_matched_photo(r)} for r in results[:top]]


def _matched_photo(row: dict) -> dict:
    """A multi-photo catalog (synth-catalog --views): which photo matched, and its view kind."""
    photo = row.get("photo")
    if photo is None:
        return {}
    views = row.get("views") or []
    return {"photo": photo, "view": views[photo] if photo < len(views) else f"photo {photo}"}
