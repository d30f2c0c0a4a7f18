"""``mimdex doctor --bench``: what this node sustains, measured in one run on synthetic
inputs with a freshly initialised model of the chosen preset (throughput depends on the
architecture, not on what it learned).

- decode: JPEGs of a catalog-like size (1000 x 750) to the model's pixels on one core,
  with draft (reduced-DCT) decoding and full;
- image tower: the bare model, compiled (torch.compile for the fixed batch shape, bf16
  autocast on CUDA), at the node's batch size, on pixels already on the device;
- actor path: the encode pipeline's EncoderActor on the same batch from host uint8
  pixels (pinned staging, side-stream copies, normalisation on the device): the
  pipeline's ceiling per actor, which should be >= 0.9 x the bare model;
- text: titles/s through the text tower, tokenised beforehand;
- k-means: assignment distances/s of the IVF trainer (indexing.kmeans) in its GEMM type.
"""
from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Measure:
    name: str
    value: float
    unit: str
    detail: str

    def to_json(self) -> dict:
        return {"name": self.name, "value": self.value, "unit": self.unit, "detail": self.detail}


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "efficientnet-lite0-minilm"
    batch_size: int | None = None    # None: 256 on CUDA, 32 on a CPU
    batches: int | None = None       # timed batches per measure; None: 8 on CUDA, 2 on a CPU
    decode_images: int = 24
    seed: int = 0


def _jpegs(n: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):  # smooth colour fields plus grain: photo-like JPEG sizes, not noise
        low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((1000, 750), Image.BICUBIC), np.int16)
        img = np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rate(n: int, fn, sync, min_seconds: float = 1.0) -> tuple[float, float]:
    """Items/s of ``fn`` (``n`` items a call), called again until ``min_seconds`` have
    passed so a fast measure is not one timer tick; and the seconds timed."""
    sync()
    t0, calls = time.perf_counter(), 0
    while not calls or time.perf_counter() - t0 < min_seconds:
        fn()
        sync()
        calls += 1
    seconds = time.perf_counter() - t0
    return n * calls / seconds, seconds


def decode_rates(size: int, n: int, seed: int) -> list[Measure]:
    from mimdex.encoders.images import load_pixels

    blobs = _jpegs(n, seed)
    out = []
    for draft in (True, False):
        rate, s = _rate(n, lambda: [load_pixels(b, size, draft) for b in blobs], lambda: None)  # noqa: B023
        out.append(Measure(f"decode_{'draft' if draft else 'full'}", round(rate, 1), "images/s per core",
                           f"{n} JPEGs 1000x750 -> {size}px, one core ({s:.2f} s)"))
    return out


def run_bench(cfg: BenchConfig) -> list[Measure]:
    import torch

    from mimdex.encoders.bundle import load_bundle, save_untrained_bundle
    from mimdex.encoders.inference import embed_texts, pick_device
    from mimdex.encoders.text import tokenize_arrays
    from mimdex.indexing.kmeans import fast_dtype, kmeans
    from mimdex.pipelines.encode import EncoderActor

    device = pick_device()
    cuda = device.type == "cuda"
    batch = cfg.batch_size or (256 if cuda else 32)
    batches = cfg.batches or (8 if cuda else 2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rng = np.random.default_rng(cfg.seed)
    titles = [f"{c} ceramic mug with {p} stripes, {i} cm" for i, (c, p) in
              enumerate(zip(rng.choice(["red", "blue", "green"], batch * 4), rng.choice(["zebra", "dot"], batch * 4)))]
    with tempfile.TemporaryDirectory(prefix="mimdex-doctor-") as tmp:
        uri = os.path.join(tmp, "model")
        sha = save_untrained_bundle(uri, titles, "3-tower", cfg.preset, cfg.seed)
        enc = load_bundle(uri)
        size = enc.cfg.image.image_size
        out = decode_rates(size, cfg.decode_images, cfg.seed)

        # the bare compiled tower on device-resident, normalised pixels
        model = enc.model.to(device).eval()
        x = torch.randn(batch, 3, size, size, device=device)
        if cuda or getattr(model.visual, "channels_last", False):
            model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        fn = torch.compile(model.encode_image, dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            fn(x)
            compile_s = time.perf_counter() - t0
            bare, s = _rate(batch * batches, lambda: [fn(x) for _ in range(batches)], sync)
        out.append(Measure("image_tower_compiled", round(bare, 1), "images/s",
                           f"{cfg.preset} at {size}px, batch {batch}, {'bf16' if cuda else 'fp32'}, "
                           f"compiled in {compile_s:.1f} s, {s:.2f} s timed"))

        # the encode actor's path from host uint8 pixels (compiles on CUDA as in production)
        threads = torch.get_num_threads()
        actor = EncoderActor(uri, sha, "float16", batch, threads)
        torch.set_num_threads(threads)
        pixels = rng.integers(0, 255, (batch * batches, size, size, 3), dtype=np.uint8)
        actor.encode({"pixels": pixels[:batch]})  # warm
        path, s = _rate(len(pixels), lambda: actor.encode({"pixels": pixels}), sync)
        out.append(Measure("encode_actor_path", round(path, 1), "images/s",
                           f"EncoderActor.encode, batch {batch}, {'compiled' if cuda else 'eager (CPU default)'}, "
                           f"{s:.2f} s; {path / bare:.2f}x the compiled tower (goal >= 0.9)"))

        ids, mask = tokenize_arrays(enc.tokenizer, titles)
        embed_texts(model, ids[:batch], mask[:batch], batch * 4, device)  # warm
        text, s = _rate(len(titles), lambda: embed_texts(model, ids, mask, batch * 4, device), sync)
        out.append(Measure("text_tower", round(text, 1), "titles/s", f"{len(titles)} titles, {s:.2f} s"))

    n, d, k = (262144, 256, 4096) if cuda else (16384, 128, 256)
    xs = rng.standard_normal((n, d)).astype(np.float32)
    dtype = fast_dtype(device)
    rate, s = _rate(n * k * 4, lambda: kmeans(xs, k, niter=4, seed=cfg.seed, device=device.type), sync)
    out.append(Measure("kmeans_assign", round(rate / 1e9, 3), "G distances/s",
                       f"{n} x {d} -> {k} centroids, 4 iterations, {str(dtype).split('.')[-1]} GEMM, {s:.2f} s"))
    return out
