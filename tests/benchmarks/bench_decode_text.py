"""Decoder and text tower: today's paths against the ones the encode actors now use,
side by side, on this machine (one process, one thread: rates are per core).

    .venv/bin/python tests/benchmarks/bench_decode_text.py [--seconds 4] [--titles 1024]

* decode: photo-like 1000 px JPEGs (smooth gradients, sensor noise, quality 90) to the
  model's input size (64: tiny, 224: base), full decode + resize against JPEG draft
  decoding (DCT scaling, images.load_pixels with draft) + resize. Goal: >= 2x.
* text: the base preset's text tower (CLIP layout, 12 layers, width 512, context 77) with
  random weights, on titles of realistic length (a synthetic product title plus the
  attribute phrases real listings append: ~20 tokens), padded to the context length
  against bucketed by length and cut to each batch's longest. Goal: >= 2.5x.
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image, ImageFilter

from mimdex.encoders.config import preset
from mimdex.encoders.images import load_pixels
from mimdex.encoders.inference import embed_texts
from mimdex.encoders.model import MIMModel
from mimdex.encoders.text import tokenize_arrays, train_tokenizer
from mimdex.pipelines.synth import SynthConfig
from mimdex.pipelines.synth.attributes import product_title
from mimdex.pipelines.synth.plan import plan_catalog

EXTRAS = ["for home and office", "350 ml", "dishwasher safe", "set of 2", "gift box", "2026 edition",
          "handmade", "large", "BPA free", "with lid", "non-slip base", "machine washable", "100% cotton",
          "unisex", "lightweight", "free shipping", "pack of 4", "extra durable", "modern design"]


def photo_jpeg(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, side)
    img = np.stack([np.add.outer(x, x) / 2, np.add.outer(x[::-1], x) / 2, np.full((side, side), 40.0 * (seed % 6))],
                   -1)
    img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).filter(ImageFilter.GaussianBlur(1)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rate(fn, items: list, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(items[n % len(items)])
        n += 1
    return n / (time.perf_counter() - start)


def titles(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    products = plan_catalog(SynthConfig(products=max(n, 100), queries=10, seed=0)).products
    out = []
    for p in products[:n]:
        extra = ", ".join(rng.choice(EXTRAS, size=int(rng.integers(2, 5)), replace=False))
        out.append(f"{product_title(p)}, {extra}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--titles", type=int, default=1024)
    ap.add_argument("--side", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)

    images = [photo_jpeg(args.side, s) for s in range(8)]
    print(f"decode, {args.side} px JPEG ({np.mean([len(b) for b in images]) / 1024:.0f} KB) -> model size, "
          "images/s on one core")
    print(f"{'target':>7} {'full decode':>12} {'draft decode':>13} {'ratio':>7}  goal >= 2x")
    for target in (64, 224):
        full = rate(lambda b: load_pixels(b, target, False), images, args.seconds)
        draft = rate(lambda b: load_pixels(b, target, True), images, args.seconds)
        print(f"{target:>7} {full:>12.0f} {draft:>13.0f} {draft / full:>6.2f}x  {'met' if draft / full >= 2 else 'MISSED'}")

    cfg = preset("base", "3-tower")
    model = MIMModel(cfg).eval()
    texts = titles(args.titles)
    tok = train_tokenizer(texts, cfg.text.vocab_size, cfg.text.context_length)
    ids, mask = tokenize_arrays(tok, texts, cfg.text.context_length)
    tokens = mask.sum(1)
    batch = 256
    t0 = time.perf_counter()
    padded = embed_texts(model, ids, mask, batch, bucket=False)
    t_padded = time.perf_counter() - t0
    t0 = time.perf_counter()
    bucketed = embed_texts(model, ids, mask, batch)
    t_bucketed = time.perf_counter() - t0
    diff = float(np.abs(padded - bucketed).max())
    print(f"\ntext tower (base preset, CLIP layout, context {cfg.text.context_length}), {len(texts)} titles of "
          f"{tokens.mean():.1f} tokens on average (min {tokens.min()}, max {tokens.max()}), batch {batch}, one core")
    print(f"{'padded to context':>18} {'bucketed':>9} {'ratio':>7}  goal >= 2.5x   max |diff|")
    print(f"{len(texts) / t_padded:>14.0f}/s {len(texts) / t_bucketed:>7.0f}/s {t_padded / t_bucketed:>6.2f}x  "
          f"{'met' if t_padded / t_bucketed >= 2.5 else 'MISSED':>10}   {diff:.1e}")


if __name__ == "__main__":
    main()
