"""decode_rgb: one decoding of image bytes for training, encoding and serving."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mimdex.encoders.images import ImageDecodeError, decode_rgb


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((1, 1), (255, 0, 0, 255))
    out = decode_rgb(_png(img))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_grayscale_and_cmyk_become_rgb():
    assert decode_rgb(_png(Image.new("L", (3, 3), 90))).getpixel((0, 0)) == (90, 90, 90)
    buf = io.BytesIO()
    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(buf, "JPEG")
    r, g, b = decode_rgb(buf.getvalue()).getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_honoured():
    img = Image.new("RGB", (6, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert decode_rgb(buf.getvalue()).size == (2, 6)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty image bytes"),
    (b"definitely not an image", "cannot decode image"),
])
def test_bad_bytes_raise_a_clear_error(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_rgb(data)


def test_truncated_image_is_refused():
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    with pytest.raises(ImageDecodeError):
        decode_rgb(data[: len(data) // 2])


def test_decompression_bomb_is_refused():
    data = _png(Image.new("L", (3000, 3000), 0))
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_rgb(data, max_pixels=1_000_000)
