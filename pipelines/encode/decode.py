"""CPU stage: one unit's catalog rows -> pixels, token ids and reject rows.

Runs in Ray CPU tasks that never import torch. Every row either yields model inputs or
a reject row with a stable reason (contracts.catalog judges both); nothing is dropped
silently. Only a transient storage failure (the object store gave up after its retries)
fails the whole unit, so that a re-run retries it instead of recording a reject that
would stick.
"""
from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tokenizers import Tokenizer

from mimdex.encoders.images import ImageDecodeError, gpu_decodable, load_pixels
from mimdex.encoders.text import configure, tokenize_arrays
from mimdex.infra import storage
from mimdex.infra.contracts import catalog
from mimdex.infra.errors import DataError
from mimdex.pipelines.encode.config import DecodedUnit, DecodeSpec, RejectRow, Unit


def _node() -> str:
    """The Ray node this runs on ("" outside Ray, e.g. a benchmark calling it bare)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - bookkeeping only
        return ""


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str, context_length: int) -> Tokenizer:
    return configure(Tokenizer.from_str(tokenizer_json), context_length)


def decode_unit(spec: DecodeSpec, unit: Unit) -> tuple[DecodedUnit, dict]:
    """(what was decoded, tensors): uint8 pixels N x S x S x 3 and (for text models)
    int32 token ids / uint8 mask."""
    t0, retries = time.perf_counter(), storage.retry_count()
    table, _ = catalog.read_columns(unit.file, list(unit.row_groups))
    if table.num_rows != unit.rows:
        raise DataError(f"catalog {unit.file} changed while encoding: row groups {list(unit.row_groups)} "
                        f"hold {table.num_rows} rows, the plan said {unit.rows}")
    ids = table.column("product_id").to_pylist()
    titles = catalog.titles_as_bytes(table)
    images = table.column(spec.image_column).to_pylist()
    duplicates = dict(unit.duplicates)
    rejects: list[RejectRow] = []

    def reject(i: int, problem: catalog.Problem, state: str | None = None) -> None:
        rejects.append(RejectRow(ids[i], problem, unit.first_row + i, state or catalog.rejected_state(problem.reason)))

    keep: list[tuple[int, str]] = []  # (row in unit, title) that passed the row checks
    for i in range(unit.rows):
        problem = catalog.row_problem(ids[i], titles[i], images[i], duplicates.get(i))
        if problem:
            reject(i, problem)
        else:
            keep.append((i, titles[i].decode("utf-8")))

    if spec.image_column == "image_uri":
        uris = [catalog.resolve_uri(spec.catalog_root, images[i]) for i, _ in keep]
        with ThreadPoolExecutor(max(1, min(spec.fetch_threads, len(uris)))) as pool:
            fetched = list(pool.map(catalog.fetch_image, uris))
        good = []
        for (i, title), got in zip(keep, fetched):
            if isinstance(got, catalog.Problem):
                reject(i, got)
            else:
                images[i] = got
                good.append((i, title))
        keep = good
    t_read = time.perf_counter() - t0

    size = spec.image_size
    blank = np.zeros((size, size, 3), np.uint8)
    pixels, out_ids, hashes, texts, rows, jpeg, jpeg_rows = [], [], [], [], [], [], []
    for i, title in keep:
        state = catalog.content_hash(images[i], title, spec.model_sha256)
        if spec.gpu_jpeg and gpu_decodable(images[i]):
            jpeg_rows.append(len(pixels))  # the actor decodes it (its rejects come back late)
            jpeg.append(images[i])
            pixels.append(blank)
        else:
            try:
                pixels.append(load_pixels(images[i], size, spec.jpeg_draft))
            except ImageDecodeError as exc:
                reject(i, catalog.Problem(exc.reason, str(exc)), state)
                continue
        out_ids.append(ids[i])
        texts.append(title)
        hashes.append(state)
        rows.append(unit.first_row + i)
    t_decode = time.perf_counter() - t0 - t_read

    tensors = {"pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)}
    if jpeg:
        tensors["jpeg"], tensors["jpeg_rows"] = jpeg, np.array(jpeg_rows, np.int64)
    if spec.has_text and texts:
        tensors["ids"], tensors["mask"] = tokenize_arrays(_tokenizer(spec.tokenizer_json, spec.context_length), texts)
    t_tokenize = time.perf_counter() - t0 - t_read - t_decode
    decoded = DecodedUnit(tuple(out_ids), tuple(hashes), tuple(rows), tuple(sorted(rejects, key=lambda r: r.row)),
                          {"read": t_read, "decode": t_decode, "tokenize": t_tokenize}, _node(),
                          storage.retry_count() - retries)
    return decoded, tensors
