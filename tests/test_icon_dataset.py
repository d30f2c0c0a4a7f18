"""The real-image benchmark's dataset plan (tests/benchmarks/icon_dataset.py): which
icons are products, their titles, categories, street photos, reformulations and split,
from a made-up meta.json in the package's format."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "benchmarks"))
import icon_dataset  # noqa: E402


def _icon(name, tags, aliases=(), deprecated=False):
    return {"name": name, "tags": list(tags), "aliases": list(aliases), "deprecated": deprecated}


META = [
    _icon("cart", ["Shopping"], ["shopping-cart", "trolley", "basket"]),
    _icon("cart-outline", ["Shopping"]),
    _icon("cart-plus", ["Shopping"], ["add-shopping-cart"]),
    _icon("airplane", ["Transportation + Flying", "Navigation"]),
    _icon("airplane-off", ["Transportation + Flying"]),
    _icon("airplane-off-outline", ["Transportation + Flying"]),
    _icon("alpha-a", ["Alpha / Numeric"]),
    _icon("emoticon-happy", ["Emoji"]),
    _icon("old-thing", ["Shopping"], deprecated=True),
    _icon("untagged", []),
]


def test_products_titles_categories_photos_and_reformulations():
    p = icon_dataset.plan(META, seed=0)
    by = {q.name: q for q in p.products}
    assert sorted(by) == ["airplane", "airplane-off", "cart", "cart-plus"]
    assert by["cart"].title == "cart, shopping cart, trolley"          # name + two aliases, in words
    assert by["cart"].query == "shopping cart" and by["airplane"].query == "airplane"
    assert by["airplane"].category == "Transportation + Flying"       # the first tag
    assert {n for n, q in by.items() if q.outline} == {"cart", "airplane-off"}
    assert [(r.sibling, r.target, r.text) for r in p.reforms] == [("airplane", "airplane-off", "off"),
                                                                  ("cart", "cart-plus", "plus")]


def test_the_longest_known_prefix_is_the_sibling():
    meta = [_icon("car", ["Automotive"]), _icon("car-battery", ["Automotive"]),
            _icon("car-battery-low", ["Automotive"]), _icon("lamp-x-y", ["Home Automation"])]
    reforms = {r.target: (r.sibling, r.text) for r in icon_dataset.plan(meta).reforms}
    assert reforms == {"car-battery": ("car", "battery"), "car-battery-low": ("car-battery", "low")}


def test_a_quarter_is_held_out_by_a_seeded_hash_of_the_name():
    meta = [_icon(f"thing-{i}", ["Shopping"]) for i in range(4000)]
    a, b = icon_dataset.plan(meta, seed=0), icon_dataset.plan(meta, seed=1)
    held = {q.name for q in a.products if q.held_out}
    assert 0.22 < len(held) / 4000 < 0.28
    assert held == {q.name for q in icon_dataset.plan(list(reversed(meta)), seed=0).products if q.held_out}
    assert held != {q.name for q in b.products if q.held_out}
