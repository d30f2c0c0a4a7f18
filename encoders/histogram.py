"""A naive colour + texture histogram descriptor: the baseline that local patterns fool.

Not a model of the paper; it exists to show (and test) that the synthetic street
photos really pull a local-statistics matcher towards the wrong category.
"""
from __future__ import annotations

import numpy as np

from mimdex.encoders.images import decode_rgb, to_array

COLOUR_BINS = 6  # per channel
ORIENT_BINS = 8


def histogram_features(images: list[bytes], size: int = 64, ignore_white: bool = True) -> np.ndarray:
    """L2-normalised (Hellinger) colour and gradient-orientation histograms, one row per image.

    ``ignore_white`` drops near-white pixels, i.e. the catalog's studio background,
    which would otherwise dominate every catalog histogram.
    """
    return np.stack([_features(to_array(decode_rgb(b), size), ignore_white) for b in images])


def _features(rgb: np.ndarray, ignore_white: bool) -> np.ndarray:
    px = rgb.reshape(-1, 3).astype(np.int32)
    keep = ~(px.min(axis=1) > 235) if ignore_white else np.ones(len(px), bool)
    q = px[keep] * COLOUR_BINS // 256
    codes = (q[:, 0] * COLOUR_BINS + q[:, 1]) * COLOUR_BINS + q[:, 2]
    colour = np.bincount(codes, minlength=COLOUR_BINS**3).astype(np.float64)

    gray = rgb.astype(np.float64).mean(axis=2)
    gy, gx = np.gradient(gray)
    mag = np.hypot(gx, gy).reshape(-1)
    ang = (np.arctan2(gy, gx).reshape(-1) % np.pi) / np.pi * ORIENT_BINS
    orient = np.bincount(np.minimum(ang.astype(int), ORIENT_BINS - 1)[keep],
                         weights=mag[keep], minlength=ORIENT_BINS)
    parts = []
    for h in (colour, orient):
        h = h / max(h.sum(), 1e-9)
        parts.append(np.sqrt(h))
    feat = np.concatenate(parts)
    return (feat / max(np.linalg.norm(feat), 1e-9)).astype(np.float32)
