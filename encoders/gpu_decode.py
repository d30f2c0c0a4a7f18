"""JPEG decoding on the GPU (nvjpeg through torchvision), with a per-image fallback to
the CPU path.

On a GPU node one accelerator encodes far faster than a CPU core decodes (at 1000 px,
about 130 JPEGs/s per core with draft mode against 10k+ images/s for the model), so the
encoder actor decodes JPEG batches itself. What nvjpeg cannot decode (CMYK, progressive
quirks, corrupt bytes), or everything when torchvision or CUDA is missing, goes through
``images.load_pixels`` one image at a time, which also decides the reject reason exactly
as the CPU path does.

The GPU resize (antialiased bicubic) approximates Pillow's; vectors of GPU-decoded images
differ from CPU-decoded ones by that much, which is why it is opt-in (``--gpu-decode``).
"""
from __future__ import annotations

import numpy as np
import torch

from mimdex.encoders.images import ImageDecodeError, load_pixels


def decoder(device: torch.device) -> str:
    """What ``--gpu-decode`` gets on ``device``, as the encode report states it once:
    ``gpu (nvjpeg, torchvision X)``, or ``cpu (<why not>)`` where every JPEG takes the CPU
    path (torchvision is in the ``gpu`` extra and the CUDA image; a CPU actor has no nvjpeg)."""
    try:
        import torchvision
    except ImportError:
        return "cpu (torchvision missing)"
    if device.type != "cuda":
        return "cpu (no GPU on the encoder actor)"
    return f"gpu (nvjpeg, torchvision {torchvision.__version__})"


def _nvjpeg(data: list[bytes], size: int, device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG decoded and resized on ``device`` (uint8 S x S x 3), None where it failed.
    On a CUDA device this is nvjpeg; on the CPU device torchvision runs libjpeg-turbo
    through the same calls, which is how the tests reach this code without a GPU."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return [None] * len(data)
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except (RuntimeError, ValueError):  # one bad image fails the batch: retry one by one
        decoded = []
        for r in raw:
            try:
                decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except (RuntimeError, ValueError):
                decoded.append(None)
    out = []
    for img in decoded:
        if img is None:
            out.append(None)
            continue
        x = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bicubic",
                                            antialias=True, align_corners=False)
        out.append(x[0].clamp_(0, 255).round_().to(torch.uint8).permute(1, 2, 0))
    return out


def decode_into(pixels: torch.Tensor, rows: list[int], data: list[bytes], size: int, draft: bool,
                use_gpu: bool = True) -> tuple[list[tuple[int, ImageDecodeError]], int]:
    """Decode ``data`` into ``pixels[rows]`` (a tensor on the encoder's device); returns
    the rows no decoder could read, with the CPU path's error (its reject reason), and how
    many images went through the fallback. ``use_gpu``: torchvision's decoder on the
    pixels' device (the actor passes it only on CUDA), else the CPU path for all."""
    device = pixels.device
    results = _nvjpeg(data, size, device) if use_gpu else [None] * len(data)
    failed, fallbacks = [], 0
    for row, blob, img in zip(rows, data, results):
        if img is None:
            fallbacks += 1
            try:
                img = torch.from_numpy(np.array(load_pixels(blob, size, draft))).to(device)
            except ImageDecodeError as exc:
                failed.append((row, exc))
                continue
        pixels[row] = img
    return failed, fallbacks
