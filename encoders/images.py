"""Decoding catalog and query image bytes into RGB, the same way everywhere.

Training, the encode pipeline, the index evaluator and a serving encoder all call
``decode_rgb`` so that one product image always becomes the same pixels.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# Pillow's own decompression-bomb guard, made an error rather than a warning.
MAX_IMAGE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (or are too large to decode safely).

    ``reason`` is a short stable code (image_empty, image_too_large, image_corrupt) that
    reject tables record; the message carries the detail.
    """

    def __init__(self, message: str, reason: str = "image_corrupt"):
        super().__init__(message)
        self.reason = reason


def decode_rgb(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, draft: int | None = None) -> Image.Image:
    """Bytes of a JPEG/PNG/WebP... -> an RGB image.

    EXIF orientation is applied; transparency is composited on white (catalog shots
    are on white); grayscale, palette and CMYK are converted. With ``draft`` (the model's
    image size), a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    both sides at least ``draft`` pixels: libjpeg skips most of the work, and the resize
    that follows starts from fewer pixels. The reject rules (empty, too large, corrupt)
    are the same either way: they are decided before and during the load.
    """
    if not data:
        raise ImageDecodeError("empty image bytes", "image_empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(
                    f"image of {img.width}x{img.height} pixels exceeds the limit of {max_pixels}",
                    "image_too_large")
            if draft and img.format == "JPEG":
                img.draft(img.mode if img.mode in ("RGB", "L", "CMYK") else "RGB", (draft, draft))
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}", "image_too_large") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... by format
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_pixels(data: bytes, size: int, draft: bool = False) -> np.ndarray:
    """Image bytes -> uint8 size x size x 3: the one preprocessing training, encode,
    evaluation and serving share (the bundle records ``draft`` as image.jpeg_draft)."""
    return to_array(decode_rgb(data, draft=size if draft else None), size)


def gpu_decodable(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS) -> bool:
    """A baseline/progressive YCbCr or grayscale JPEG whose header reads and whose size is
    within the limit: what nvjpeg is handed. Anything else takes the CPU path, which then
    decides the reject reason (a too-large JPEG included), so rejects do not depend on it."""
    if not data or data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format == "JPEG" and img.mode in ("RGB", "L") and img.width * img.height <= max_pixels
    except Exception:  # a header Pillow cannot read: the CPU path names the problem
        return False


def to_array(img: Image.Image, size: int) -> np.ndarray:
    """Resize (bicubic, no crop: catalog shots are framed) to size x size uint8 HWC."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)
