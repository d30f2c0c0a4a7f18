"""Stable int64 ids for products: the same product_id gets the same id in every version,
so a nightly refresh can remove and add ids instead of rebuilding."""
from __future__ import annotations

import hashlib

import numpy as np

from mimdex.infra.errors import DataError

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
