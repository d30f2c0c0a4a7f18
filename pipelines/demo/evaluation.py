"""The demo's evaluation through the *published* indexes (read back from storage by
IndexReader, at the default nprobe), so its numbers are what a serving fleet would see
and what each version's quality gate recorded: the figures are indexing.query_recall's,
on the dataset's evaluation queries (contracts.queries). The searches here only pick
the examples the report shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mimdex.infra import storage
from mimdex.infra.contracts.files import read_dataset
from mimdex.infra.contracts.queries import Queries, read_queries

K = 10


@dataclass(frozen=True)
class Catalog:
    category: dict       # product_id -> category, for the whole catalog
    title: dict          # product_id -> title


def load(dataset: str) -> tuple[Queries, Catalog]:
    catalog = read_dataset(storage.join(dataset, "catalog"), "catalog", columns=["product_id", "title", "category"])
    pids = catalog.column("product_id").to_pylist()
    return (read_queries(storage.join(dataset, "queries")),
            Catalog(category=dict(zip(pids, catalog.column("category").to_pylist())),
                    title=dict(zip(pids, catalog.column("title").to_pylist()))))


def sample(n_total: int, n: int, seed: int) -> list[int]:
    """A seeded random sample of query positions: the report shows these, not picked ones."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_total, size=min(n, n_total), replace=False).tolist())


def marked(results: list[dict], target: str, cat: Catalog, top: int = 5) -> list[dict]:
    """The first ``top`` results with hit / wrong-category marks for the report."""
    want = cat.category[target]
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
