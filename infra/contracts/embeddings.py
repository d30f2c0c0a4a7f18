"""The embeddings contract: part files, reject files and the manifest that lists them.

Layout under an embeddings root (docs/contracts.md, "Embedding shards"):

    part-00042.parquet           product_id, [photo,] image_emb, [text_emb,] content_hash
    rejects/part-00042.parquet   REJECT_SCHEMA (catalog.py), + photo for a multi-photo catalog
    manifest.json                written last: the root is complete; readers take the
                                 part list from it, never from a listing
    runs/<run>/..., manifests/<run>.json   a refresh's delta encodes and composite manifests
    runs/<run>/input/reuse.parquet         a multi-photo refresh: vectors its encode copies (reuse.py)

A composite manifest reuses earlier parts: an entry's ``deleted`` names the deletion file
of product_ids that later runs superseded (contracts.part_deletions; ``exclude``: the same
ids inline, as entries written before those files have them), and readers drop them from
the part and its rejects alike (``live_rows``).
"""
from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.infra.contracts import part_deletions
from mimdex.infra.contracts.catalog import PHOTO_REJECT_SCHEMA, REJECT_SCHEMA, ROW_ONLY_REASONS
from mimdex.infra.contracts.files import FileRef, column_bytes, read_table_checked, write_parquet
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.contracts.photos import product_state
from mimdex.infra.errors import DataError

MANIFEST_FORMAT = "mimdex-embeddings/1"
DTYPES = ("float16", "float32")
PA_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
RECORDED_IN = "the embeddings manifest"
PAGE_CHECKSUMS = b"mimdex.page_checksums"   # a part's footer says its pages carry CRC32s


@dataclass(frozen=True)
class PartEntry:
    """One encoded unit as a manifest lists it."""

    name: str
    part: FileRef
    rejects: FileRef | None = None
    reject_reasons: dict = field(default_factory=dict)
    unit: int = 0
    fingerprint: str = "-"
    source: str | None = None            # the catalog file the unit came from
    row_groups: tuple[int, ...] = ()
    input_rows: int = 0
    exclude: tuple[str, ...] = ()        # product_ids later runs superseded (entries before deletion files)
    deleted: FileRef | None = None       # the deletion file of those (contracts.part_deletions)

    def to_json(self) -> dict:
        out = {"name": self.name, "unit": self.unit, "fingerprint": self.fingerprint, "source": self.source,
               "row_groups": list(self.row_groups), "input_rows": self.input_rows, "part": self.part.to_json(),
               "rejects": ({**self.rejects.to_json(), "reasons": dict(sorted(self.reject_reasons.items()))}
                           if self.rejects else None)}
        if self.exclude:
            out["exclude"] = sorted(self.exclude)
        if self.deleted:
            out["deleted"] = self.deleted.to_json()
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "PartEntry":
        rej = obj.get("rejects")
        return cls(name=obj["name"], part=FileRef.from_json(obj["part"]), rejects=FileRef.from_json(rej),
                   reject_reasons=dict((rej or {}).get("reasons", {})), unit=int(obj.get("unit", 0)),
                   fingerprint=obj.get("fingerprint", "-"), source=obj.get("source"),
                   row_groups=tuple(obj.get("row_groups", ())), input_rows=int(obj.get("input_rows", 0)),
                   exclude=tuple(obj.get("exclude", ())), deleted=FileRef.from_json(obj.get("deleted")))

    def moved(self, name: str, prefix: str) -> "PartEntry":
        """The same part seen from a root ``prefix`` levels above its own (refresh runs)."""
        def under(ref):
            return replace(ref, file=f"{prefix}/{ref.file}") if ref else None
        return replace(self, name=name, part=under(self.part), rejects=under(self.rejects))


@dataclass(frozen=True)
class EmbeddingsManifest:
    model: ModelRef
    dtype: str
    parts: tuple[PartEntry, ...]
    catalog: str = "-"
    unit_rows: int = 0
    counts: dict = field(default_factory=dict)   # input_rows, encoded, rejected, rejects_by_reason
    created_at: str = ""
    run: str | None = None                       # the refresh run that made a composite manifest

    def to_json(self) -> dict:
        out = {"format": MANIFEST_FORMAT, "created_at": self.created_at, "model": self.model.to_json(),
               "dtype": self.dtype, "catalog": self.catalog, "unit_rows": self.unit_rows, "counts": self.counts,
               "parts": [p.to_json() for p in self.parts]}
        if self.run:
            out["run"] = self.run
        return out

    @classmethod
    def from_json(cls, obj: dict, uri: str = "manifest") -> "EmbeddingsManifest":
        try:
            return cls(model=ModelRef.from_json(obj["model"]), dtype=obj["dtype"],
                       parts=tuple(PartEntry.from_json(p) for p in obj["parts"]), catalog=obj.get("catalog", "-"),
                       unit_rows=int(obj.get("unit_rows", 0)), counts=dict(obj.get("counts", {})),
                       created_at=obj.get("created_at", ""), run=obj.get("run"))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{uri}: not a valid {MANIFEST_FORMAT} manifest: {type(exc).__name__} {exc}") from exc

    @property
    def encoded(self) -> int:
        return int(self.counts.get("encoded", 0))


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def manifest_uri(root: str, name: str = "manifest.json") -> str:
    return storage.join(root, name)


def read_manifest(root: str, name: str = "manifest.json") -> EmbeddingsManifest:
    """The manifest of a complete embeddings root, or exit 65 saying why it is not one."""
    uri = manifest_uri(root, name)
    obj = storage.read_manifest(uri, MANIFEST_FORMAT,
                                f"embeddings {root}: no {name} (the encode run has not completed)")
    return EmbeddingsManifest.from_json(obj, uri)


def has_manifest(root: str) -> bool:
    return storage.exists(manifest_uri(root))


def write_manifest(root: str, manifest: EmbeddingsManifest, name: str = "manifest.json") -> str:
    uri = manifest_uri(root, name)
    storage.write_json(uri, manifest.to_json())
    return uri


def build_manifest(entries: list[PartEntry], model: ModelRef, dtype: str, catalog: str, unit_rows: int,
                   encoded: int | None = None, run: str | None = None) -> EmbeddingsManifest:
    reasons: Counter[str] = Counter()
    for e in entries:
        reasons.update(e.reject_reasons)
    counts = {"input_rows": sum(e.input_rows for e in entries),
              "encoded": sum(e.part.rows or 0 for e in entries) if encoded is None else encoded,
              "rejected": sum((e.rejects.rows or 0) if e.rejects else 0 for e in entries),
              "rejects_by_reason": dict(sorted(reasons.items()))}
    return EmbeddingsManifest(model=model, dtype=dtype, parts=tuple(entries), catalog=catalog, unit_rows=unit_rows,
                              counts=counts, created_at=now(), run=run)


# ---- part files -------------------------------------------------------------------------

def part_schema(model: ModelRef, dtype: str, unit: str, fingerprint: str, photos: bool = False,
                sources: bool = False) -> pa.Schema:
    # An image-only model has no text tower, so its parts have no text_emb column (an
    # all-null fixed_size_list column does not survive a Parquet round trip in pyarrow).
    # A multi-photo catalog's parts have a row per photo, its position in ``photo``; a
    # single-image catalog's parts are exactly what they were before photos existed.
    vec = pa.list_(PA_DTYPES[dtype], model.d)
    fields = ([("product_id", pa.string())] + ([("photo", pa.int32())] if photos else []) + [("image_emb", vec)]
              + ([("text_emb", vec)] if model.has_text else []))
    extra = [("photo_sha256", pa.string())] if photos else []  # the photo's bytes alone: reusable across titles
    if sources:  # a by-URI catalog: the fingerprint the image was read at, and the state the diff compares
        extra += [("image_fingerprint", pa.string()), ("source_state", pa.string())]
    meta = {"model_sha256": model.sha256, "variant": model.variant, "d": model.d, "dtype": dtype, "unit": unit,
            "fingerprint": fingerprint, "page_checksums": "crc32"}   # write_part writes them
    return pa.schema(fields + [("content_hash", pa.string())] + extra,
                     metadata={f"mimdex.{k}": str(v) for k, v in meta.items()})


def _vectors(emb: np.ndarray, d: int, dtype: str) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(emb, dtype=dtype).reshape(-1), PA_DTYPES[dtype])
    return pa.FixedSizeListArray.from_arrays(flat, d)


def part_table(model: ModelRef, dtype: str, unit: str, fingerprint: str, product_ids: list[str],
               content_hashes: list[str], image_emb: np.ndarray, text_emb: np.ndarray | None,
               photos: list[int] | None = None, photo_sha256: list[str] | None = None,
               sources: tuple[list[str], list[str]] | None = None) -> pa.Table:
    n = len(product_ids)
    if image_emb.shape != (n, model.d) or (model.has_text and (text_emb is None or text_emb.shape != (n, model.d))):
        raise ValueError(f"{unit}: embeddings of shape {image_emb.shape} for {n} products of d={model.d}")
    cols = [pa.array(product_ids, pa.string())] + ([pa.array(photos, pa.int32())] if photos is not None else [])
    cols.append(_vectors(image_emb, model.d, dtype))
    if model.has_text:
        cols.append(_vectors(text_emb, model.d, dtype))
    cols.append(pa.array(content_hashes, pa.string()))
    if photos is not None:
        cols.append(pa.array(photo_sha256, pa.string()))
    if sources is not None:
        cols += [pa.array(list(col), pa.string()) for col in sources]
    return pa.table(cols, schema=part_schema(model, dtype, unit, fingerprint, photos is not None, sources is not None))


def has_photos(table_or_schema) -> bool:
    """A multi-photo part (a row per photo) rather than a row per product."""
    return "photo" in table_or_schema.schema.names if isinstance(table_or_schema, pa.Table) \
        else "photo" in table_or_schema.names


def write_part(root: str, name: str, table: pa.Table, rejects: list[dict]) -> tuple[FileRef, FileRef | None, dict]:
    """A unit's part and its rejects, each written whole: (part, rejects, reasons)."""
    part = write_parquet(root, f"{name}.parquet", table, page_checksums=True)
    stale = storage.join(root, "rejects", f"{name}.parquet")
    if not rejects:
        if storage.exists(stale):
            storage.delete(stale)  # an earlier run of this unit had rejects; this one has none
        return part, None, {}
    schema = PHOTO_REJECT_SCHEMA if has_photos(table) else REJECT_SCHEMA
    rej = write_parquet(root, f"rejects/{name}.parquet", pa.Table.from_pylist(rejects, schema))
    return part, rej, dict(Counter(r["reason"] for r in rejects))


def check_part_schema(uri: str, schema: pa.Schema, model: ModelRef, dtype: str) -> None:
    """Refuse a part whose d, dtype or model differ from its manifest's (exit 65, named)."""
    want = {"d": str(model.d), "dtype": dtype, "model_sha256": model.sha256}
    meta = schema.metadata or {}
    diffs = [f"{k} {meta.get(f'mimdex.{k}'.encode(), b'?').decode()} != {v}" for k, v in want.items()
             if meta.get(f"mimdex.{k}".encode()) != v.encode()]
    if "image_emb" not in schema.names or "product_id" not in schema.names:
        diffs.append("no product_id/image_emb column")
    if diffs:
        raise DataError(f"embeddings part {uri} does not match its manifest: {', '.join(diffs)}")


def live_rows(root: str, table: pa.Table, entry: PartEntry) -> pa.Table:
    """A part's (or its rejects') rows minus the product_ids later runs superseded."""
    if not entry.exclude and entry.deleted is None:
        return table
    gone = pa.concat_arrays([part_deletions.read(root, entry.deleted), pa.array(entry.exclude, pa.string())])
    return table.filter(pc.invert(pc.fill_null(pc.is_in(table["product_id"], gone), False)))


def read_part(root: str, entry: PartEntry, model: ModelRef, dtype: str,
              columns: list[str] | None = None) -> pa.Table:
    """A part's live rows, verified against the manifest's sha256 and model (exit 65, named)."""
    table = read_table_checked(root, entry.part, "embeddings part", RECORDED_IN)
    check_part_schema(storage.join(root, entry.part.file), table.schema, model, dtype)
    return live_rows(root, table.select(columns) if columns else table, entry)


def read_part_columns(root: str, entry: PartEntry, model: ModelRef, dtype: str, columns,
                      verified: bool = False) -> tuple[pa.Table, int]:
    """Some columns of a part's live rows, reading only their column chunks (the diff reads
    states, a refresh's delta the vectors it indexes, not the other tower's), and the
    stored bytes of those chunks. The whole-file sha256 cannot be checked without reading
    it all: the size, the schema and each page's CRC32 are (exit 65, named; parts written
    since page_checksums hold one per page). ``verified``: a part without page CRCs is
    read whole against its sha256 instead. ``columns``: names -> the columns wanted."""
    uri = storage.join(root, entry.part.file)
    table = None
    with storage.open_read(uri) as f:
        try:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            check_part_schema(uri, pf.schema_arrow, model, dtype)
            if entry.part.bytes and f.size != entry.part.bytes:
                raise DataError(f"embeddings part {uri}: {f.size} bytes, {RECORDED_IN} says {entry.part.bytes}; "
                                "refusing a replaced or truncated file")
            if not verified or PAGE_CHECKSUMS in (pf.schema_arrow.metadata or {}):
                names = columns(pf.schema_arrow.names)
                table = pf.read(columns=names)
                stored = column_bytes(pf.metadata, range(pf.metadata.num_row_groups), names)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"embeddings part {uri}: not a readable Parquet file, or a page fails its "
                            f"checksum: {exc}") from exc
    if table is None:
        whole = read_part(root, entry, model, dtype)
        return whole.select(columns(whole.schema.names)), entry.part.bytes
    return live_rows(root, table, entry), stored


def read_rejects(root: str, entry: PartEntry) -> pa.Table:
    """A unit's live reject rows as PHOTO_REJECT_SCHEMA (photo null for a product's row)."""
    if entry.rejects is None:
        return PHOTO_REJECT_SCHEMA.empty_table()
    table = read_table_checked(root, entry.rejects, "embeddings rejects", RECORDED_IN)
    for name in ("content_hash", "photo"):  # written before rejects remembered state / photos existed
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, PHOTO_REJECT_SCHEMA.field(name).type))
    return live_rows(root, table.select(PHOTO_REJECT_SCHEMA.names).cast(PHOTO_REJECT_SCHEMA), entry)


def read_all(root: str, manifest: EmbeddingsManifest, which: str = "part") -> pa.Table:
    """Every live part row (or reject row) a manifest lists, in part order."""
    if which == "part":
        tables = [read_part(root, e, manifest.model, manifest.dtype) for e in manifest.parts]
        return (pa.concat_tables(tables, promote_options="permissive") if tables
                else pa.table({"product_id": pa.array([], pa.string())}))
    tables = [read_rejects(root, e) for e in manifest.parts]
    return pa.concat_tables(tables) if tables else PHOTO_REJECT_SCHEMA.empty_table()


def count_products(root: str, manifest: EmbeddingsManifest) -> int:
    """Distinct live products of a multi-photo root (a product's photos share one part):
    only the product_id column is read."""
    total = 0
    for entry in manifest.parts:
        ids = read_table_checked(root, entry.part, "embeddings part", RECORDED_IN, columns=["product_id"])
        total += pc.count_distinct(live_rows(root, ids, entry)["product_id"]).as_py()
    return total


PREVIOUS_SCHEMA = pa.schema([("product_id", pa.string()), ("state", pa.string()), ("encoded", pa.bool_()),
                             ("part", pa.string()), ("vectors", pa.int32())])


def previous_states(root: str, manifest: EmbeddingsManifest, entry: PartEntry) -> tuple[pa.Table, int]:
    """What one part says about each of its products (PREVIOUS_SCHEMA): the state it was
    encoded or rejected in (``source_state`` where the part has it, the fingerprint state
    of a by-URI catalog; else the content hash), whether it is indexed, the part, and its
    rows in the part (a multi-photo product's encoded photos).
    A product's rows all live in one part, so a part answers for its products alone.
    Also the stored bytes read (the state columns and the rejects file)."""
    rej = read_rejects(root, entry)
    rej = rej.filter(pc.invert(pc.is_in(rej["reason"], pa.array(ROW_ONLY_REASONS, pa.string()))))
    part, stored = read_part_columns(root, entry, manifest.model, manifest.dtype,
                             lambda names: ["product_id", "source_state" if "source_state" in names else "content_hash"]
                             + (["photo"] if "photo" in names else []))
    column, multi = part.column_names[1], "photo" in part.column_names
    photos: dict[str, list[tuple[int, str]]] = {}
    state: dict[str, str] = {}
    for pid, h, photo in zip(rej.column("product_id").to_pylist(), rej.column("content_hash").to_pylist(),
                             rej.column("photo").to_pylist()):
        if not pid:
            continue
        if photo is None:
            state[pid] = h or ""
        else:
            photos.setdefault(pid, []).append((photo, h or ""))
    pids = part.column("product_id").to_pylist()
    if multi:
        for pid, h, photo in zip(pids, part.column(column).to_pylist(), part.column("photo").to_pylist()):
            photos.setdefault(pid, []).append((photo, h))
        # a multi-photo product's state covers every photo, encoded or rejected (contracts.photos)
        state.update((pid, product_state([h for _, h in sorted(ps)])) for pid, ps in photos.items())
    else:
        state.update(zip(pids, part.column(column).to_pylist()))
    encoded = Counter(pids)
    keys = sorted(state)
    table = pa.table([pa.array(keys, pa.string()), pa.array([state[k] for k in keys], pa.string()),
                      pa.array([k in encoded for k in keys], pa.bool_()),
                      pa.array([entry.name] * len(keys), pa.string()),
                      pa.array([encoded.get(k, 0) for k in keys], pa.int32())], schema=PREVIOUS_SCHEMA)
    return table, stored + (entry.rejects.bytes if entry.rejects else 0)


def write_vectors(root: str, vectors: np.ndarray, product_ids: list[str], model: ModelRef, dtype: str = "float16",
                  parts: int = 1, text_vectors: np.ndarray | None = None,
                  metadata: pa.Table | None = None) -> EmbeddingsManifest:
    """An embeddings root from vectors computed elsewhere (an import, a benchmark, a test):
    the parts and manifest encode writes, content_hash "-" (no catalog behind them).
    ``metadata``: catalog columns of the same rows (product_id first), written beside the
    parts (``_metadata/catalog.parquet``, a row group per part) for their id maps."""
    cuts = np.array_split(np.arange(len(product_ids)), max(1, parts))
    blocks = ((vectors[sl], [product_ids[j] for j in sl], None if text_vectors is None else text_vectors[sl])
              for sl in cuts)
    source = None if metadata is None else storage.join(root, "_metadata/catalog.parquet")
    if metadata is not None:
        if metadata.column("product_id").to_pylist() != list(product_ids):
            raise ValueError("metadata rows must be the vectors' products, in order")
        with storage.open_write(source) as f, pq.ParquetWriter(f, metadata.schema) as writer:
            for sl in cuts:
                writer.write_table(metadata.slice(int(sl[0]) if len(sl) else 0, len(sl)), row_group_size=max(1, len(sl)))
    return write_vector_parts(root, blocks, model, dtype, source)


def write_vector_parts(root: str, blocks, model: ModelRef, dtype: str = "float16",
                       source: str | None = None) -> EmbeddingsManifest:
    """write_vectors for vectors made block by block: (vectors, product_ids, text vectors
    or None) per part, so a 10M-vector benchmark never holds them all. ``source``: a
    Parquet file with a row group of catalog columns per part (id maps carry them)."""
    entries = []
    for i, (vectors, pids, text_vectors) in enumerate(blocks):
        name = f"part-{i:05d}"
        text = (vectors if text_vectors is None else text_vectors) if model.has_text else None
        table = part_table(model, dtype, name, "-", list(pids), ["-"] * len(pids), vectors, text)
        part, _, _ = write_part(root, name, table, [])
        entries.append(PartEntry(name=name, part=part, unit=i, input_rows=len(pids), source=source,
                                 row_groups=(i,) if source else ()))
    manifest = build_manifest(entries, model, dtype, "-", 0)
    write_manifest(root, manifest)
    return manifest
