"""CPU stage: one unit's catalog rows -> pixels, token ids and reject rows.

Runs in Ray CPU tasks that never import torch. Every row either yields model inputs or
a reject row with a stable reason (contracts.catalog judges both); nothing is dropped
silently. Only a transient storage failure (the object store gave up after its retries)
fails the whole unit, so that a re-run retries it instead of recording a reject that
would stick.
"""
from __future__ import annotations

import functools
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tokenizers import Tokenizer

from mimdex.encoders.images import ImageDecodeError, gpu_decodable, load_pixels
from mimdex.encoders.text import configure, tokenize_arrays
from mimdex.infra import storage
from mimdex.infra.contracts import catalog, fingerprint
from mimdex.infra.contracts.reuse import read_reuse
from mimdex.infra.contracts.photos import LIST_COLUMNS, bounded
from mimdex.infra.contracts.vectors import column_matrix
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

    def reject(i: int, problem: catalog.Problem, state: str | None = None, photo: int | None = None) -> None:
        rejects.append(RejectRow(ids[i], problem, unit.first_row + i, state or catalog.rejected_state(problem.reason),
                                 photo))

    keep: list[tuple[int, str]] = []  # (row in unit, title) that passed the row checks
    for i in range(unit.rows):
        problem = catalog.row_problem(ids[i], titles[i], images[i], duplicates.get(i))
        if problem:
            reject(i, problem)
        else:
            keep.append((i, titles[i].decode("utf-8")))
    fp_col = fingerprint.column_of(table.column_names, spec.image_column)
    given = table.column(fp_col).to_pylist() if fp_col else [None] * unit.rows
    if spec.image_column in LIST_COLUMNS:
        return _decode_photos(spec, unit, ids, images, keep, reject, rejects, t0, retries, fp_col, given)

    sources: dict[int, str] = {}  # image_uri rows: the fingerprint each was read at
    if spec.image_column == "image_uri":
        def fetch(i: int):
            # the fingerprint before the bytes: a replace in between leaves an older
            # fingerprint than the bytes, which the next night sees as a change
            uri = catalog.resolve_uri(spec.catalog_root, images[i])
            fp = fingerprint.of_row(uri, given[i], fp_col)
            return fp, (fp if isinstance(fp, catalog.Problem) else catalog.fetch_image(uri))

        with ThreadPoolExecutor(max(1, min(spec.fetch_threads, len(keep)))) as pool:
            fetched = list(pool.map(fetch, [i for i, _ in keep]))
        good = []
        for (i, title), (fp, got) in zip(keep, fetched):
            if isinstance(got, catalog.Problem):   # its state: the diff's (a read that fails after
                # a good HEAD stays rejected until the image changes, as an undecodable one does)
                reject(i, got, fingerprint.image_state(True, images[i], fp, title, spec.model_sha256))
            else:
                images[i], sources[i] = got, fp
                good.append((i, title))
        keep = good
    t_read = time.perf_counter() - t0

    size = spec.image_size
    blank = np.zeros((size, size, 3), np.uint8)
    pixels, out_ids, hashes, texts, rows, jpeg, jpeg_rows, fps = [], [], [], [], [], [], [], []
    for i, title in keep:
        state = catalog.content_hash(images[i], title, spec.model_sha256)   # of the bytes encoded
        # what the diff compares (the same as ``state`` for inline bytes)
        source = fingerprint.image_state(spec.image_column == "image_uri", images[i], sources.get(i), title,
                                         spec.model_sha256)
        if spec.gpu_jpeg and gpu_decodable(images[i]):
            jpeg_rows.append(len(pixels))  # the actor decodes it (its rejects come back late)
            jpeg.append(images[i])
            pixels.append(blank)
        else:
            try:
                pixels.append(load_pixels(images[i], size, spec.jpeg_draft))
            except ImageDecodeError as exc:
                reject(i, catalog.Problem(exc.reason, str(exc)), source)
                continue
        out_ids.append(ids[i])
        texts.append(title)
        hashes.append(state)
        rows.append(unit.first_row + i)
        fps.append((sources[i], source) if sources else None)
    t_decode = time.perf_counter() - t0 - t_read

    tensors = {"pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)}
    if jpeg:
        tensors["jpeg"], tensors["jpeg_rows"] = jpeg, np.array(jpeg_rows, np.int64)
    if spec.has_text and texts:
        tensors["ids"], tensors["mask"] = tokenize_arrays(_tokenizer(spec.tokenizer_json, spec.context_length), texts)
    t_tokenize = time.perf_counter() - t0 - t_read - t_decode
    decoded = DecodedUnit(tuple(out_ids), tuple(hashes), tuple(rows), tuple(sorted(rejects, key=lambda r: r.row)),
                          {"read": t_read, "decode": t_decode, "tokenize": t_tokenize}, _node(),
                          storage.retry_count() - retries,
                          sources=_sources(fps) if spec.image_column == "image_uri" else None)
    return decoded, tensors


def _sources(fps: list[tuple[str, str] | None]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(image fingerprints, source states) of a by-URI unit's output rows."""
    return tuple(f for f, _ in fps), tuple(s for _, s in fps)


def _decode_photos(spec: DecodeSpec, unit: Unit, ids, images, keep, reject, rejects, t0, retries, fp_col, given):
    """A multi-photo unit: a row per usable photo, a reject row per unusable one (with its
    position); a photo whose (product, bytes' sha256) the reuse table holds is copied, not
    decoded or encoded again (a refresh of a product whose list or title changed: an image
    vector depends on the photo's bytes and the model only). ``fp_col``/``given``: the
    catalog's per-photo fingerprint lists (contracts.fingerprint), where it has them."""
    photos, cut, cut_products = [], 0, 0
    for i, title in keep:
        listed, dropped = bounded(images[i])
        cut, cut_products = cut + dropped, cut_products + (dropped > 0)
        photos += [(i, title, pos, value, fingerprint.photo_given(given[i], pos)) for pos, value in enumerate(listed)]
    by_uri = spec.image_column == "image_uris"

    def fetch(p):
        if not by_uri or p[3] is None:
            return None, catalog.photo_bytes(p[3], by_uri, spec.catalog_root)
        uri = catalog.resolve_uri(spec.catalog_root, p[3])
        fp = fingerprint.of_row(uri, p[4], fp_col)  # before the bytes, as for image_uri rows
        return fp, (fp if isinstance(fp, catalog.Problem) else catalog.fetch_image(uri))

    with ThreadPoolExecutor(max(1, min(spec.fetch_threads, len(photos)) if by_uri else 1)) as pool:
        fetched = list(pool.map(fetch, photos))
    t_read = time.perf_counter() - t0
    products = sorted({ids[i] for i, *_ in photos})
    reuse, table = read_reuse(spec.reuse, products) if spec.reuse and products else ({}, None)
    size = spec.image_size
    out_ids, hashes, rows, positions, shas, titles, pixels, encode_rows, reuse_rows, reuse_from, fps = (
        [] for _ in range(11))
    for (i, title, pos, value, _), (fp, data) in zip(photos, fetched):
        state = catalog.photo_state(data, title, spec.model_sha256)   # of the bytes read
        source = fingerprint.image_state(by_uri, value, fp, title, spec.model_sha256)   # what the diff compares
        if isinstance(data, catalog.Problem):
            reject(i, data, source, pos)
            continue
        sha = hashlib.sha256(data).hexdigest()
        found = reuse.get((ids[i], sha))
        if found is None:
            try:
                pixels.append(load_pixels(data, size, spec.jpeg_draft))
            except ImageDecodeError as exc:
                reject(i, catalog.Problem(exc.reason, str(exc)), source, pos)
                continue
            encode_rows.append(len(out_ids))
        else:
            reuse_rows.append(len(out_ids))
            reuse_from.append(found)
        out_ids.append(ids[i])
        hashes.append(state)
        rows.append(unit.first_row + i)
        positions.append(pos)
        shas.append(sha)
        titles.append(title)
        fps.append((fp, source) if by_uri else None)
    t_decode = time.perf_counter() - t0 - t_read
    tensors = {"pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
               "rows": len(out_ids), "encode_rows": np.array(encode_rows, np.int64),
               "reuse_rows": np.array(reuse_rows, np.int64)}
    if reuse_from:
        tensors["reuse_image"] = column_matrix(table.take(reuse_from), "image_emb")
    if spec.has_text and titles:
        distinct = list(dict.fromkeys(titles))  # a product's title is tokenised and encoded once
        of = {t: j for j, t in enumerate(distinct)}
        tensors["text_of_row"] = np.array([of[t] for t in titles], np.int64)
        tensors["ids"], tensors["mask"] = tokenize_arrays(_tokenizer(spec.tokenizer_json, spec.context_length),
                                                          distinct)
    t_tokenize = time.perf_counter() - t0 - t_read - t_decode
    stats = {"photos_encoded": len(encode_rows), "photos_reused": len(reuse_rows), "photos_cut": cut,
             "products_cut": cut_products}
    decoded = DecodedUnit(tuple(out_ids), tuple(hashes), tuple(rows),
                          tuple(sorted(rejects, key=lambda r: (r.row, -1 if r.photo is None else r.photo))),
                          {"read": t_read, "decode": t_decode, "tokenize": t_tokenize}, _node(),
                          storage.retry_count() - retries, tuple(positions), tuple(shas), stats,
                          sources=_sources(fps) if by_uri else None)
    return decoded, tensors
