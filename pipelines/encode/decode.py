"""CPU stage: one unit's catalog rows -> pixels, token ids and reject rows.

Runs in Ray CPU tasks that never import torch. Every row either yields model inputs or
a reject row with a stable reason code; nothing is dropped silently. Only a transient
storage failure (the object store gave up after its retries) fails the whole unit, so
that a re-run retries it instead of recording a reject that would stick.
"""
from __future__ import annotations

import functools
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from mimdex.encoders.images import ImageDecodeError, decode_rgb, to_array
from mimdex.encoders.text import configure, tokenize_arrays
from mimdex.infra import storage
from mimdex.infra.errors import DataError
from mimdex.pipelines.encode.config import DecodeSpec, Unit

REJECT_SCHEMA = pa.schema([
    ("product_id", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("source", pa.string()), ("row", pa.int64()),
])


def content_hash(image: bytes, title: str, model_sha256: str) -> str:
    """The delta key of DESIGN.md: image bytes + title + model, length-prefixed."""
    h = hashlib.sha256()
    for part in (image, title.encode("utf-8"), model_sha256.encode("ascii")):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str, context_length: int) -> Tokenizer:
    return configure(Tokenizer.from_str(tokenizer_json), context_length)


def resolve_uri(root: str, uri: str) -> str:
    return uri if "://" in uri or uri.startswith("/") else storage.join(root, uri)


def _fetch(uri: str) -> bytes | tuple[str, str]:
    """The bytes, or (reason, detail) for a permanent failure; transient ones raise."""
    try:
        return storage.read_bytes(uri)
    except storage.ObjectNotFound as exc:
        return "image_uri_unreachable", str(exc)
    except storage.StorageFailure as exc:
        if isinstance(exc.__cause__, PermissionError):
            return "image_uri_unreachable", str(exc)
        raise
    except (ValueError, ImportError) as exc:  # unknown protocol, malformed URI
        return "image_uri_unreachable", f"{uri}: {exc}"


def _read_rows(spec: DecodeSpec, unit: Unit) -> pa.Table:
    columns = ["product_id", "title", spec.image_column]
    with storage.open_read(unit.file) as f:
        try:
            table = pq.ParquetFile(f).read_row_groups(list(unit.row_groups), columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"catalog {unit.file}: cannot read row groups {list(unit.row_groups)}: {exc}") from exc
    if table.num_rows != unit.rows:
        raise DataError(f"catalog {unit.file} changed while encoding: row groups {list(unit.row_groups)} "
                        f"hold {table.num_rows} rows, the plan said {unit.rows}")
    return table


def decode_unit(spec: DecodeSpec, unit: Unit) -> tuple[dict, dict]:
    """(meta, tensors): meta has product_ids, content hashes, rejects and timings;
    tensors has uint8 pixels N x S x S x 3 and (for text models) int32 ids / uint8 mask."""
    t0 = time.perf_counter()
    table = _read_rows(spec, unit)
    ids = table.column("product_id").to_pylist()
    titles = table.column("title").cast(pa.large_binary()).to_pylist()
    images = table.column(spec.image_column).to_pylist()
    duplicates = dict(unit.duplicates)
    rejects: list[dict] = []

    def reject(i: int, reason: str, detail: str) -> None:
        rejects.append({"product_id": ids[i], "reason": reason, "detail": detail,
                        "source": unit.file, "row": unit.first_row + i})

    keep: list[tuple[int, str]] = []  # (row in unit, title) that passed the row checks
    for i in range(unit.rows):
        if not ids[i]:
            reject(i, "product_id_empty", "product_id is null or empty")
        elif i in duplicates:
            reject(i, "duplicate_product_id", f"first seen at {duplicates[i]}")
        elif titles[i] is None or not titles[i].strip():
            reject(i, "title_empty", "title is null or blank")
        elif images[i] is None:
            reject(i, "image_missing", f"{spec.image_column} is null")
        else:
            try:
                keep.append((i, titles[i].decode("utf-8")))
            except UnicodeDecodeError as exc:
                reject(i, "title_not_utf8", f"title bytes are not UTF-8: {exc}")

    if spec.image_column == "image_uri":
        uris = [resolve_uri(spec.catalog_root, images[i]) for i, _ in keep]
        with ThreadPoolExecutor(max(1, min(spec.fetch_threads, len(uris)))) as pool:
            fetched = list(pool.map(_fetch, uris))
        good = []
        for (i, title), got in zip(keep, fetched):
            if isinstance(got, tuple):
                reject(i, *got)
            else:
                images[i] = got
                good.append((i, title))
        keep = good
    t_read = time.perf_counter() - t0

    pixels, out_ids, hashes, texts = [], [], [], []
    for i, title in keep:
        try:
            pixels.append(to_array(decode_rgb(images[i]), spec.image_size))
        except ImageDecodeError as exc:
            reject(i, exc.reason, str(exc))
            continue
        out_ids.append(ids[i])
        texts.append(title)
        hashes.append(content_hash(images[i], title, spec.model_sha256))
    t_decode = time.perf_counter() - t0 - t_read

    size = spec.image_size
    tensors = {"pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)}
    if spec.has_text and texts:
        tensors["ids"], tensors["mask"] = tokenize_arrays(_tokenizer(spec.tokenizer_json, spec.context_length), texts)
    t_tokenize = time.perf_counter() - t0 - t_read - t_decode
    rejects.sort(key=lambda r: r["row"])
    meta = {"product_ids": out_ids, "content_hash": hashes, "rejects": rejects,
            "seconds": {"read": t_read, "decode": t_decode, "tokenize": t_tokenize}}
    return meta, tensors
