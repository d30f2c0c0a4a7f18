"""Pure numpy/Pillow drawing of products and street photos (no I/O).

A product is a category *silhouette* filled with a colour and a surface *pattern*.
Patterns are shared across categories, so a texture alone never identifies a product.
Street photos put the product, rotated, scaled, cropped and partly occluded, on a
cluttered background whose largest region is painted with *another category's* colour
and pattern: a matcher of local colour/texture statistics is pulled towards that
distractor, which is the failure mode the multimodal towers exist to fix.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mimdex.pipelines.synth.attributes import COLOURS, INKS, Product

SUPERSAMPLE = 3  # silhouettes are drawn larger and downsampled for anti-aliased edges


@dataclass(frozen=True)
class Look:
    """What a product looks like: fixed per product so catalog and street photo agree."""

    category: str
    colour: tuple[int, int, int]
    ink: tuple[int, int, int]
    pattern: str
    freq: float   # pattern cycles across the object
    phase: float  # pattern offset in [0, 1)


def look_of(p: Product) -> Look:
    rng = np.random.default_rng([p.family, abs(hash_str(p.product_id)) % (2**31)])
    return Look(p.category, COLOURS[p.colour], INKS[p.ink], p.pattern,
                float(rng.uniform(4.0, 7.0)), float(rng.uniform(0.0, 1.0)))


def hash_str(s: str) -> int:
    """A stable (process-independent) 31-bit hash; Python's hash() is salted."""
    h = 2166136261
    for b in s.encode("utf-8"):
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


# --- silhouettes: drawn in unit coordinates (x right, y down) -----------------------

def _poly(d: ImageDraw.ImageDraw, s: float, pts) -> None:
    d.polygon([(x * s, y * s) for x, y in pts], fill=255)


def _ellipse(d, s, x0, y0, x1, y1, width=0) -> None:
    if width:
        d.ellipse([x0 * s, y0 * s, x1 * s, y1 * s], outline=255, width=int(width * s))
    else:
        d.ellipse([x0 * s, y0 * s, x1 * s, y1 * s], fill=255)


def _rect(d, s, x0, y0, x1, y1, radius=0.0) -> None:
    d.rounded_rectangle([x0 * s, y0 * s, x1 * s, y1 * s], radius=radius * s, fill=255)


def _star(cx, cy, r_out, r_in, n=5):
    pts = []
    for i in range(2 * n):
        r = r_out if i % 2 == 0 else r_in
        a = -math.pi / 2 + i * math.pi / n
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw_mug(d, s):
    _rect(d, s, 0.22, 0.25, 0.66, 0.82, 0.04)
    _ellipse(d, s, 0.56, 0.34, 0.84, 0.68, width=0.07)


def _draw_vase(d, s):
    _poly(d, s, [(0.42, 0.1), (0.58, 0.1), (0.56, 0.3), (0.74, 0.5), (0.76, 0.7), (0.64, 0.9),
                 (0.36, 0.9), (0.24, 0.7), (0.26, 0.5), (0.44, 0.3)])


def _draw_tshirt(d, s):
    _poly(d, s, [(0.35, 0.15), (0.44, 0.2), (0.56, 0.2), (0.65, 0.15), (0.9, 0.32), (0.8, 0.46),
                 (0.7, 0.4), (0.7, 0.88), (0.3, 0.88), (0.3, 0.4), (0.2, 0.46), (0.1, 0.32)])


def _draw_handbag(d, s):
    _ellipse(d, s, 0.3, 0.15, 0.7, 0.6, width=0.06)
    _poly(d, s, [(0.22, 0.4), (0.78, 0.4), (0.88, 0.86), (0.12, 0.86)])


def _draw_bottle(d, s):
    _rect(d, s, 0.43, 0.08, 0.57, 0.16)
    _poly(d, s, [(0.44, 0.16), (0.56, 0.16), (0.56, 0.3), (0.66, 0.4), (0.66, 0.92),
                 (0.34, 0.92), (0.34, 0.4), (0.44, 0.3)])


def _draw_lamp(d, s):
    _poly(d, s, [(0.35, 0.12), (0.65, 0.12), (0.82, 0.45), (0.18, 0.45)])
    _rect(d, s, 0.47, 0.45, 0.53, 0.82)
    _ellipse(d, s, 0.3, 0.78, 0.7, 0.9)


def _draw_hat(d, s):
    _ellipse(d, s, 0.08, 0.55, 0.92, 0.78)
    d.pieslice([0.25 * s, 0.22 * s, 0.75 * s, 0.95 * s], 180, 360, fill=255)


def _draw_clock(d, s):
    _ellipse(d, s, 0.14, 0.14, 0.86, 0.86)


def _draw_notebook(d, s):
    _rect(d, s, 0.28, 0.1, 0.72, 0.9, 0.02)
    _rect(d, s, 0.24, 0.1, 0.3, 0.9)


def _draw_cushion(d, s):
    _rect(d, s, 0.12, 0.25, 0.88, 0.75, 0.12)


def _draw_umbrella(d, s):
    d.pieslice([0.08 * s, 0.12 * s, 0.92 * s, 0.92 * s], 180, 360, fill=255)
    _rect(d, s, 0.48, 0.5, 0.52, 0.86)
    d.arc([0.36 * s, 0.78 * s, 0.52 * s, 0.92 * s], 0, 180, fill=255, width=int(0.04 * s))


def _draw_kite(d, s):
    _poly(d, s, [(0.5, 0.06), (0.78, 0.4), (0.5, 0.8), (0.22, 0.4)])
    d.line([(0.5 * s, 0.8 * s), (0.44 * s, 0.88 * s), (0.56 * s, 0.94 * s)], fill=255,
           width=int(0.025 * s))


def _draw_sneaker(d, s):
    _poly(d, s, [(0.1, 0.72), (0.12, 0.45), (0.32, 0.42), (0.5, 0.55), (0.78, 0.6),
                 (0.92, 0.7), (0.92, 0.8), (0.1, 0.8)])


def _draw_teapot(d, s):
    _ellipse(d, s, 0.25, 0.35, 0.75, 0.85)
    _poly(d, s, [(0.7, 0.55), (0.92, 0.35), (0.95, 0.4), (0.74, 0.68)])
    _ellipse(d, s, 0.12, 0.45, 0.34, 0.72, width=0.05)
    _ellipse(d, s, 0.44, 0.25, 0.56, 0.37)


def _draw_star(d, s):
    _poly(d, s, _star(0.5, 0.52, 0.44, 0.18))


SHAPES = {
    "mug": _draw_mug, "vase": _draw_vase, "t-shirt": _draw_tshirt, "handbag": _draw_handbag,
    "bottle": _draw_bottle, "lamp": _draw_lamp, "hat": _draw_hat, "clock": _draw_clock,
    "notebook": _draw_notebook, "cushion": _draw_cushion, "umbrella": _draw_umbrella,
    "kite": _draw_kite, "sneaker": _draw_sneaker, "teapot": _draw_teapot,
    "star ornament": _draw_star,
}


def silhouette(category: str, size: int) -> np.ndarray:
    """Anti-aliased alpha (float32 in [0, 1], size x size) of a category's shape."""
    big = size * SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    SHAPES[category](ImageDraw.Draw(img), float(big))
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


# --- patterns: float masks in [0, 1] over a size x size grid ------------------------

@functools.lru_cache(maxsize=16)
def _grid(h: int, w: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:h, 0:w].astype(np.float32) / size
    v.setflags(write=False)
    u.setflags(write=False)
    return v, u


def pattern_mask(pattern: str, size: int, freq: float, phase: float,
                 shape: tuple[int, int] | None = None) -> np.ndarray:
    """Pattern over a ``shape`` window (default size x size) of a size-wide tile."""
    h, w = shape or (size, size)
    v, u = _grid(h, w, size)
    fu, fv = u * freq + phase, v * freq + phase
    if pattern == "plain":
        return np.zeros((h, w), np.float32)
    if pattern == "stripes":
        m = (fv % 1.0) < 0.45
    elif pattern == "diagonal":
        m = ((fu + fv) * 0.7 % 1.0) < 0.4
    elif pattern == "dots":
        m = np.hypot(fu % 1.0 - 0.5, fv % 1.0 - 0.5) < 0.28
    elif pattern == "zebra":
        wave = fu + 0.35 * np.sin(2 * np.pi * (1.3 * v + phase)) + 0.12 * np.sin(2 * np.pi * 3.1 * v)
        m = np.sin(2 * np.pi * wave) > 0.15 * np.sin(2 * np.pi * (2 * v + u))
    elif pattern == "checks":
        m = (np.floor(fu) + np.floor(fv)) % 2 == 0
    elif pattern == "chevron":
        m = ((fv + 0.6 * np.abs(fu % 1.0 - 0.5)) % 1.0) < 0.45
    elif pattern == "grid":
        m = ((fu % 1.0) < 0.16) | ((fv % 1.0) < 0.16)
    elif pattern == "leopard":
        cell_u, cell_v = np.floor(fu), np.floor(fv)
        jit = np.sin(cell_u * 12.9898 + cell_v * 78.233) * 43758.5453 % 1.0
        du = fu % 1.0 - (0.3 + 0.4 * jit)
        dv = fv % 1.0 - (0.7 - 0.4 * jit)
        r = np.hypot(du * 1.3, dv)
        m = (r < 0.3) & (r > 0.14)
    elif pattern == "crosses":
        du, dv = np.abs(fu % 1.0 - 0.5), np.abs(fv % 1.0 - 0.5)
        m = ((du < 0.08) & (dv < 0.3)) | ((dv < 0.08) & (du < 0.3))
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return m.astype(np.float32)


def paint(look: Look, size: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A float RGB tile (``shape``, default size x size) of the look's colour and pattern."""
    m = pattern_mask(look.pattern, size, look.freq, look.phase, shape)[..., None]
    colour = np.asarray(look.colour, np.float32)
    ink = np.asarray(look.ink, np.float32)
    return colour * (1.0 - m) + ink * m


def render_product(look: Look, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 on white, alpha float) of a clean catalog shot."""
    alpha = silhouette(look.category, size)[..., None]
    rgb = paint(look, size) * alpha + 255.0 * (1.0 - alpha)
    return rgb.round().astype(np.uint8), alpha[..., 0]


# --- street photos -------------------------------------------------------------------

_BACKGROUNDS = [(190, 180, 160), (150, 120, 90), (110, 110, 115), (200, 200, 190), (90, 100, 80)]
_OCCLUDERS = [(224, 172, 140), (60, 50, 45), (170, 170, 175), (235, 225, 210)]


def render_street(look: Look, distractor: Look, rng: np.random.Generator, size: int,
                  clutter: list[Look]) -> np.ndarray:
    """An RGB uint8 street photo of ``look`` on a background dominated by ``distractor``."""
    base = np.asarray(_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))], np.float32)
    canvas = np.broadcast_to(base, (size, size, 3)).copy()
    canvas += rng.normal(0, 10, size=(size, size, 1)).astype(np.float32)

    # Small clutter patches of random other looks.
    for other in clutter:
        w, h = (int(size * f) for f in rng.uniform(0.2, 0.4, 2))
        x, y = (int(v) for v in rng.integers(0, size - min(w, h), 2))
        h, w = min(h, size - y), min(w, size - x)
        canvas[y: y + h, x: x + w] = paint(other, size, (h, w))

    # The distractor: a large region (a tablecloth, a wall) in another product's look,
    # at the same pattern scale as catalog shots so its texture statistics match.
    region = _region_mask(rng, size)[..., None]
    canvas = canvas * (1 - region) + paint(distractor, size) * region

    # The product: scaled, rotated, shifted (partly out of frame at times).
    scale = rng.uniform(0.55, 0.8)
    psize = max(8, int(size * scale))
    rgb, alpha = render_product(look, psize)
    angle = float(rng.uniform(-30, 30))
    prod = Image.fromarray(rgb).rotate(angle, resample=Image.Resampling.BILINEAR, expand=True,
                                       fillcolor=(255, 255, 255))
    mask = Image.fromarray((alpha * 255).astype(np.uint8)).rotate(
        angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0)
    pw, ph = prod.size
    x0 = int(rng.integers(-pw // 6, max(1, size - pw + pw // 6)))
    y0 = int(rng.integers(-ph // 6, max(1, size - ph + ph // 6)))
    layer = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    layer.paste(prod, (x0, y0), mask)

    # An occluder (a hand, a cable, another object) over part of the product.
    draw = ImageDraw.Draw(layer)
    ow, oh = (int(pw * f) for f in rng.uniform(0.2, 0.4, 2))
    ox = x0 + int(rng.integers(0, max(1, pw - ow)))
    oy = y0 + int(rng.integers(0, max(1, ph - oh)))
    draw.ellipse([ox, oy, ox + ow, oy + oh], fill=_OCCLUDERS[rng.integers(len(_OCCLUDERS))])

    # Camera: slight blur, colour jitter that keeps colour names right, sensor noise.
    layer = layer.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))
    out = np.asarray(layer, np.float32)
    gain = rng.uniform(0.85, 1.15) * rng.uniform(0.94, 1.06, size=3)
    out = (out - 128.0) * rng.uniform(0.85, 1.1) + 128.0
    out = out * gain + rng.normal(0, 4, size=out.shape)
    return out.clip(0, 255).round().astype(np.uint8)


def _region_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A soft-edged region covering roughly 40-60% of the frame."""
    v, u = _grid(size, size, size)
    angle = rng.uniform(0, 2 * np.pi)
    offset = rng.uniform(-0.1, 0.1)
    d = (u - 0.5) * np.cos(angle) + (v - 0.5) * np.sin(angle) - offset
    wobble = 0.04 * np.sin(2 * np.pi * (3 * u + 2 * v + rng.uniform()))
    return ((d + wobble) > 0).astype(np.float32)
