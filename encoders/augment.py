"""Training-time augmentation of street photos (uint8 N x S x S x 3 in, same out); the
names are config.AUGMENTS.

Every random draw comes from the caller's numpy generator, so a batch is the same on a
resumed run. Catalog images are never augmented: they are what the index holds.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F



def shift(pixels: np.ndarray, rng: np.random.Generator, pad: int = 6) -> np.ndarray:
    """Random shift, horizontal flip, brightness/contrast (the tiny preset's recipe)."""
    n, s = pixels.shape[:2]
    padded = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.empty_like(pixels)
    offs = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    for i in range(n):
        y, x = offs[i]
        crop = padded[i, y:y + s, x:x + s]
        out[i] = crop[:, ::-1] if flips[i] else crop
    gain = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1))
    bias = rng.uniform(-20, 20, size=(n, 1, 1, 1))
    return np.clip(out.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)


def street(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What separates a shopper's photo from a studio shot: framing (zoom 0.6-1.15x,
    off-centre, tilted up to 12 degrees, mirrored), exposure, contrast, colour cast and
    saturation. One batched affine resample (reflection at the borders), then colour."""
    n = len(pixels)
    if n == 0:
        return pixels
    zoom = rng.uniform(0.6, 1.15, n)          # < 1 crops in, > 1 shows more around it
    angle = np.deg2rad(rng.uniform(-12, 12, n))
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    shift = rng.uniform(-0.15, 0.15, (n, 2))
    cos, sin = np.cos(angle) * zoom, np.sin(angle) * zoom
    theta = np.stack([np.stack([cos * flip, -sin, shift[:, 0]], 1),
                      np.stack([sin * flip, cos, shift[:, 1]], 1)], 1).astype(np.float32)
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
    grid = F.affine_grid(torch.from_numpy(theta), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    gain = torch.from_numpy(rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32))
    cast = torch.from_numpy(rng.uniform(0.9, 1.1, (n, 3, 1, 1)).astype(np.float32))
    contrast = torch.from_numpy(rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32))
    sat = torch.from_numpy(rng.uniform(0.6, 1.3, (n, 1, 1, 1)).astype(np.float32))
    x = x * gain * cast
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * sat
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * contrast
    return x.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def augment(kind: str, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return shift(pixels, rng) if kind == "shift" else street(pixels, rng)
