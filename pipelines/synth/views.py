"""Extra catalog photos of a product (synth-catalog --views): the same product seen in
another pose, as a close-up crop, in a room, or under other light (pure numpy/Pillow).

A street photo shows the product rotated, scaled and on a background, so some of these
views resemble it more than the clean main shot does: what indexing every photo is for.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from mimdex.pipelines.synth.render import Look, render_product

KINDS = ("pose", "crop", "background", "lighting")
_ROOMS = [(196, 186, 168), (142, 118, 96), (120, 124, 130), (206, 204, 192), (96, 108, 88)]


def view_kinds(rng: np.random.Generator, max_views: int) -> list[str]:
    """``main`` and 0..max_views-1 other kinds, in a per-product random order."""
    extra = int(rng.integers(max_views))
    return ["main"] + [KINDS[int(i)] for i in rng.permutation(len(KINDS))[:extra]]


def _placed(look: Look, rng: np.random.Generator, size: int, background: np.ndarray, scale, angle) -> np.ndarray:
    psize = max(8, int(size * rng.uniform(*scale)))
    rgb, alpha = render_product(look, psize)
    turn = float(rng.uniform(*angle))
    prod = Image.fromarray(rgb).rotate(turn, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(255, 255, 255))
    mask = Image.fromarray((alpha * 255).astype(np.uint8)).rotate(turn, resample=Image.Resampling.BILINEAR,
                                                                  expand=True, fillcolor=0)
    layer = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    pw, ph = prod.size
    x0 = int(rng.integers(min(0, size - pw), max(1, size - pw + 1)))
    y0 = int(rng.integers(min(0, size - ph), max(1, size - ph + 1)))
    layer.paste(prod, (x0, y0), mask)
    return np.asarray(layer)


def render_view(look: Look, kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """An RGB uint8 photo of ``look`` as view ``kind``."""
    if kind == "pose":
        white = np.full((size, size, 3), 255.0, np.float32)
        return _placed(look, rng, size, white, (0.6, 0.85), (-35, 35))
    if kind == "crop":  # a close-up: the product drawn larger than the frame, cut to its middle
        big = int(size * rng.uniform(1.5, 2.0))
        rgb, _ = render_product(look, big)
        margin = big - size
        x0, y0 = (int(v) for v in rng.integers(margin // 4, margin - margin // 4 + 1, 2))
        return np.ascontiguousarray(rgb[y0:y0 + size, x0:x0 + size])
    if kind == "background":
        room = np.broadcast_to(np.asarray(_ROOMS[rng.integers(len(_ROOMS))], np.float32), (size, size, 3)).copy()
        room += rng.normal(0, 8, size=(size, size, 1)).astype(np.float32)
        return _placed(look, rng, size, room, (0.55, 0.8), (-20, 20))
    if kind == "lighting":
        rgb, _ = render_product(look, size)
        out = rgb.astype(np.float32) * rng.uniform(0.6, 0.85) * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-10, 10)
        return out.clip(0, 255).round().astype(np.uint8)
    raise ValueError(f"unknown view kind {kind!r}")
