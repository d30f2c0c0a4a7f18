"""Open a published index (LATEST or a named version) from any URI and search it.

All shards share one trained quantizer, so their inverted lists can be searched side by
side and the top-k merged exactly, or consolidated into one IVF at load time (faiss
``merge_from`` by way of index_codec.append_lists, exact as well): the default, because
fast-scan PQ computes its look-up tables per query and probed list, and separate shards
would compute them once per shard.
Every shard and id map is checked against the manifest's sha256 when loaded. A version
with delta segments (refreshes since its base shards) is read as base + deltas minus
deletions (contracts.index_delta.combine), the same vectors compaction would write.

Once loaded, the lists hold id-map rows (rows.py): re-ranking is faiss's IndexRefine and a
filter (filters.py) a bitmap over rows inside the scan. ``open(mmap=True)`` maps a copy of
the version cached on this host once (mapped.py) instead of reading the shards.

An index of a multi-photo catalog (its id map has a ``photo`` column) holds several
vectors per product: ``search_distinct`` over-fetches and collapses them (collapse.py),
so callers get k distinct products, each with the photo that matched.
"""
from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mimdex.indexing.collapse import ProductOf, collapse
from mimdex.indexing import filters, mapped as mapping
from mimdex.indexing.rows import Selection, codes_index, lists_to_rows, refine_index, selected_vectors
from mimdex.indexing.rerank import refined_distances, top_k
from mimdex.infra.contracts import attributes
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.files import FileRef
from mimdex.infra.contracts import index_delta as delta
from mimdex.infra.contracts.index_codec import append_lists, deserialize, lists_shape, refine_quantizer, shard_index
from mimdex.infra.contracts.vectors import ids_for
from mimdex.infra.errors import DataError


OPEN_ATTEMPTS = 3   # opens of LATEST, each after it moved away from the last and retention removed that


class ShardLoader:
    """A version's shards, one at a time: each a searchable faiss index (the IVF of an
    IndexRefine; the re-ranking codes are in its id map) and its id map."""

    def __init__(self, uri: str, params: dict, trained: FileRef, deltas: tuple[iv.DeltaSegment, ...] = (),
                 held: bytes | None = None):
        self.uri = uri
        # ``held``: the trained bytes the caller already has (a draft version), not read again
        self.trained = held if held is not None else iv.read_trained(uri, trained)
        self.deltas = tuple(deltas)
        self._deletions = delta.later_deletions(uri, self.deltas) if self.deltas else None
        trained_index = deserialize(self.trained)
        self.shape = lists_shape(trained_index)
        self.refine = refine_quantizer(trained_index)
        self.k_factor = int(params.get("k_factor") or 1) if self.refine is not None else 1

    def load(self, entry: iv.ShardEntry) -> tuple[faiss.Index, pa.Table]:
        if self.deltas:  # base + delta segments - deletions, exactly as compaction would write them
            lists, ids, _ = delta.combine(delta.shard_pieces(self.uri, entry, self.deltas, self._deletions),
                                          *self.shape)
        try:
            if self.deltas:
                index = shard_index(self.trained, lists)
            else:  # streamed from storage into faiss: the file is never in memory beside its lists
                index, ids = iv.load_shard(self.uri, entry, lambda read: shard_index(self.trained, read))
        except ValueError as exc:
            raise DataError(f"{self.uri}/{entry.index.file}: {exc}") from exc
        if index.ntotal != ids.num_rows:
            raise DataError(f"{self.uri}: {entry.index.file} holds {index.ntotal} vectors but its id map "
                            f"{ids.num_rows}")
        return index, ids


class IndexReader:
    def __init__(self, uri: str, params: dict, shards: tuple[iv.ShardEntry, ...], trained: FileRef,
                 default_nprobe: int = 1, manifest: iv.IndexManifest | None = None, consolidate: bool = True,
                 deltas: tuple[iv.DeltaSegment, ...] = (), mapped: mapping.Mapped | None = None):
        self.uri, self.manifest, self.params = uri, manifest, params
        self.default_nprobe = int(default_nprobe or 1)
        loader = ShardLoader(uri, params, trained, deltas)
        self._refine, self.k_factor = loader.refine, loader.k_factor
        self.index = None
        if mapped is not None:   # a cached version, mapped (mapped.py): lists already hold rows
            self.index, self.shards, tables = mapped.index, [], [mapped.idmap]
        elif consolidate:
            # one shard at a time, its lists moved into the index (append_lists) before the
            # next is read: a shard's file and its deserialised lists are both in memory
            # while it loads (1.3 GB for a 2.5M-vector SQ8 shard; four loaded at once held 4x that)
            tables = []
            for entry in shards:
                index, table = loader.load(entry)
                tables.append(table)
                if self.index is None:
                    self.index = index
                else:
                    append_lists(self.index, index)
            self.shards = []
        else:
            with ThreadPoolExecutor(4) as pool:
                loaded = list(pool.map(loader.load, shards))
            self.shards = [index for index, _ in loaded]
            tables = [t for _, t in loaded]
        self.idmap = mapped.idmap if mapped is not None else pa.concat_tables(
            tables, promote_options="permissive").sort_by("id")
        self._ids = self.idmap.column("id").to_numpy()
        self._parts = [self.index] if self.index is not None else self.shards
        if mapped is None:
            for index in self._parts:
                lists_to_rows(index, self._ids, self.uri)
        self._refine_codes = (iv.refine_codes(self.idmap, self._refine.sa_code_size())
                              if self._refine is not None and mapped is None else None)
        self.ntotal = self.index.ntotal if self.index is not None else sum(s.ntotal for s in self.shards)
        self._refined = None
        if self._refine is not None and self.index is not None:
            codes = mapped.refine if mapped is not None else codes_index(self._refine, self._refine_codes)
            self._refined = refine_index(self.index, codes, self.k_factor)
            self._refine_codes = None   # faiss holds them now
        if iv.REFINE_COLUMN in self.idmap.column_names:   # the codes are the index's, not a product's
            self.idmap = self.idmap.drop_columns([iv.REFINE_COLUMN])
        self._selections: dict[filters.Filter, Selection] = {}
        self._product_of, self.products = None, self.ntotal
        if "photo" in self.idmap.column_names:  # several vectors per product: search_distinct collapses
            encoded = pc.dictionary_encode(self.idmap.column("product_id")).combine_chunks()
            self.products = len(encoded.dictionary)
            if self.products < self.ntotal:  # main / pooled indexes hold one vector per product
                keys = ids_for(encoded.dictionary.to_pylist())[encoded.indices.to_numpy()]
                self._product_of = ProductOf(self._ids, keys)

    @classmethod
    def open(cls, root: str, version: str | None = None, consolidate: bool = True, mmap: bool = False,
             cache_dir: str | None = None) -> "IndexReader":
        """LATEST (or ``version``) of the index at ``root``. ``mmap``: from a local cache
        (``cache_dir``, default $MIMDEX_INDEX_CACHE or ~/.cache/mimdex/index) that the
        version is downloaded, verified and folded into once, its files mapped rather
        than read (mapped.py). Without ``version``, a LATEST whose files retention removed
        while they were read (LATEST moved on meanwhile: index_version.started_from) is
        opened again as the new LATEST, up to OPEN_ATTEMPTS times."""
        if version is not None:
            return cls._open(root, version, consolidate, mmap, cache_dir)
        lost = None
        for _ in range(OPEN_ATTEMPTS):
            version = iv.latest_version(root)
            if version is None:
                raise DataError(f"index {root}: no LATEST (nothing has been published here)")
            try:   # LATEST moved on twice while we read, and retention removed the files: the new LATEST
                with iv.started_from(root, version):
                    return cls._open(root, version, consolidate, mmap, cache_dir)
            except iv.LostRace as exc:   # not throttling and the like: those are raised as they are
                lost = exc
        raise lost

    @classmethod
    def _open(cls, root: str, version: str, consolidate: bool, mmap: bool, cache_dir: str | None) -> "IndexReader":
        m = iv.read_manifest(root, version)
        uri = iv.version_uri(root, version)
        if not mmap:
            return cls(uri, m.params, m.shards, m.trained, m.default_nprobe, m, consolidate, m.deltas)
        loader = ShardLoader(uri, m.params, m.trained, m.deltas)
        path = mapping.ensure(cache_dir or mapping.default_cache(), root, version, loader, m.shards)
        return cls(uri, m.params, m.shards, m.trained, m.default_nprobe, m,
                   mapped=mapping.open_mapped(path))   # the deltas are folded into the cache

    @property
    def version(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def search(self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None,
               filter: "str | filters.Filter | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each queries x k; score = cosine similarity for unit vectors
        (1 - L2^2 / 2), best first; id -1 where fewer than k results exist. With a
        ``filter`` (filters.py: text or Filter) every result satisfies it, and a query gets
        k results whenever k rows do."""
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.params["d"])
        nprobe = nprobe or self.default_nprobe
        if filter is None:
            dist, rows = self._search_rows(x, k, nprobe, None)
        else:
            dist, rows = self._filtered(x, k, nprobe, self.selection(filter))
        ids = self._ids[np.maximum(rows, 0)] if len(self._ids) else np.zeros_like(rows)
        ids = np.where(rows >= 0, ids, -1)
        return np.where(ids >= 0, 1.0 - dist / 2.0, -np.inf).astype(np.float32), ids

    def _search_rows(self, x: np.ndarray, k: int, nprobe: int, sel) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2, id-map rows), queries x k, ties by row (= by id: the map is sorted by
        id). The lists hold rows, so an IDSelector over rows filters inside the scan, and
        re-ranking is faiss's IndexRefine over the id map's codes in row order."""
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel) if sel is not None else None
        if self._refined is not None:
            set_nprobe(self.index, nprobe)
            base = params or faiss.SearchParametersIVF(nprobe=nprobe)
            dist, rows = self._refined.search(x, k, params=faiss.IndexRefineSearchParameters(
                k_factor=float(self.k_factor), base_index_params=base))
        elif self.index is not None:
            set_nprobe(self.index, nprobe)
            dist, rows = self.index.search(x, k, params=params)
        else:
            dist, rows = self._search_shards(x, k * self.k_factor, nprobe, params)
            if self._refine is not None:  # the merged shards' candidates, ordered by the finer codes
                dist = refined_distances(x, rows, _same, self._refine_codes, self._refine.sa_decode)
        return top_k(dist, rows, k)

    def _search_shards(self, x: np.ndarray, k: int, nprobe: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """Coarse-quantise once (shared quantizer), search every shard's lists, merge."""
        for shard in self.shards:
            set_nprobe(shard, nprobe)
        quantizer = faiss.extract_index_ivf(self.shards[0]).quantizer
        cdist, assign = quantizer.search(x, nprobe)
        parts = [_preassigned(s, x, k, assign, cdist, params) for s in self.shards]
        return top_k(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), k)

    def selection(self, flt: "str | filters.Filter") -> "Selection":
        """The rows a filter selects, as faiss's bitmap selector (a few recent ones kept)."""
        flt = filters.parse(flt)
        if flt not in self._selections:
            if len(self._selections) >= 8:
                self._selections.pop(next(iter(self._selections)))
            columns = tuple(self.params.get(attributes.PARAM, ()))
            self._selections[flt] = Selection.of(filters.mask(self.idmap, flt, columns))
        return self._selections[flt]

    def _filtered(self, x: np.ndarray, k: int, nprobe: int, sel: "Selection") -> tuple[np.ndarray, np.ndarray]:
        """Filtered search: exact over the selected rows when they are few (EXACT_SHARE of
        the rows the scan would visit),
        else the IVF scan with the selector, its nprobe widened as the filter narrows (the
        nearest selected rows lie in farther lists), and queries still short of k searched
        again with twice the lists until every list was probed."""
        if sel.count == 0:
            return np.full((len(x), k), np.inf, np.float32), np.full((len(x), k), -1, np.int64)
        want, nlist = min(k, sel.count), self.nlist
        nprobe = min(nlist, math.ceil(nprobe / math.sqrt(sel.count / self.ntotal)))
        if sel.count <= EXACT_SHARE * self.ntotal * nprobe / nlist:   # fewer rows than the scan would visit
            return self._exact(x, k, sel)
        dist, rows = self._search_rows(x, k, nprobe, sel.selector)
        todo = np.flatnonzero((rows >= 0).sum(1) < want)
        while len(todo) and nprobe < nlist:
            nprobe = min(nlist, nprobe * 2)
            dist[todo], rows[todo] = self._search_rows(x[todo], k, nprobe, sel.selector)
            todo = todo[(rows[todo] >= 0).sum(1) < want]
        return dist, rows

    def _exact(self, x: np.ndarray, k: int, sel: "Selection") -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the selected rows: their re-ranking codes decoded once per
        filter, or (an index without them) every list scanned with the selector."""
        if sel.decoded is None:
            if self._refined is not None:
                sel.decoded = self._refined.refine_index.reconstruct_batch(sel.rows)
            elif self._refine is not None:
                sel.decoded = self._refine.sa_decode(self._refine_codes[sel.rows])
            else:
                sel.decoded = selected_vectors(self._parts, sel)
            if sel.decoded is None:   # packed (fast-scan) lists: every list scanned with the selector
                return self._search_rows(x, k, self.nlist, sel.selector)
        dist, found = faiss.knn(x, np.ascontiguousarray(sel.decoded, np.float32), min(k, sel.count))
        rows = np.where(found >= 0, sel.rows[np.maximum(found, 0)], -1)
        return top_k(dist, rows, k)

    @property
    def nlist(self) -> int:
        return faiss.extract_index_ivf(self.index if self.index is not None else self.shards[0]).nlist

    def product_keys(self, ids: np.ndarray) -> np.ndarray:
        """The int64 id of each result's product (the id itself for one vector per product); -1 stays -1."""
        return ids if self._product_of is None else self._product_of(ids)

    def search_distinct(self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None,
                        filter: "str | filters.Filter | None" = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, ids, product ids), each queries x k: k distinct products per query, each
        with its best-scoring vector (photo). Photos are over-fetched; a query still short
        of k products is searched again with twice the fetch (and twice the nprobe when its
        probed lists ran out), so it gets k whenever the index holds k products."""
        if self._product_of is None:
            scores, ids = self.search(vectors, k, nprobe, filter)
            return scores, ids, ids
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.params["d"])
        nprobe, want = nprobe or self.default_nprobe, min(k, self.products)
        # halfway between k and k x (mean photos per product): photos of one product are rarely
        # all near a query, and the few queries left short search again
        fetch = min(max(math.ceil(k * (1 + self.ntotal / max(self.products, 1)) / 2), k), self.ntotal)
        scores, ids = self.search(x, fetch, nprobe, filter)
        out = self._collapse(scores, ids, k)
        todo = np.flatnonzero(out[3] < want)
        ids = ids[todo]
        while len(todo):
            exhausted = (ids[:, -1] < 0).any()
            if fetch >= self.ntotal and (nprobe >= self.nlist or not exhausted):
                break
            fetch = min(fetch * 2, self.ntotal)
            nprobe = min(nprobe * 2, self.nlist) if exhausted else nprobe
            scores, ids = self.search(x[todo], fetch, nprobe, filter)
            again = self._collapse(scores, ids, k)
            for full, part in zip(out, again):
                full[todo] = part
            todo = todo[again[3] < want]
            ids = ids[again[3] < want]
        return out[0], out[1], out[2]

    def _collapse(self, scores: np.ndarray, ids: np.ndarray, k: int):
        """collapse() of a batch, in row blocks on threads for large batches: the id lookups
        and sorts release the GIL, and on a small index they cost as much as the search."""
        blocks = min(_WORKERS, len(ids) // 1024)
        if blocks < 2:
            return collapse(scores, ids, self.product_keys(ids), k)
        cuts = np.linspace(0, len(ids), blocks + 1).astype(int)
        parts = _pool().map(lambda ab: collapse(scores[ab[0]:ab[1]], ids[ab[0]:ab[1]],
                                                self.product_keys(ids[ab[0]:ab[1]]), k), zip(cuts[:-1], cuts[1:]))
        return tuple(np.concatenate(column) for column in zip(*parts))

    def rows(self, ids: np.ndarray) -> list[dict | None]:
        """Id map rows (product_id + catalog metadata) for int64 ids; None for -1."""
        pos = np.searchsorted(self._ids, ids)
        pos = np.clip(pos, 0, max(len(self._ids) - 1, 0))
        found = (len(self._ids) > 0) & (self._ids[pos] == ids)
        table = self.idmap.take(pa.array(pos[found], pa.int64()))
        it = iter(table.to_pylist())
        return [next(it) if f else None for f in found]

    def search_products(self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None,
                        filter: "str | filters.Filter | None" = None) -> list[list[dict]]:
        """k distinct products per query: id map rows (with ``photo``, the one that matched,
        for a multi-photo index) and score; with ``filter``, only rows that satisfy it."""
        scores, ids, _ = self.search_distinct(vectors, k, nprobe, filter)
        out = []
        for srow, irow in zip(scores, ids):
            rows = self.rows(irow[irow >= 0])
            out.append([{**r, "score": float(s)} for r, s in zip(rows, srow[irow >= 0])])
        return out


# Filtered search goes exact (the selected rows' codes, decoded) when the filter selects at
# most this share of the rows the IVF scan would visit: measured on GloVe-100 with the
# default codes (tests/benchmarks/bench_filters.py, docs/benchmarks.md "Filtered search")
EXACT_SHARE = 0.7


def _preassigned(index: faiss.Index, x: np.ndarray, k: int, assign: np.ndarray, cdist: np.ndarray, params):
    """search_preassigned with search parameters (faiss's Python wrapper refuses them)."""
    if params is None:
        return index.search_preassigned(x, k, assign, cdist)
    dist, ids = np.empty((len(x), k), np.float32), np.empty((len(x), k), np.int64)
    assign, cdist = np.ascontiguousarray(assign, np.int64), np.ascontiguousarray(cdist, np.float32)
    index.search_preassigned_c(len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(assign), faiss.swig_ptr(cdist),
                               faiss.swig_ptr(dist), faiss.swig_ptr(ids), False, params)
    return dist, ids


def _same(rows: np.ndarray) -> np.ndarray:
    return rows


_WORKERS = min(4, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_WORKERS, thread_name_prefix="mimdex-collapse")


# an HNSW coarse quantizer's beam at search: raw faiss with its default 16 finds 0.78 of
# the true top 10 at nprobe 16 on 10M vectors where the flat lists give 0.999
# (docs/benchmarks.md); 128, or 2 x nprobe, matches the flat quantizer (test_index_scale)
HNSW_EF_SEARCH = 128


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """nprobe, and an HNSW coarse quantizer's beam wide enough to return that many lists."""
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * nprobe)
