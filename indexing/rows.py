"""The reader's row space: once loaded, inverted lists hold each vector's row in the
reader's id map (sorted by id) instead of the product-id hash the shard files store.
Re-ranking then reads codes by position (faiss's IndexRefine), and a filter is a bitmap
over positions (IDSelectorBitmap) applied inside the scan.

Pure faiss/numpy: indexes and arrays in, indexes and arrays out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from mimdex.infra.contracts.index_codec import coarse_bytes
from mimdex.infra.errors import DataError


@dataclass(eq=False)
class Selection:
    """The id-map rows a filter selects: positions, and faiss's bitmap selector over them
    (its bits kept alive here). ``decoded``: their vectors, once exact search needed them."""
    rows: np.ndarray
    bits: np.ndarray
    selector: faiss.IDSelector
    decoded: np.ndarray | None = field(default=None)

    @property
    def count(self) -> int:
        return len(self.rows)

    @classmethod
    def of(cls, mask: np.ndarray) -> "Selection":
        bits = np.packbits(mask, bitorder="little")
        return cls(np.flatnonzero(mask), bits, faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)))


def _lists(index: faiss.Index):
    ivf = faiss.extract_index_ivf(index)
    return ivf, faiss.downcast_InvertedLists(ivf.invlists)


def rows_of(sorted_ids: np.ndarray, held: np.ndarray, uri: str, lst: int) -> np.ndarray:
    """The positions in ``sorted_ids`` of list ``lst``'s ids; every one must be there."""
    rows = np.searchsorted(sorted_ids, held)
    if len(rows) and (rows.max() >= len(sorted_ids) or (sorted_ids[rows] != held).any()):
        raise DataError(f"{uri}: inverted list {lst} holds ids that the id maps do not")
    return rows


def lists_to_rows(index: faiss.Index, sorted_ids: np.ndarray, uri: str) -> None:
    """Rewrite the ids in every inverted list (product-id hashes) as positions in
    ``sorted_ids``, in place."""
    ivf, invlists = _lists(index)
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n:
            held = faiss.rev_swig_ptr(invlists.get_ids(lst), n)   # the list's own ids, writable
            held[:] = rows_of(sorted_ids, held, uri, lst)


def selected_vectors(indexes: list[faiss.Index], sel: Selection) -> np.ndarray | None:
    """The selected rows' vectors as the indexes' codes decode them (each index holding
    some of the rows), in ``sel.rows`` order; None where lists are packed (fast-scan) and
    hold no plain codes."""
    wanted = np.unpackbits(sel.bits, bitorder="little").astype(bool)
    vectors, rows = [], []
    for index in indexes:
        ivf, invlists = _lists(index)
        if not isinstance(invlists, faiss.ArrayInvertedLists):
            return None
        prefix, size = coarse_bytes(ivf.nlist), ivf.code_size
        codes = []
        for lst in range(ivf.nlist):
            n = invlists.list_size(lst)
            if not n:
                continue
            held = faiss.rev_swig_ptr(invlists.get_ids(lst), n)
            hit = wanted[held]
            if hit.any():
                code = faiss.rev_swig_ptr(invlists.get_codes(lst), n * size).reshape(n, size)[hit]
                head = np.frombuffer(np.int64(lst).tobytes()[:prefix], np.uint8)
                codes.append(np.hstack([np.broadcast_to(head, (len(code), prefix)), code]))
                rows.append(held[hit])
        if codes:
            vectors.append(index.sa_decode(np.ascontiguousarray(np.concatenate(codes))))
    if not vectors:
        return np.zeros((0, indexes[0].d), np.float32)
    order = np.argsort(np.concatenate(rows))   # list order -> row order, as sel.rows is
    return np.concatenate(vectors)[order]


def codes_index(quantizer: faiss.Index, codes: np.ndarray) -> faiss.Index:
    """The re-ranking quantizer (a flat-codes index) holding ``codes``, one row each."""
    refine = faiss.clone_index(quantizer)   # faiss returns it downcast and owned
    faiss.copy_array_to_vector(np.ascontiguousarray(codes).ravel(), refine.codes)
    refine.ntotal = len(codes)
    return refine


def refine_index(index: faiss.Index, refine: faiss.Index, k_factor: int) -> faiss.IndexRefine:
    """faiss's IndexRefine over ``index`` (lists of rows) and the re-ranking codes in row
    order, so re-ranking runs in faiss's C++ and not in numpy."""
    out = faiss.IndexRefine(index, refine)
    out.k_factor = float(k_factor)
    out.referenced_objects = [index, refine]
    return out
