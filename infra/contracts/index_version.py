"""The published-index contract: a version's files, its manifest, and the LATEST pointer.

    <root>/versions/<version>/trained.index          the empty trained IVF-PQ, once
    <root>/versions/<version>/shard-00003.index      the shard's inverted lists (index_codec)
    <root>/versions/<version>/shard-00003.ids.parquet  id (sorted), product_id, catalog metadata,
                                                     refine (the re-ranking codes, when the index has them)
    <root>/versions/<version>/delta-00003.index, .ids.parquet, deleted.parquet   a refresh's delta
                                                     segment (contracts.index_delta)
    <root>/versions/<version>/manifest.json          written last, create-only: the version is complete;
                                                     it may name files of older versions as ../<version>/<file>
    <root>/versions/<version>/_pruned                retention deleted this version before it was complete
                                                     (the mark stays, so that its build can never publish it)
    <root>/LATEST                                    {"version", "previous", "published_at"}

A publisher reads LATEST when it starts (its parent) and replaces it only if it still
names that parent: of two builds racing on one root exactly one publishes; the other gets
exit 75 and its complete, unpublished version stays for inspection. A publisher that finds
a file of its parent gone after LATEST moved on lost that race too (retention removed the
parent: started_from), and exits 75 rather than calling the index damaged.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.infra.contracts.files import FileRef, column_bytes, consume_checked, read_checked, table_from_bytes
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.errors import DataError, TransientError

INDEX_FORMAT = "mimdex-index/1"
RECORDED_IN = "the index manifest"
T = TypeVar("T")
PRUNED = "_pruned"  # retention's mark in a version it deleted before it was complete (write_manifest)
_VERSION_FORMATS = ("%Y%m%dT%H%M%S%fZ", "%Y%m%dT%H%M%SZ")


def new_version() -> str:
    # microseconds: names sort in creation order even for builds a second apart
    return dt.datetime.now(dt.timezone.utc).strftime(_VERSION_FORMATS[0]) + "-" + uuid.uuid4().hex[:6]


def created(version: str) -> dt.datetime | None:
    for fmt in _VERSION_FORMATS:
        try:
            return dt.datetime.strptime(version.split("-")[0], fmt).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
    return None


def version_uri(root: str, version: str) -> str:
    return storage.join(root, "versions", version)


def latest_uri(root: str) -> str:
    return storage.join(root, "LATEST")


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


@dataclass(frozen=True)
class ShardEntry:
    shard: int
    name: str
    ntotal: int
    index: FileRef
    ids: FileRef

    def to_json(self) -> dict:
        return {"shard": self.shard, "name": self.name, "ntotal": self.ntotal, "index": self.index.to_json(),
                "ids": self.ids.to_json()}

    @classmethod
    def from_json(cls, obj: dict) -> "ShardEntry":
        return cls(int(obj["shard"]), obj["name"], int(obj["ntotal"]), FileRef.from_json(obj["index"]),
                   FileRef.from_json(obj["ids"]))


@dataclass(frozen=True)
class DeltaSegment:
    version: str                          # the refresh that wrote it
    shards: tuple[ShardEntry, ...]     # its new vectors, per shard that got any
    deleted: FileRef | None               # product keys whose earlier vectors it removes
    added: int = 0
    removed_products: int = 0

    def to_json(self) -> dict:
        return {"version": self.version, "shards": [s.to_json() for s in self.shards],
                "deleted": self.deleted.to_json() if self.deleted else None, "added": self.added,
                "removed_products": self.removed_products}

    @classmethod
    def from_json(cls, obj: dict) -> "DeltaSegment":
        return cls(obj["version"], tuple(ShardEntry.from_json(s) for s in obj["shards"]),
                   FileRef.from_json(obj.get("deleted")), int(obj.get("added", 0)),
                   int(obj.get("removed_products", 0)))


@dataclass(frozen=True)
class IndexManifest:
    version: str
    model: ModelRef
    vector: str
    fuse_alpha: float
    params: dict                 # factory, nlist, m, nbits, train_size, d, metric, reasons
    shards: tuple[ShardEntry, ...]
    trained: FileRef
    default_nprobe: int = 1
    recall_target: float = 0.95
    training: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)   # uri, manifest_created_at, parts
    counts: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    parent: str | None = None
    photos: str | None = None    # a multi-photo catalog: what each product contributes (contracts.photos)
    deltas: tuple[DeltaSegment, ...] = ()   # refreshes since the base shards (contracts.index_delta)
    ground_truth: FileRef | None = None     # the gate's exact neighbours (contracts.ground_truth)
    search_lists: FileRef | None = None     # the gate's search results (contracts.search_lists)

    @property
    def factory(self) -> str:
        return self.params["factory"]

    @property
    def ntotal(self) -> int:
        if self.deltas and "indexed" in self.counts:  # base + deltas - deletions, as counted when written
            return int(self.counts["indexed"])
        return sum(s.ntotal for s in self.shards)

    def to_json(self) -> dict:
        return {"format": INDEX_FORMAT, "version": self.version, "model": self.model.to_json(), "vector": self.vector,
                "fuse_alpha": self.fuse_alpha, "factory": self.factory, "params": self.params,
                "training": self.training, "default_nprobe": self.default_nprobe,
                "recall_target": self.recall_target, "shards": [s.to_json() for s in self.shards],
                "trained": self.trained.to_json(), "embeddings": self.embeddings, "counts": self.counts,
                "evaluation": self.evaluation, "parent": self.parent,
                **({"photos": self.photos} if self.photos else {}),
                **({"deltas": [d.to_json() for d in self.deltas]} if self.deltas else {}),
                **({"ground_truth": self.ground_truth.to_json()} if self.ground_truth else {}),
                **({"search_lists": self.search_lists.to_json()} if self.search_lists else {})}

    @classmethod
    def from_json(cls, obj: dict, uri: str = "manifest") -> "IndexManifest":
        try:
            return cls(version=obj["version"], model=ModelRef.from_json(obj["model"]), vector=obj["vector"],
                       fuse_alpha=float(obj.get("fuse_alpha", 0.5)), params=dict(obj["params"]),
                       shards=tuple(ShardEntry.from_json(s) for s in obj["shards"]),
                       trained=FileRef.from_json(obj["trained"]), default_nprobe=int(obj.get("default_nprobe") or 1),
                       recall_target=float(obj.get("recall_target", 0.95)), training=dict(obj.get("training") or {}),
                       embeddings=dict(obj.get("embeddings") or {}), counts=dict(obj.get("counts") or {}),
                       evaluation=dict(obj.get("evaluation") or {}), parent=obj.get("parent"),
                       photos=obj.get("photos"),
                       deltas=tuple(DeltaSegment.from_json(d) for d in obj.get("deltas") or ()),
                       ground_truth=FileRef.from_json(obj["ground_truth"]) if obj.get("ground_truth") else None,
                       search_lists=FileRef.from_json(obj["search_lists"]) if obj.get("search_lists") else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{uri}: not a valid {INDEX_FORMAT} manifest: {type(exc).__name__} {exc}") from exc


def read_manifest(root: str, version: str) -> IndexManifest:
    uri = storage.join(version_uri(root, version), "manifest.json")
    obj = storage.read_manifest(uri, INDEX_FORMAT, f"index {root}: version {version} has no manifest.json "
                                                   "(incomplete or not an index version)")
    return IndexManifest.from_json(obj, uri)


def write_manifest(root: str, manifest: IndexManifest) -> None:
    """Complete a version: its manifest, create-only. Retention marks a version it deletes
    before it is complete and then looks for this manifest; we write the manifest and then
    look for the mark: one of us sees the other, so a build never publishes a version
    whose files retention is deleting (a --grace-hours shorter than the build)."""
    uri = storage.join(version_uri(root, manifest.version), "manifest.json")
    storage.write_json(uri, manifest.to_json(), create_only=True)
    if storage.exists(storage.join(version_uri(root, manifest.version), PRUNED)):
        storage.delete(uri)
        raise TransientError(f"retention (versions --prune) deleted version {manifest.version} while it was being "
                             "built (its --grace-hours is shorter than this build); nothing was published; run "
                             "the job again")


def mark_pruned(root: str, version: str) -> bool:
    """Retention's side of write_manifest: mark an incomplete version before deleting it.
    False (and no mark) if it completed meanwhile: it is not to be deleted."""
    mark = storage.join(version_uri(root, version), PRUNED)
    storage.write_bytes(mark, b"")
    if is_complete(root, version):
        storage.delete(mark)
        return False
    return True


def is_complete(root: str, version: str) -> bool:
    return storage.exists(storage.join(version_uri(root, version), "manifest.json"))


@dataclass(frozen=True)
class LatestPointer:
    version: str
    previous: str | None = None
    published_at: str | None = None


def read_latest(root: str) -> tuple[LatestPointer | None, str | None]:
    """LATEST (None if nothing was published) and its version token for a conditional
    replace; a pointer that is not one is exit 65 naming it."""
    data, token = storage.read_versioned(latest_uri(root))
    if data is None:
        return None, None
    try:
        obj = json.loads(data)
        return LatestPointer(str(obj["version"]), obj.get("previous"), obj.get("published_at")), token
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{latest_uri(root)}: not a mimdex LATEST pointer: {exc}") from exc


def latest_version(root: str) -> str | None:
    pointer, _ = read_latest(root)
    return pointer.version if pointer else None


class LostRace(TransientError):
    """A file of the version a job started from, removed by retention after LATEST moved on."""


@contextlib.contextmanager
def started_from(root: str, parent: str | None) -> Iterator[None]:
    """Reads of ``parent`` (the version LATEST named when the job started): a file found
    missing once LATEST names another version was removed by retention, which keeps only
    LATEST's version, the one it replaced, younger ones and the files they use. The job
    could not have published (LATEST is not its parent): exit 75, and a re-run starts from
    the new LATEST (LostRace). While LATEST still names the parent, a missing file is damage (exit 65)."""
    try:
        yield
    except storage.ObjectNotFound as exc:
        if parent is None or (now := latest_version(root)) == parent:
            raise
        raise LostRace(f"{exc}: LATEST moved from {parent} to {now} while this job ran and retention "
                       f"removed {parent}'s files; nothing was published; run it again (it starts "
                       f"from {now})") from exc


def _pointer(version: str, previous: str | None) -> bytes:
    # "writer": this publish's token, so that a retry whose first answer was lost knows
    # the pointer that stands for its own (storage.replace_if compares the bytes)
    return json.dumps({"version": version, "previous": previous, "writer": uuid.uuid4().hex,
                       "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
                      indent=2, sort_keys=True).encode() + b"\n"


def point_latest(root: str, version: str, expected_token: str | None, previous: str | None) -> None:
    """Replace LATEST with ``version`` if it is still what the caller read (exit 75 if not).

    Retention deletes a version's manifest and then reads LATEST (keeping the version if
    LATEST names it); we move LATEST and then look for the manifest: one of us sees the
    other. If it is us, LATEST goes back to exactly what it was, and exit 75."""
    if not is_complete(root, version):
        raise TransientError(f"version {version} has no manifest.json (retention deleted it, or it never "
                             f"completed); {latest_uri(root)} was not moved")
    before, token = read_latest(root)
    if token != expected_token:
        raise storage.ConcurrentUpdate(f"{latest_uri(root)} changed since it was read")
    storage.replace_if(latest_uri(root), _pointer(version, previous), expected_token)
    if is_complete(root, version):
        return
    if before is not None:
        _, ours = read_latest(root)
        storage.replace_if(latest_uri(root), _pointer(before.version, before.previous), ours)
    raise TransientError(f"retention deleted version {version} while LATEST was moved to it; LATEST names "
                         f"{before.version if before else 'it still (there was nothing before it)'} again")


def list_versions(root: str) -> list[str]:
    base = storage.join(root, "versions")
    if not storage.exists(base):
        return []
    fs, path = storage.resolve(base)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


REFINE_COLUMN = "refine"   # fixed_size_binary: a vector's re-ranking codes (index_codec), kept with its id


def with_refine(idmap: pa.Table, codes: np.ndarray | None) -> pa.Table:
    """The id map rows with their re-ranking codes (row for row), when there are any."""
    if codes is None:
        return idmap
    return idmap.append_column(REFINE_COLUMN, code_column(codes))


def code_column(codes: np.ndarray) -> pa.Array:
    """rows x size uint8 codes as a fixed_size_binary(size) column (no copy)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(codes.shape[1]), len(codes), [None, pa.py_buffer(codes)])


def code_matrix(column: pa.Array | pa.ChunkedArray, size: int) -> np.ndarray:
    """A fixed_size_binary(size) column as a rows x size uint8 matrix (no copy for one chunk)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count or arr.type.byte_width != size:
        raise DataError(f"codes that are not {size} bytes each, or with nulls")
    if not len(arr):
        return np.zeros((0, size), np.uint8)
    data = np.frombuffer(arr.buffers()[1], np.uint8)
    return data[arr.offset * size:(arr.offset + len(arr)) * size].reshape(len(arr), size)


def refine_codes(idmap: pa.Table, size: int) -> np.ndarray:
    """The id map's re-ranking codes as a rows x size uint8 matrix."""
    if REFINE_COLUMN not in idmap.column_names:
        if idmap.num_rows:
            raise DataError(f"an index id map of {idmap.num_rows} rows has no {REFINE_COLUMN} column, "
                            "but the index re-ranks")
        return np.zeros((0, size), np.uint8)
    return code_matrix(idmap.column(REFINE_COLUMN), size)


def empty_idmap() -> pa.Table:
    return pa.table({"id": pa.array([], pa.int64()), "product_id": pa.array([], pa.string())})


def write_shard(version_dir: str, shard: int, lists: "bytes | Iterable[bytes]", ntotal: int, idmap: pa.Table,
                prefix: str = "shard") -> ShardEntry:
    """A shard's inverted lists (bytes, or a stream of chunks: index_codec.encoded_chunks)
    and its id map (sorted by id), each written whole (``prefix`` "delta": a delta
    segment's part of the shard)."""
    name = f"{prefix}-{shard:05d}"
    with storage.open_write(storage.join(version_dir, f"{name}.index")) as f:
        for chunk in ([lists] if isinstance(lists, (bytes, bytearray)) else lists):
            f.write(chunk)
    index_ref = FileRef(f"{name}.index", f.sha256(), f.bytes_written)
    with storage.open_write(storage.join(version_dir, f"{name}.ids.parquet")) as f:
        pq.write_table(idmap.sort_by("id"), f, compression="zstd")
    ids_ref = FileRef(f"{name}.ids.parquet", f.sha256(), f.bytes_written)
    return ShardEntry(shard, name, int(ntotal), index_ref, ids_ref)


def read_trained(version_dir: str, ref: FileRef) -> bytes:
    return read_checked(version_dir, ref, "trained index", RECORDED_IN)


def read_shard(version_dir: str, entry: ShardEntry) -> tuple[bytes, pa.Table]:
    """A shard's inverted lists and id map, both verified against the manifest."""
    lists = read_checked(version_dir, entry.index, "index shard", RECORDED_IN)
    return lists, _read_idmap(version_dir, entry)


def _read_idmap(version_dir: str, entry: ShardEntry) -> pa.Table:
    ids_uri = storage.join(version_dir, entry.ids.file)
    return table_from_bytes(read_checked(version_dir, entry.ids, "index id map", RECORDED_IN), ids_uri, "index id map")


def idmap_columns(version_dir: str, entry: ShardEntry, columns: list[str]) -> tuple[pa.Table, int]:
    """Some columns of a shard's (or delta segment's) id map, those of them it has,
    reading only their chunks, and the stored bytes read. The whole-file sha256 needs the
    whole file: its size is checked (exit 65, named)."""
    uri = storage.join(version_dir, entry.ids.file)
    with storage.open_read(uri) as f:
        try:
            if entry.ids.bytes and f.size != entry.ids.bytes:
                raise DataError(f"index id map {uri}: {f.size} bytes, {RECORDED_IN} says {entry.ids.bytes}; "
                                "refusing a replaced or truncated file")
            pf = pq.ParquetFile(f)
            names = [c for c in columns if c in pf.schema_arrow.names]
            table = pf.read(columns=names)
            stored = column_bytes(pf.metadata, range(pf.metadata.num_row_groups), names)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"index id map {uri}: not a readable Parquet file: {exc}") from exc
    return table, stored


def load_shard(version_dir: str, entry: ShardEntry, load: Callable[[Callable[[int], bytes]], T]) -> tuple[T, pa.Table]:
    """``load(read)`` of a shard's inverted lists streamed from storage (read(n) -> bytes;
    a reader never holds the file and the lists it becomes at once), verified against the
    manifest as they stream (files.consume_checked), and its id map."""
    return consume_checked(version_dir, entry.index, RECORDED_IN, load), _read_idmap(version_dir, entry)
