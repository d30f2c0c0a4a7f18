"""Decode + resize throughput per CPU core by source image size: the number the capacity
plan sizes decode workers with (catalog photos are far larger than the synthetic 160 px
renders the encode benchmark uses).

    .venv/bin/python tests/benchmarks/bench_decode_sizes.py [--target 224] [--sizes 160,500,1000,1600]

Each image is a photo-like JPEG (smooth gradients + sensor noise, quality 90), decoded and
resized with mimdex's own decode path (encoders.images) in one process, one thread.
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image, ImageFilter

from mimdex.encoders.images import decode_rgb, to_array


def photo_jpeg(side: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, side)
    img = np.stack([np.add.outer(x, x) / 2, np.add.outer(x[::-1], x) / 2, np.full((side, side), 128.0)], -1)
    img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).filter(ImageFilter.GaussianBlur(1)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=int, default=224, help="model input side (base preset: 224)")
    ap.add_argument("--sizes", default="160,500,1000,1600")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    print(f"{'source px':>9} {'JPEG KB':>8} {'images/s/core':>14}  (-> {args.target} px)")
    for side in (int(s) for s in args.sizes.split(",")):
        data = photo_jpeg(side)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            to_array(decode_rgb(data), args.target)
            n += 1
        print(f"{side:>9} {len(data) / 1024:>8.0f} {n / (time.perf_counter() - start):>14.0f}")


if __name__ == "__main__":
    main()
