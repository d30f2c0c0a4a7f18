"""Open a published index (LATEST or a named version) from any URI and search it.

All shards share one trained quantizer, so their inverted lists can be searched side by
side and the top-k merged exactly, or consolidated into one IVF at load time (faiss
``merge_from``, exact as well): the default, because fast-scan PQ computes its look-up
tables per query and probed list, and separate shards would compute them once per shard.
Every shard and id map is checked against the manifest's sha256 when loaded.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pyarrow as pa

from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.files import FileRef
from mimdex.infra.contracts.index_codec import shard_index
from mimdex.infra.errors import DataError


class IndexReader:
    def __init__(self, uri: str, params: dict, shards: tuple[iv.ShardEntry, ...], trained: FileRef,
                 default_nprobe: int = 1, manifest: iv.IndexManifest | None = None, consolidate: bool = True):
        self.uri, self.manifest, self.params = uri, manifest, params
        self.default_nprobe = int(default_nprobe or 1)
        self._trained = iv.read_trained(uri, trained)
        with ThreadPoolExecutor(4) as pool:
            loaded = list(pool.map(self._load_shard, shards))
        self.shards = [index for index, _ in loaded]
        self.idmap = pa.concat_tables([t for _, t in loaded], promote_options="permissive").sort_by("id")
        self._ids = self.idmap.column("id").to_numpy()
        self.ntotal = sum(s.ntotal for s in self.shards)
        self.index = None
        if consolidate and self.shards:
            # merge_from moves the lists: the shards are consumed into one index
            self.index, rest = self.shards[0], self.shards[1:]
            for shard in rest:
                self.index.merge_from(shard, 0)
            self.shards = []

    @classmethod
    def open(cls, root: str, version: str | None = None, consolidate: bool = True) -> "IndexReader":
        if version is None:
            version = iv.latest_version(root)
            if version is None:
                raise DataError(f"index {root}: no LATEST (nothing has been published here)")
        m = iv.read_manifest(root, version)
        return cls(iv.version_uri(root, version), m.params, m.shards, m.trained, m.default_nprobe, m, consolidate)

    @property
    def version(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def _load_shard(self, entry: iv.ShardEntry) -> tuple[faiss.Index, pa.Table]:
        lists, ids = iv.read_shard(self.uri, entry)
        try:
            index = shard_index(self._trained, lists)
        except ValueError as exc:
            raise DataError(f"{self.uri}/{entry.index.file}: {exc}") from exc
        if index.ntotal != ids.num_rows:
            raise DataError(f"{self.uri}: {entry.index.file} holds {index.ntotal} vectors but its id map "
                            f"{ids.num_rows}")
        return index, ids

    def search(self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each queries x k; score = cosine similarity for unit vectors
        (1 - L2^2 / 2), best first; id -1 where fewer than k results exist."""
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.params["d"])
        nprobe = nprobe or self.default_nprobe
        if self.index is not None:
            faiss.extract_index_ivf(self.index).nprobe = nprobe
            dist, ids = self.index.search(x, k)
        else:
            dist, ids = self._search_shards(x, k, nprobe)
        return np.where(ids >= 0, 1.0 - dist / 2.0, -np.inf).astype(np.float32), ids

    def _search_shards(self, x: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Coarse-quantise once (shared quantizer), search every shard's lists, merge."""
        quantizer = faiss.extract_index_ivf(self.shards[0]).quantizer
        cdist, assign = quantizer.search(x, nprobe)
        for shard in self.shards:
            faiss.extract_index_ivf(shard).nprobe = nprobe
        parts = [s.search_preassigned(x, k, assign, cdist) for s in self.shards]
        dist = np.concatenate([p[0] for p in parts], 1)
        ids = np.concatenate([p[1] for p in parts], 1)
        dist = np.where(ids >= 0, dist, np.inf)
        order = np.lexsort((ids, dist), axis=1)[:, :k] if dist.size else np.zeros((len(x), 0), int)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)

    def rows(self, ids: np.ndarray) -> list[dict | None]:
        """Id map rows (product_id + catalog metadata) for int64 ids; None for -1."""
        pos = np.searchsorted(self._ids, ids)
        pos = np.clip(pos, 0, max(len(self._ids) - 1, 0))
        found = (len(self._ids) > 0) & (self._ids[pos] == ids)
        table = self.idmap.take(pa.array(pos[found], pa.int64()))
        it = iter(table.to_pylist())
        return [next(it) if f else None for f in found]

    def search_products(self, vectors: np.ndarray, k: int = 10, nprobe: int | None = None) -> list[list[dict]]:
        scores, ids = self.search(vectors, k, nprobe)
        out = []
        for srow, irow in zip(scores, ids):
            rows = self.rows(irow[irow >= 0])
            out.append([{**r, "score": float(s)} for r, s in zip(rows, srow[irow >= 0])])
        return out
