"""Row kinds of a dirty catalog, as real catalogs have them: every kind encode rejects and
awkward rows it must accept. Shared by the lifecycle test and the property tests."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mimdex.infra import storage

SCHEMA = pa.schema([("product_id", pa.string()), ("title", pa.binary()), ("image_uri", pa.string()),
                    ("brand", pa.string())])

# kind -> the reason encode must give (None: encoded)
BAD = {
    "no_title": "title_empty", "blank_title": "title_empty", "not_utf8_title": "title_not_utf8",
    "no_image": "image_missing", "empty_image": "image_empty", "corrupt_image": "image_corrupt",
    "truncated_image": "image_corrupt", "huge_image": "image_too_large", "missing_object": "image_uri_unreachable",
    "unknown_scheme": "image_uri_unreachable",
}
AWKWARD = ("rgba", "cmyk", "gray16", "palette", "exif_rotated", "one_pixel", "big", "unicode_title", "long_title")
GOOD = ("plain",) + AWKWARD
ROW_ONLY = {"empty_id": "product_id_empty", "null_id": "product_id_empty", "duplicate": "duplicate_product_id"}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def picture(seed: int, kind: str = "plain") -> bytes:
    """A small image whose pixels depend on ``seed`` (so products embed differently)."""
    rng = np.random.default_rng(seed)
    px = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(px)
    if kind == "rgba":
        return _encode(Image.fromarray(np.dstack([px, px[..., :1]])), "PNG")
    if kind == "cmyk":
        return _encode(img.convert("CMYK"), "JPEG")
    if kind == "gray16":
        return _encode(Image.fromarray((px[..., 0].astype(np.uint16) * 257)), "PNG")
    if kind == "palette":
        return _encode(img.convert("P"), "PNG")
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on display
        return _encode(img.resize((32, 20)), "JPEG", exif=exif)
    if kind == "one_pixel":
        return _encode(Image.new("RGB", (1, 1), tuple(int(v) for v in px[0, 0])), "PNG")
    if kind == "big":  # 6000 x 4000, valid, 24 Mpx
        return _encode(Image.new("RGB", (6000, 4000), tuple(int(v) for v in px[0, 0])), "JPEG", quality=50)
    return _encode(img, "JPEG" if seed % 2 else "PNG")


def row(kind: str, pid: str | None, seed: int) -> tuple[dict, dict[str, bytes], str | None]:
    """(catalog row, image objects to write under the catalog root, the reject reason or None)."""
    title = f"product {pid} in colour {seed % 7}".encode()
    name = f"images/{pid or 'noid'}-{seed}.img"
    objects = {name: picture(seed, kind if kind in AWKWARD else "plain")}
    reason = BAD.get(kind) or ROW_ONLY.get(kind)
    if kind == "unicode_title":
        title = f"Ceas de mână «Ørsted» 腕時計 ⌚ {pid}".encode()
    elif kind == "long_title":
        title = (f"very long title {pid} " * 400).encode()
    elif kind == "no_title":
        title = None
    elif kind == "blank_title":
        title = b"  \t "
    elif kind == "not_utf8_title":
        title = b"caf\xe9 \xff" + title
    elif kind == "no_image":
        objects, name = {}, None
    elif kind == "empty_image":
        objects = {name: b""}
    elif kind == "corrupt_image":
        objects = {name: b"this is not an image at all" * 3}
    elif kind == "truncated_image":
        objects = {name: picture(seed)[:60]}
    elif kind == "huge_image":  # 9000 x 8000 = 72 Mpx: over the 64 Mpx guard, a few KB as a 1-bit PNG
        objects = {name: _encode(Image.new("1", (9000, 8000)), "PNG")}
    elif kind == "missing_object":
        objects = {}
    elif kind == "unknown_scheme":
        objects, name = {}, f"nosuchscheme://bucket/{pid}.jpg"
    elif kind == "empty_id":
        pid = ""
    elif kind == "null_id":
        pid = None
    return {"product_id": pid, "title": title, "image_uri": name, "brand": f"brand-{seed % 5}"}, objects, reason


def write(root: str, rows: list[dict], objects: dict[str, bytes], row_group_size: int = 64) -> None:
    """The catalog file and its image objects under ``root``."""
    for name, data in objects.items():
        storage.write_bytes(storage.join(root, name), data)
    with storage.open_write(storage.join(root, "catalog.parquet")) as f:
        pq.write_table(pa.Table.from_pylist(rows, SCHEMA), f, row_group_size=row_group_size)


def write_kinds(root: str, kinds: list[str], row_group_size: int = 64) -> list[dict]:
    """A catalog of one row per kind (product_ids P0000, P0001...) under ``root``; its rows."""
    rows, objects = [], {}
    for i, kind in enumerate(kinds):
        r, objs, _ = row(kind, f"P{i:04d}", i)
        rows.append(r)
        objects.update(objs)
    write(root, rows, objects, row_group_size)
    return rows
