"""Rows of the three synthetic tables, generated lazily from a Plan.

Every random choice draws from a generator seeded by (seed, table, row index), so a
row's content does not depend on how many rows came before it or on process order.
"""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from mimdex.pipelines.synth.attributes import Product, reformulation, short_query
from mimdex.pipelines.synth.plan import Plan, SynthConfig
from mimdex.pipelines.synth.render import look_of, render_product, render_street
from mimdex.pipelines.synth.views import render_view, view_kinds

CATALOG_SCHEMA = pa.schema([
    ("product_id", pa.string()), ("title", pa.string()), ("image", pa.binary()),
    ("category", pa.string()), ("colour", pa.string()), ("pattern", pa.string()),
    ("ink", pa.string()), ("brand", pa.string()), ("family", pa.int32()), ("split", pa.string()),
])

QUERY_SCHEMA = pa.schema([
    ("query_id", pa.string()), ("query_image", pa.binary()), ("product_id", pa.string()),
    ("query_text", pa.string()), ("kind", pa.string()),
    # The product actually in the photo (differs from product_id for reformulations)
    # and the product whose look dominates the background.
    ("source_product_id", pa.string()), ("distractor_product_id", pa.string()),
])

_TABLE_TRAIN, _TABLE_QUERIES, _TABLE_REFORM, _TABLE_VIEWS = 11, 12, 13, 14


def catalog_schema(views: int) -> pa.Schema:
    """One ``image`` per product, or (--views > 1) a list of photos and the kind of each."""
    if views <= 1:
        return CATALOG_SCHEMA
    i = CATALOG_SCHEMA.get_field_index("image")
    return (CATALOG_SCHEMA.set(i, pa.field("images", pa.list_(pa.binary())))
            .insert(i + 1, pa.field("views", pa.list_(pa.string()))))
LARGE_IMAGE_SIZE = 1600


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=90)
    else:
        img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def catalog_image(p: Product, index: int, size: int) -> bytes:
    """Clean product shot; a deterministic share of rows is awkward but valid."""
    rgb, alpha = render_product(look_of(p), size)
    if index % 97 == 5:  # RGBA with a transparent background
        rgba = np.dstack([rgb, (alpha * 255).round().astype(np.uint8)])
        return _encode(rgba, "PNG")
    if index % 97 == 17:  # grayscale
        return _encode(np.asarray(Image.fromarray(rgb).convert("L")), "PNG")
    if index % 211 == 3:  # large
        big = Image.fromarray(rgb).resize((LARGE_IMAGE_SIZE, LARGE_IMAGE_SIZE), Image.Resampling.BICUBIC)
        return _encode(np.asarray(big), "JPEG")
    return _encode(rgb, "JPEG")


def _shoot(products: list[Product], subject: Product, rng: np.random.Generator,
           size: int) -> tuple[bytes, str]:
    """A street photo of ``subject`` over a distractor of another category."""
    n = len(products)
    while True:
        distractor = products[int(rng.integers(n))]
        if distractor.category != subject.category:
            break
    clutter = [look_of(products[int(i)]) for i in rng.integers(n, size=int(rng.integers(1, 4)))]
    arr = render_street(look_of(subject), look_of(distractor), rng, size, clutter)
    return _encode(arr, "JPEG"), distractor.product_id


def _spec(qid, target: Product, text, kind, source: Product, seed_key: tuple) -> dict:
    """A query row without its image: ``materialize`` renders it from ``_shoot``."""
    return {"query_id": qid, "product_id": target.product_id, "query_text": text, "kind": kind,
            "source_product_id": source.product_id, "_shoot": seed_key}


def materialize(spec: dict, products: list[Product], by_id: dict[str, int], size: int) -> dict:
    """Render the image a row spec describes; pure function of its arguments."""
    if "_catalog" in spec:
        index = spec.pop("_catalog")
        main = catalog_image(products[index], index, size)
        if "_views" not in spec:
            spec["image"] = main
            return spec
        seed, max_views = spec.pop("_views")
        rng = np.random.default_rng([seed, _TABLE_VIEWS, index])
        kinds = view_kinds(rng, max_views)
        look = look_of(products[index])
        spec["images"] = [main] + [_encode(render_view(look, k, rng, size), "JPEG") for k in kinds[1:]]
        spec["views"] = kinds
        return spec
    seed_key = spec.pop("_shoot")
    source = products[by_id[spec["source_product_id"]]]
    spec["query_image"], spec["distractor_product_id"] = _shoot(
        products, source, np.random.default_rng(list(seed_key)), size)
    return spec


def catalog_specs(plan: Plan, cfg: SynthConfig) -> Iterator[dict]:
    for i, p in enumerate(plan.products):
        yield {
            "product_id": p.product_id, "title": p.title, "_catalog": i,
            **({"_views": (cfg.seed, cfg.views)} if cfg.views > 1 else {}),
            "category": p.category, "colour": p.colour, "pattern": p.pattern, "ink": p.ink,
            "brand": p.brand, "family": p.family,
            "split": "heldout" if p.product_id in plan.heldout else "train",
        }


def train_pair_specs(plan: Plan, cfg: SynthConfig) -> Iterator[dict]:
    """Street photos of training products, plus reformulations from a sibling's photo."""
    siblings = plan.siblings()
    for i, p in enumerate(plan.products):
        if p.product_id in plan.heldout:
            continue
        for k in range(cfg.pairs_per_product):
            text_rng = np.random.default_rng([cfg.seed, _TABLE_TRAIN, i, k, 1])
            yield _spec(f"T{i:07d}-{k}", p, short_query(p, int(text_rng.integers(3))),
                        "street", p, (cfg.seed, _TABLE_TRAIN, i, k))
        sibs = [s for s in siblings[p.product_id] if s.product_id not in plan.heldout]
        if sibs:
            rng = np.random.default_rng([cfg.seed, _TABLE_REFORM, i, 1])
            source = sibs[int(rng.integers(len(sibs)))]
            yield _spec(f"T{i:07d}-r", p, reformulation(source, p), "reformulation", source,
                        (cfg.seed, _TABLE_REFORM, i))


def query_specs(plan: Plan, cfg: SynthConfig) -> Iterator[dict]:
    """``cfg.queries`` street queries of held-out products, then half as many
    reformulation queries (a held-out product's photo + text naming a sibling)."""
    siblings = plan.siblings()
    held = [p for p in plan.products if p.product_id in plan.heldout]
    pick = np.random.default_rng([cfg.seed, _TABLE_QUERIES])
    chosen = pick.choice(len(held), cfg.queries, replace=cfg.queries > len(held))
    for q, idx in enumerate(chosen):
        p = held[int(idx)]
        text_rng = np.random.default_rng([cfg.seed, _TABLE_QUERIES, q, 1])
        yield _spec(f"Q{q:07d}", p, short_query(p, int(text_rng.integers(3))), "street", p,
                    (cfg.seed, _TABLE_QUERIES, q))
    with_sibs = [p for p in held if siblings[p.product_id]]
    n_reform = cfg.queries // 2 if with_sibs else 0
    chosen = pick.choice(len(with_sibs), n_reform, replace=n_reform > len(with_sibs)) if n_reform else []
    for q, idx in enumerate(chosen):
        source = with_sibs[int(idx)]
        rng = np.random.default_rng([cfg.seed, _TABLE_REFORM + 100, q, 1])
        sibs = siblings[source.product_id]
        target = sibs[int(rng.integers(len(sibs)))]
        yield _spec(f"R{q:07d}", target, reformulation(source, target), "reformulation", source,
                    (cfg.seed, _TABLE_REFORM + 100, q))
