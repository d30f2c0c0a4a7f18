"""A published version as a serving host maps it: downloaded and verified once into a
local cache, then opened without reading its shards into memory.

    <cache>/<root key>/<version>/     written under a temporary name, renamed when whole
        index.faiss                   one faiss index of every shard's lists (plain lists:
                                      SQ8, PQ, flat), delta segments folded in, list ids =
                                      rows of the version's id map; or, for fast-scan,
        shard-00000.faiss ...         each shard as such an index
        refine.faiss                  the re-ranking codes in row order (Refine(...) only)
        idmap.arrow                   the id map, sorted by id, without the codes (Arrow IPC)
        ready.json                    version, rows, shards: written last

Every source file is checked against the manifest's sha256 as it is read (ShardLoader), so
the cache holds only verified bytes; folding delta segments is paid here, once per host
and version, not at every load. Opening maps the files: faiss ``IO_FLAG_MMAP_IFC`` makes
plain inverted lists and the re-ranking codes views of the file (fast-scan's packed lists
are read, as faiss has no mapped form of them, and merged); the id map is an Arrow memory
map.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from mimdex.indexing.rows import codes_index, lists_to_rows, rows_of
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.index_codec import (append_lists, deserialize, lists_header, searched, serialize,
                                                without_pq_tables)
from mimdex.infra.errors import DataError

READY = "ready.json"


@dataclass(frozen=True)
class Mapped:
    """What a mapped version opens to: one searchable index over every shard's lists (rows
    as ids), the re-ranking codes index or None, the id map."""
    index: faiss.Index
    refine: faiss.Index | None
    idmap: pa.Table
    path: str


def cache_path(cache_dir: str, root: str, version: str) -> str:
    key = hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(cache_dir, key, version)


def ensure(cache_dir: str, root: str, version: str, loader, shards: tuple[iv.ShardEntry, ...]) -> str:
    """The version's cache directory, built from storage unless a whole one is there."""
    dest = cache_path(cache_dir, root, version)
    if os.path.exists(os.path.join(dest, READY)):
        return dest
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        _build(tmp, loader, shards)
        with open(os.path.join(tmp, READY), "w") as f:
            json.dump({"root": root, "version": version, "shards": len(shards)}, f)
        try:
            os.rename(tmp, dest)
        except OSError as exc:   # another process cached it first: theirs stands
            if not os.path.exists(os.path.join(dest, READY)):
                raise DataError(f"index cache {dest}: exists without {READY} (not written by mimdex?): "
                                f"remove it ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _build(tmp: str, loader, shards: tuple[iv.ShardEntry, ...]) -> None:
    """One shard in memory at a time: each written with its stored ids; once every id map
    is known, their lists are written again with rows as ids (one file of all shards'
    lists, or, fast-scan, each shard rewritten)."""
    tables, pending = [], []
    for n, entry in enumerate(shards):
        index, table = loader.load(entry)
        pending.append(os.path.join(tmp, f"pending-{n:05d}.faiss"))
        faiss.write_index(index, pending[-1])
        tables.append(table)
        del index
    idmap = pa.concat_tables(tables, promote_options="permissive").sort_by("id")
    del tables
    ids = idmap.column("id").to_numpy()
    if not _consolidate(tmp, pending, ids, loader):
        for n, path in enumerate(pending):
            index = faiss.read_index(path)
            lists_to_rows(index, ids, loader.uri)
            faiss.write_index(index, os.path.join(tmp, f"shard-{n:05d}.faiss"))
            del index
    for path in pending:
        os.remove(path)
    if loader.refine is not None:
        refine = codes_index(loader.refine, iv.refine_codes(idmap, loader.refine.sa_code_size()))
        faiss.write_index(refine, os.path.join(tmp, "refine.faiss"))
        del refine
        idmap = idmap.drop_columns([iv.REFINE_COLUMN])
    with pa.OSFile(os.path.join(tmp, "idmap.arrow"), "wb") as sink, pa.ipc.new_file(sink, idmap.schema) as w:
        w.write_table(idmap)


def _consolidate(tmp: str, paths: list[str], ids: np.ndarray, loader) -> bool:
    """Plain lists: the shards' lists written as one index file with rows as ids, list by
    list from the mapped shard files (never all in memory), so a search maps one list
    where it would otherwise join four. The file is the empty trained index as faiss
    serialises it, its empty lists replaced by the full ones in faiss's own stored form
    (index_codec). False (nothing written) for fast-scan's packed lists."""
    shards = [faiss.read_index(p, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE) for p in paths]
    lists = [faiss.downcast_InvertedLists(faiss.extract_index_ivf(s).invlists) for s in shards]
    if not lists or not all(isinstance(il, faiss.ArrayInvertedLists) for il in lists):
        return False
    nlist, size = lists[0].nlist, lists[0].code_size
    empty = serialize(searched(deserialize(loader.trained)))
    tail = lists_header(nlist, size, np.zeros(nlist))
    if not empty.endswith(tail):
        return False   # a layout this writer does not know: per shard
    sizes = np.array([sum(il.list_size(lst) for il in lists) for lst in range(nlist)], np.uint64)
    with open(os.path.join(tmp, "index.faiss"), "wb") as f:
        f.write(empty[:-len(tail)] + lists_header(nlist, size, sizes))
        for lst in np.flatnonzero(sizes).tolist():
            pieces = [(il.list_size(lst), il) for il in lists if il.list_size(lst)]
            for n, il in pieces:
                f.write(faiss.rev_swig_ptr(il.get_codes(lst), n * size).tobytes())
            for n, il in pieces:
                held = faiss.rev_swig_ptr(il.get_ids(lst), n)
                f.write(rows_of(ids, held, loader.uri, lst).astype(np.int64).tobytes())
    return True


def open_mapped(path: str) -> Mapped:
    """The cached version at ``path``, mapped."""
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
    if os.path.exists(one := os.path.join(path, "index.faiss")):   # plain lists, consolidated
        index = faiss.read_index(one, flags)
        without_pq_tables(index)
        ivf = faiss.extract_index_ivf(index)
        ivf.ntotal = index.ntotal = sum(ivf.invlists.list_size(lst) for lst in range(ivf.nlist))
    else:   # fast-scan: packed lists are read, and merged as IndexReader merges them
        names = sorted(f for f in os.listdir(path) if f.startswith("shard-") and f.endswith(".faiss"))
        index = faiss.read_index(os.path.join(path, names[0]), flags)
        for name in names[1:]:
            append_lists(index, faiss.read_index(os.path.join(path, name), flags))
    refine_path = os.path.join(path, "refine.faiss")
    refine = faiss.read_index(refine_path, faiss.IO_FLAG_MMAP_IFC) if os.path.exists(refine_path) else None
    idmap = pa.ipc.open_file(pa.memory_map(os.path.join(path, "idmap.arrow"))).read_all()
    return Mapped(index, refine, idmap, path)


def default_cache() -> str:
    return os.environ.get("MIMDEX_INDEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mimdex", "index")


def prune(cache_dir: str, root: str, keep: set[str]) -> list[str]:
    """Remove this root's cached versions other than ``keep``, and partial builds an hour
    old (a crashed build's); returns what was removed. A process that still maps a removed
    version keeps reading it: the files go when the last mapping closes."""
    home = os.path.dirname(cache_path(cache_dir, root, "-"))
    removed = []
    for name in sorted(os.listdir(home)) if os.path.isdir(home) else []:
        path = os.path.join(home, name)
        stale = ".tmp-" in name and time.time() - os.path.getmtime(path) > 3600
        if stale or (".tmp-" not in name and name not in keep):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed
