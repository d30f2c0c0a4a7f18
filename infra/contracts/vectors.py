"""Which embedding rows become index vectors, and their stable int64 ids.

One rule for build-index, refresh and evaluation: the vector kind (image, text, or the
two fused as the model fuses a query), rows with NaN/inf or all-zero vectors skipped
with a reason, and ids derived from product_id so the same product has the same id in
every version.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mimdex.infra.contracts import catalog
from mimdex.infra.contracts.embeddings import PartEntry, read_part
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.errors import DataError, UsageError

KINDS = ("image", "text", "fused")
_MASK = (1 << 63) - 1  # non-negative: faiss reserves -1 for "no result"


def product_id_to_int64(product_id: str) -> int:
    digest = hashlib.blake2b(product_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


def ids_for(product_ids: list[str]) -> np.ndarray:
    return np.fromiter((product_id_to_int64(p) for p in product_ids), dtype=np.int64, count=len(product_ids))


def check_unique(ids: np.ndarray, product_ids: list[str], where: str) -> None:
    """Refuse two products with one int64 id (a hash collision) or a repeated product_id."""
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if not len(dup):
        return
    a, b = product_ids[order[dup[0]]], product_ids[order[dup[0] + 1]]
    if a == b:
        raise DataError(f"{where}: product_id {a!r} appears more than once in the embeddings")
    raise DataError(f"{where}: int64 id collision: product_ids {a!r} and {b!r} both map to "
                    f"{int(ids[order[dup[0]]])}; refusing to build an index that would confuse them")


def column_matrix(table: pa.Table, column: str) -> np.ndarray:
    arr = table.column(column).combine_chunks()
    d = arr.type.list_size
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), d).astype(np.float32)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UsageError(f"--vector must be one of {', '.join(KINDS)}")


def index_vectors(table: pa.Table, kind: str, fuse_alpha: float) -> np.ndarray:
    """float32 N x d; fused = normalize((1 - alpha) * image + alpha * text)."""
    if kind in ("text", "fused") and "text_emb" not in table.column_names:
        raise DataError(f"--vector {kind}: the embeddings have no text_emb (an image-only model)")
    if kind == "image":
        return column_matrix(table, "image_emb")
    if kind == "text":
        return column_matrix(table, "text_emb")
    v = (1.0 - fuse_alpha) * column_matrix(table, "image_emb") + fuse_alpha * column_matrix(table, "text_emb")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)


def invalid_reasons(v: np.ndarray) -> np.ndarray:
    """Per row: '' for a usable vector, else why it is skipped (nan_or_inf, zero)."""
    out = np.full(len(v), "", dtype=object)
    finite = np.isfinite(v).all(1)
    out[~finite] = "nan_or_inf"
    out[finite & ~(np.abs(v) > 0).any(1)] = "zero"
    return out


@dataclass(frozen=True)
class UsableRows:
    """A part's usable vectors, their ids and id-map rows, and what was skipped."""

    vectors: np.ndarray
    ids: np.ndarray
    product_ids: tuple[str, ...]
    idmap: pa.Table | None
    rows: int
    skipped: dict
    skipped_ids: tuple[str, ...]


def usable_rows(root: str, entry: PartEntry, model: ModelRef, dtype: str, kind: str, fuse_alpha: float,
                metadata: bool = False) -> UsableRows:
    """One part (checksum verified) -> what goes into an index; with ``metadata`` the id
    map rows carry the catalog's columns (title, image_uri, ...)."""
    table = read_part(root, entry, model, dtype)
    vectors = index_vectors(table, kind, fuse_alpha)
    reasons = invalid_reasons(vectors)
    keep = reasons == ""
    pids = table.column("product_id").to_pylist()
    kept = [p for p, k in zip(pids, keep) if k]
    ids = ids_for(kept)
    idmap = None
    if metadata:
        idmap = pa.table({"id": pa.array(ids, pa.int64()), "product_id": pa.array(kept, pa.string())})
        meta = catalog.metadata_rows(entry.source, list(entry.row_groups), kept) if entry.source else None
        for name in (meta.column_names if meta is not None else []):
            idmap = idmap.append_column(name, meta.column(name))
    return UsableRows(np.ascontiguousarray(vectors[keep]), ids, tuple(kept), idmap, len(pids),
                      {r: int((reasons == r).sum()) for r in set(reasons.tolist()) - {""}},
                      tuple(p for p, r in zip(pids, reasons) if r))


def merge_skipped(parts) -> dict:
    out: dict[str, int] = {}
    for p in parts:
        for reason, count in p.items():
            out[reason] = out.get(reason, 0) + count
    return out
