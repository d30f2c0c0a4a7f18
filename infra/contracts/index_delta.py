"""Delta segments: how a refresh changes an index without rewriting it (docs/contracts.md,
"Index versions and delta segments").

A version's vectors are its *base* shards plus an ordered list of *delta segments*. A
refresh that keeps the codebooks writes one segment: per shard, the codes of its new
vectors (``delta-00003.index`` + ``delta-00003.ids.parquet``, the shard format of
index_codec / index_version), and a deletion list (``deleted.parquet``: the int64 product
keys whose earlier vectors no longer stand). Everything else (trained.index, the base
shards, earlier segments) is *referenced* from the versions that wrote it, as
``../<version>/<file>`` in the manifest: a quiet night writes only what changed.

A segment's deletions apply to everything before it (the base and earlier segments),
never to its own vectors: a changed product is deleted and re-added in one segment.
``combine`` applies that rule; the reader and compaction both use it, so a version read
through its deltas and the same version compacted hold the same vectors, in the same
order, byte for byte.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.index_version import DeltaSegment
from mimdex.infra.contracts.files import FileRef, read_table_checked, write_parquet
from mimdex.infra.contracts.vectors import ids_for

DELETED_FILE = "deleted.parquet"
DELETED_SCHEMA = pa.schema([("product_key", pa.int64()), ("product_id", pa.string())])


def rebased(ref: FileRef, home: str) -> FileRef:
    """A file of version ``home`` as a sibling version's manifest names it."""
    return ref if ref.file.startswith("../") else replace(ref, file=f"../{home}/{ref.file}")


def rebase_shard(entry: iv.ShardEntry, home: str) -> iv.ShardEntry:
    return replace(entry, index=rebased(entry.index, home), ids=rebased(entry.ids, home))


def rebase_segment(seg: DeltaSegment, home: str) -> DeltaSegment:
    return replace(seg, shards=tuple(rebase_shard(s, home) for s in seg.shards),
                   deleted=rebased(seg.deleted, home) if seg.deleted else None)


def home_of(ref: FileRef, version: str) -> tuple[str, str]:
    """(the version directory a file lives in, its name there)."""
    if ref.file.startswith("../"):
        home, name = ref.file[3:].split("/", 1)
        return home, name
    return version, ref.file


def write_segment(version_dir: str, version: str, shards: dict[int, tuple[bytes, int, pa.Table]],
                  deleted_ids: list[str]) -> DeltaSegment:
    """A segment's files, each written whole: per shard (lists, count, id map), and the
    deletion list of ``deleted_ids`` (product_ids)."""
    entries = []
    for shard, (blob, n, idmap) in sorted(shards.items()):
        entry = iv.write_shard(version_dir, shard, blob, n, idmap, prefix="delta")
        entries.append(entry)
    deleted = None
    if deleted_ids:
        keys = ids_for(deleted_ids)
        table = pa.table([pa.array(keys, pa.int64()), pa.array(deleted_ids, pa.string())],
                         schema=DELETED_SCHEMA).sort_by("product_key")
        deleted = write_parquet(version_dir, DELETED_FILE, table)
    return DeltaSegment(version, tuple(entries), deleted, sum(n for _, n, _ in shards.values()), len(deleted_ids))


def read_deleted(version_dir: str, seg: DeltaSegment) -> np.ndarray:
    if seg.deleted is None:
        return np.zeros(0, np.int64)
    table = read_table_checked(version_dir, seg.deleted, "deletion list", iv.RECORDED_IN, columns=["product_key"])
    return table.column("product_key").to_numpy()


def later_deletions(version_dir: str, deltas: tuple[DeltaSegment, ...]) -> list[np.ndarray]:
    """For the base (index 0) and each segment (index i + 1): the product keys that
    segments after it delete."""
    each = [read_deleted(version_dir, seg) for seg in deltas]
    out = []
    for i in range(len(deltas) + 1):
        rest = each[i:]
        out.append(np.unique(np.concatenate(rest)) if rest else np.zeros(0, np.int64))
    return out


def product_keys(idmap: pa.Table) -> np.ndarray:
    """Each vector's product key: its id for one vector per product, else from product_id."""
    if "photo" not in idmap.column_names:
        return idmap.column("id").to_numpy()
    encoded = pc.dictionary_encode(idmap.column("product_id")).combine_chunks()
    return ids_for(encoded.dictionary.to_pylist())[encoded.indices.to_numpy()]


def combine(pieces: list[tuple[bytes, pa.Table, np.ndarray]], nlist: int, code_size: int) -> tuple[bytes, pa.Table, int]:
    """One shard's segments, base first, each as (stored lists, id map, product keys
    deleted after it) -> the shard's live lists (stored form, sorted as encoded_lists
    sorts) and id map, and the vector count."""
    ids, lists, codes, maps = [], [], [], []
    for blob, idmap, deleted in pieces:
        i, lst, c = codec.decoded_lists(blob)
        if len(deleted):
            by_id = idmap.sort_by("id")
            keep_map = ~np.isin(product_keys(by_id), deleted)
            gone = by_id.column("id").to_numpy()[~keep_map]
            keep = ~np.isin(i, gone)
            i, lst, c, idmap = i[keep], lst[keep], c[keep], by_id.filter(pa.array(keep_map))
        ids.append(i)
        lists.append(lst)
        codes.append(c)
        maps.append(idmap)
    ids_all = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    blob = codec.encoded_lists(nlist, code_size, ids_all, np.concatenate(lists) if lists else np.zeros(0, np.int64),
                               np.concatenate(codes) if codes else np.zeros((0, code_size), np.uint8))
    idmap = pa.concat_tables(maps, promote_options="permissive") if maps else iv.empty_idmap()
    return blob, idmap, int(len(ids_all))


def shard_pieces(version_dir: str, shard: iv.ShardEntry, deltas: tuple[DeltaSegment, ...],
                 deletions: list[np.ndarray]) -> list[tuple[bytes, pa.Table, np.ndarray]]:
    """What ``combine`` takes for one shard: its base and each segment's part of it."""
    blob, idmap = iv.read_shard(version_dir, shard)
    pieces = [(blob, idmap, deletions[0])]
    for i, seg in enumerate(deltas):
        for entry in seg.shards:
            if entry.shard == shard.shard:
                b, m = iv.read_shard(version_dir, entry)
                pieces.append((b, m, deletions[i + 1]))
    return pieces


def files_of(manifest: iv.IndexManifest) -> set[tuple[str, str]]:
    """Every (version, file name) a version's manifest uses: what retention must keep."""
    refs = [manifest.trained] + [r for s in manifest.shards for r in (s.index, s.ids)]
    refs += [r for r in (manifest.ground_truth, manifest.search_lists) if r]
    for seg in manifest.deltas:
        refs += [r for s in seg.shards for r in (s.index, s.ids)] + ([seg.deleted] if seg.deleted else [])
    return {home_of(r, manifest.version) for r in refs} | {(manifest.version, "manifest.json")}
