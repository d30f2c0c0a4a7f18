"""Product attributes and the text built from them.

A product is (category, colour, pattern, brand) plus its family's pattern ink colour.
Products come in *families*: one brand's one category in a small grid of colours x
patterns, so every product has siblings that differ in exactly one attribute (what a
4-tower reformulation query like "in blue" points at).
"""
from __future__ import annotations

from dataclasses import dataclass

# name -> (material word used in titles, shape drawn by render.py)
CATEGORIES: dict[str, str] = {
    "mug": "ceramic",
    "vase": "glass",
    "t-shirt": "cotton",
    "handbag": "leather",
    "bottle": "steel",
    "lamp": "table",
    "hat": "wool",
    "clock": "wall",
    "notebook": "paper",
    "cushion": "velvet",
    "umbrella": "nylon",
    "kite": "nylon",
    "sneaker": "canvas",
    "teapot": "porcelain",
    "star ornament": "felt",
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35),
    "orange": (240, 130, 20),
    "yellow": (240, 210, 40),
    "green": (40, 150, 60),
    "teal": (20, 140, 140),
    "blue": (40, 80, 210),
    "navy": (20, 30, 90),
    "purple": (120, 50, 160),
    "pink": (240, 130, 180),
    "brown": (120, 70, 30),
    "grey": (130, 130, 130),
    "black": (25, 25, 25),
}

# Pattern ink colours: picked per family, always distinct from the family's colours.
INKS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (250, 250, 250),
    "gold": (210, 170, 40),
    "red": (200, 30, 35),
    "navy": (20, 30, 90),
}

# pattern -> (title phrase after "with <ink> ...", short adjective for text queries)
PATTERNS: dict[str, tuple[str, str]] = {
    "plain": ("", "plain"),
    "stripes": ("stripes", "striped"),
    "diagonal": ("diagonal stripes", "diagonal-striped"),
    "dots": ("dots", "dotted"),
    "zebra": ("zebra stripes", "zebra"),
    "checks": ("checks", "checked"),
    "chevron": ("chevrons", "chevron"),
    "grid": ("grid lines", "grid"),
    "leopard": ("leopard spots", "leopard"),
    "crosses": ("crosses", "cross-print"),
}

_BRAND_HEADS = (
    "Nor", "Vel", "Kal", "Bri", "Ost", "Mar", "Lun", "Sol", "Tav", "Fen", "Gar", "Hal",
    "Ivo", "Jor", "Kes", "Lor", "Mir", "Nab", "Orm", "Pel", "Quin", "Ros", "Sev", "Tor",
    "Ulm", "Var", "Wen", "Xan", "Yor", "Zel", "Ash", "Bel", "Cor", "Dal", "Ely", "Fal",
    "Gil", "Hav", "Isk", "Jun",
)
_BRAND_TAILS = (
    "dia", "ora", "ex", "ica", "ven", "ano", "ix", "ulo", "eth", "ara", "io", "usk",
    "ene", "ard", "ola", "ima", "ond", "ys", "aro", "eni", "ak", "ette", "ume", "ova", "iq",
)
BRANDS: tuple[str, ...] = tuple(h + t for h in _BRAND_HEADS for t in _BRAND_TAILS)


@dataclass(frozen=True)
class Product:
    product_id: str
    family: int
    category: str
    colour: str
    pattern: str
    ink: str
    brand: str

    @property
    def title(self) -> str:
        return product_title(self)


def product_title(p: Product) -> str:
    """'Nordia red ceramic mug with black zebra stripes'."""
    base = f"{p.brand} {p.colour} {CATEGORIES[p.category]} {p.category}"
    phrase = PATTERNS[p.pattern][0]
    return f"{base} with {p.ink} {phrase}" if phrase else base


def short_query(p: Product, level: int) -> str:
    """What a shopper types: 'mug', 'red mug', 'red zebra mug' (by ``level`` 0..2)."""
    if level <= 0:
        return p.category
    if level == 1:
        return f"{p.colour} {p.category}"
    return f"{p.colour} {PATTERNS[p.pattern][1]} {p.category}"


def reformulation(source: Product, target: Product) -> str:
    """Text that turns a photo of ``source`` into a search for sibling ``target``."""
    if source.colour != target.colour:
        return f"in {target.colour}"
    if target.pattern == "plain":
        return "plain"
    return f"with {PATTERNS[target.pattern][0]}"
