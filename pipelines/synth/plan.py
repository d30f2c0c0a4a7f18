"""Deterministic planning of a synthetic catalog: which products, which split.

Only attributes live here (a few hundred bytes per product, so 100k products plan in
memory); images are rendered later, row by row, while streaming to Parquet.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mimdex.infra.errors import UsageError
from mimdex.pipelines.synth.attributes import BRANDS, CATEGORIES, COLOURS, INKS, PATTERNS, Product

_ACCENTS = str.maketrans({"o": "ø", "a": "å", "e": "é", "u": "ü"})


@dataclass(frozen=True)
class SynthConfig:
    products: int
    queries: int
    seed: int
    heldout_frac: float = 0.2
    pairs_per_product: int = 2  # street photos per training product
    image_size: int = 160
    rows_per_file: int = 4096
    row_group_rows: int = 256
    views: int = 1              # photos per product: 1, or 1 to this many (main + pose/crop/background/lighting)

    def as_dict(self) -> dict:
        """The config as recorded in the dataset; ``views`` only when used, so a one-photo
        dataset is byte for byte what it was before views existed."""
        out = dataclasses.asdict(self)
        if self.views == 1:
            del out["views"]
        return out

    def validate(self) -> None:
        if self.products < 20:
            raise UsageError(f"--products must be at least 20, got {self.products}")
        if self.queries < 1:
            raise UsageError(f"--queries must be at least 1, got {self.queries}")
        if not 0.05 <= self.heldout_frac <= 0.5:
            raise UsageError(f"--heldout-frac must be in [0.05, 0.5], got {self.heldout_frac}")
        if self.pairs_per_product < 1:
            raise UsageError("--pairs-per-product must be at least 1")
        if not 1 <= self.views <= 4:
            raise UsageError(f"--views must be in [1, 4] (the main photo, then pose, crop, background or "
                             f"lighting views), got {self.views}")
        if not 32 <= self.image_size <= 1024:
            raise UsageError(f"--image-size must be in [32, 1024], got {self.image_size}")


@dataclass(frozen=True)
class Plan:
    products: list[Product]
    heldout: frozenset[str]  # product ids of held-out families

    def siblings(self) -> dict[str, list[Product]]:
        """product_id -> products of the same family differing in exactly one attribute."""
        by_family: dict[int, list[Product]] = {}
        for p in self.products:
            by_family.setdefault(p.family, []).append(p)
        out = {}
        for p in self.products:
            out[p.product_id] = [
                q for q in by_family[p.family]
                if q is not p and (q.colour != p.colour) + (q.pattern != p.pattern) == 1
            ]
        return out


def plan_catalog(cfg: SynthConfig) -> Plan:
    """Families of (category, brand) with a colour x pattern grid each, until N products."""
    cfg.validate()
    rng = np.random.default_rng([cfg.seed, 0])
    pairs = [(c, b) for c in CATEGORIES for b in BRANDS]
    order = rng.permutation(len(pairs))
    colours, patterns, inks = list(COLOURS), list(PATTERNS), list(INKS)
    products: list[Product] = []
    heldout: set[str] = set()
    for family, pair_idx in enumerate(order):
        if len(products) >= cfg.products:
            break
        category, brand = pairs[pair_idx]
        frng = np.random.default_rng([cfg.seed, 1, family])
        if family % 29 == 7:  # a share of non-ASCII brand names ("Nørdiå")
            brand = brand.translate(_ACCENTS)
        fam_colours = [colours[i] for i in frng.choice(len(colours), frng.integers(2, 5), replace=False)]
        fam_patterns = [patterns[i] for i in frng.choice(len(patterns), frng.integers(2, 4), replace=False)]
        ink_choices = [i for i in inks if i not in fam_colours]
        ink = ink_choices[frng.integers(len(ink_choices))]
        is_heldout = frng.random() < cfg.heldout_frac
        j = 0
        for colour in fam_colours:
            for pattern in fam_patterns:
                if len(products) >= cfg.products:
                    break
                pid = f"MX{family:06d}-{j}"
                j += 1
                products.append(Product(pid, family, category, colour, pattern, ink, brand))
                if is_heldout:
                    heldout.add(pid)
    if len(products) < cfg.products:
        raise UsageError(f"--products {cfg.products} exceeds what the attribute space holds "
                         f"without duplicate products ({len(products)})")
    # Tiny catalogs can draw no held-out family (or only held-out ones): keep both splits.
    last, first = products[-1].family, products[0].family
    if not heldout:
        heldout = {p.product_id for p in products if p.family == last}
    elif len(heldout) == len(products):
        heldout -= {p.product_id for p in products if p.family == first}
    if not heldout or len(heldout) == len(products):
        raise UsageError("the catalog is too small for a train/held-out split; raise --products")
    return Plan(products, frozenset(heldout))
