"""The catalog contract: its schema, which rows are rejected and why, and the content hash.

A catalog is Parquet (a file or a directory, any fsspec URI) with ``product_id: string``,
``title: string`` (or binary holding UTF-8) and one image column: ``image: binary``,
``image_uri: string``, or a product's photos as ``images: list<binary>`` or
``image_uris: list<string>`` (contracts.photos); other columns are product metadata
carried into the id maps. Encode and the refresh
diff both judge rows here, so a row encode rejects is judged the same way the next night.
"""
from __future__ import annotations

import contextlib
import hashlib
import posixpath
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.infra.contracts import attributes, duplicates
from mimdex.infra.contracts.files import column_bytes
from mimdex.infra.contracts.photos import LIST_COLUMNS
from mimdex.infra.errors import DataError
from mimdex.infra.redact import redact

# Every reason a catalog row can be rejected with, in the order they are checked
# (docs/contracts.md, "Reject reasons").
REASONS = ("product_id_empty", "duplicate_product_id", "title_empty", "image_missing", "title_not_utf8",
           "image_uri_unreachable", "image_empty", "image_too_large", "image_corrupt")

# Reasons that belong to a row, not to a product: the product (if any) is judged by its
# first good occurrence, so the diff does not remember these per product_id.
ROW_ONLY_REASONS = ("product_id_empty", "duplicate_product_id")

REJECT_SCHEMA = pa.schema([
    ("product_id", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("source", pa.string()), ("row", pa.int64()),
    # the row's state when it was rejected (row_state): an unchanged row stays rejected
    # the next night instead of counting as new
    ("content_hash", pa.string()),
])

# A multi-photo catalog's rejects also say which photo (its position; null for the product)
PHOTO_REJECT_SCHEMA = REJECT_SCHEMA.append(pa.field("photo", pa.int32()))

# Optional columns that say an image_uri's version without reading it (contracts.fingerprint),
# and their per-photo lists for ``image_uris`` (a value per photo, in the same positions)
FINGERPRINT_COLUMNS = ("image_sha256", "image_version")
PHOTO_FINGERPRINT_COLUMNS = ("image_sha256s", "image_versions")
FINGERPRINT_COLUMNS_OF = {"image_uri": FINGERPRINT_COLUMNS, "image_uris": PHOTO_FINGERPRINT_COLUMNS}

_STRING = (pa.types.is_string, pa.types.is_large_string)
_BINARY = (pa.types.is_binary, pa.types.is_large_binary)


def _is(t: pa.DataType, kinds) -> bool:
    return any(check(t) for check in kinds)


@dataclass(frozen=True)
class Problem:
    reason: str
    detail: str


@dataclass(frozen=True)
class Columns:
    image: str   # "image" (encoded bytes), "image_uri", or their lists "images", "image_uris"
    title: str   # "string" or "binary" (bytes that must be UTF-8)

    @property
    def photos(self) -> bool:
        """A list of photos per product (contracts.photos), not one image."""
        return self.image in LIST_COLUMNS

    @property
    def by_uri(self) -> bool:
        return self.image in ("image_uri", "image_uris")


def check_schema(uri: str, schema: pa.Schema) -> Columns:
    """The image and title columns of a catalog file, or exit 65 naming column and file."""
    names = set(schema.names)

    def need(col: str, kinds, expected: str) -> None:
        if col not in names:
            raise DataError(f"catalog {uri}: missing required column '{col}' ({expected})")
        if not _is(schema.field(col).type, kinds):
            raise DataError(f"catalog {uri}: column '{col}' has type {schema.field(col).type}; expected {expected}")

    need("product_id", _STRING, "string")
    title = "binary" if "title" in names and _is(schema.field("title").type, _BINARY) else "string"
    if title == "string":
        need("title", _STRING, "string")
    if "image" in names:
        need("image", _BINARY, "binary: encoded JPEG/PNG/WebP bytes")
        return Columns("image", title)
    if "image_uri" in names:
        need("image_uri", _STRING, "string: an fsspec URI, relative to the catalog root")
        for col in FINGERPRINT_COLUMNS:
            if col in names:
                need(col, _STRING, "string: the image's sha256 or version, a change fingerprint")
        return Columns("image_uri", title)
    def need_list(col: str, item, expected: str) -> None:
        t = schema.field(col).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not _is(t.value_type, item):
            raise DataError(f"catalog {uri}: column '{col}' has type {t}; expected {expected}")

    for col, item, expected in (("images", _BINARY, "list<binary>: encoded photos, the main one first"),
                                ("image_uris", _STRING, "list<string>: photo URIs, the main one first")):
        if col in names:
            need_list(col, item, expected)
            for fp in (PHOTO_FINGERPRINT_COLUMNS if col == "image_uris" else ()):
                if fp in names:
                    need_list(fp, _STRING, "list<string>: each photo's sha256 or version, in image_uris' order")
            return Columns(col, title)
    raise DataError(f"catalog {uri}: missing required column 'image' (binary), 'image_uri' (string), "
                    "'images' (list<binary>) or 'image_uris' (list<string>)")


def catalog_files(catalog: str) -> tuple[list[str], str]:
    """Sorted Parquet file URIs of the catalog, and the root relative image_uris resolve against."""
    try:
        dataset = storage.parquet_dataset(catalog)
    except pa.ArrowException as exc:
        raise DataError(f"catalog {catalog}: not a readable Parquet file or directory: {exc}") from exc
    fs, path = storage.resolve(catalog)
    files = sorted(dataset.files)
    if not files:
        raise DataError(f"catalog {catalog}: no Parquet files found")
    root = catalog if fs.isdir(path) else posixpath.dirname(str(catalog).rstrip("/"))
    return [fs.unstrip_protocol(f) for f in files], root


@contextlib.contextmanager
def open_file(uri: str) -> Iterator[pq.ParquetFile]:
    """A catalog file as a ParquetFile whose schema has been checked; any Arrow error
    while it is open becomes exit 65 naming the file."""
    with storage.open_read(uri) as f:
        try:
            pf = pq.ParquetFile(f)
            yield pf
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"catalog {uri}: not a readable Parquet file: {exc}") from exc


def read_columns(uri: str, row_groups: list[int] | None = None) -> tuple[pa.Table, Columns]:
    """product_id, title and the image column of a file (or of some of its row groups),
    and an image_uri catalog's fingerprint columns where it has them."""
    table, cols, _ = read_unit(uri, row_groups)
    return table, cols


def read_unit(uri: str, row_groups: list[int] | None = None,
              filter_columns: tuple[str, ...] = (), every_column: bool = False) -> tuple[pa.Table, Columns, int]:
    """read_columns (and the index's filter columns, exit 65 naming the file where one is
    missing or not a string, integer or bool; or ``every_column``), and the stored bytes of
    what was read (a job's report), from the footer the read used."""
    with open_file(uri) as pf:
        cols = check_schema(uri, pf.schema_arrow)
        attributes.check(f"catalog {uri}", pf.schema_arrow, filter_columns)
        names = ["product_id", "title", cols.image] + list(filter_columns)
        names += [c for c in FINGERPRINT_COLUMNS_OF.get(cols.image, ()) if c in pf.schema_arrow.names]
        names += [c for c in pf.schema_arrow.names if every_column and c not in names]
        groups = range(pf.metadata.num_row_groups) if row_groups is None else row_groups
        table = pf.read(columns=names) if row_groups is None else pf.read_row_groups(row_groups, columns=names)
        stored = column_bytes(pf.metadata, groups, names)
    return table, cols, stored


def resolve_uri(root: str, uri: str) -> str:
    """An image_uri as written in the catalog -> a URI to read (relative to the catalog root)."""
    return uri if "://" in uri or uri.startswith("/") else storage.join(root, uri)


def fetch_image(uri: str) -> bytes | Problem:
    """The bytes behind an image_uri, or the Problem that rejects its row. A transient
    storage failure raises instead: a retry may succeed, so it must not stick as a reject."""
    return unreachable_or(lambda: storage.read_bytes(uri), uri)


def unreachable_or(read, uri: str):
    """``read()`` (a GET, a HEAD) of the object at ``uri``, or the Problem that makes its
    row ``image_uri_unreachable``: the one mapping of storage errors to a reject, for the
    encode's reads and the diff's fingerprints alike. A transient failure raises."""
    try:
        return read()
    except storage.ObjectNotFound as exc:
        return Problem("image_uri_unreachable", redact(str(exc)))
    except storage.StorageFailure as exc:
        if isinstance(exc.__cause__, (PermissionError, IsADirectoryError)):
            return Problem("image_uri_unreachable", redact(str(exc)))
        raise
    except (ValueError, ImportError) as exc:  # unknown protocol, malformed URI
        return Problem("image_uri_unreachable", redact(f"{uri}: {exc}"))


def photo_bytes(value, by_uri: bool, root: str) -> bytes | Problem:
    """One photo of a list column: its bytes (fetched for a URI), or why it cannot be used."""
    if value is None:
        return Problem("image_missing", "the photo is null")
    return fetch_image(resolve_uri(root, value)) if by_uri else value


def photo_state(got: bytes | Problem, title: str, model_sha256: str) -> str:
    """What the refresh diff compares for one photo (contracts.photos.product_state)."""
    return rejected_state(got.reason) if isinstance(got, Problem) else content_hash(got, title, model_sha256)


def row_problem(product_id: str | None, title: bytes | None, image, duplicate_of: str | None = None) -> Problem | None:
    """Why a row cannot be encoded, judged before its image is read (None: it can be tried).

    ``title`` is the raw UTF-8 bytes, ``image`` the image bytes or URI, ``duplicate_of``
    where the product_id was first seen if this row repeats it. The order of the checks
    is part of the contract: a row is rejected for the first rule it breaks.
    """
    if not product_id:
        return Problem("product_id_empty", "product_id is null or empty")
    if duplicate_of is not None:
        return Problem("duplicate_product_id", f"first seen at {duplicate_of}")
    if title is None or not title.strip():
        return Problem("title_empty", "title is null or blank")
    if image is None:
        return Problem("image_missing", "the image column is null")
    if isinstance(image, list) and not image:
        return Problem("image_missing", "the list of photos is empty")
    try:
        if not title.decode("utf-8").strip():
            return Problem("title_empty", "title is blank")
    except UnicodeDecodeError as exc:
        return Problem("title_not_utf8", f"title bytes are not UTF-8: {exc}")
    return None


def content_hash(image: bytes, title: str, model_sha256: str) -> str:
    """sha256 of the length-prefixed image bytes, title (UTF-8) and model sha256: a row
    whose hash is unchanged would encode to the same vectors."""
    h = hashlib.sha256()
    for part in (image, title.encode("utf-8"), model_sha256.encode("ascii")):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def rejected_state(reason: str) -> str:
    """The state recorded for a row rejected before its image bytes were seen: it stays
    rejected until the row changes so that another (or no) rule applies."""
    return f"reject:{reason}"


def titles_as_bytes(table: pa.Table) -> list[bytes | None]:
    return table.column("title").cast(pa.large_binary()).to_pylist()


def duplicate_rows(uris: list[str], ids: list[pa.Array]) -> dict[tuple[int, int], str]:
    """(file index, row) -> where its product_id was first seen, for every repeat, of ids
    held in memory (contracts.duplicates finds them in a whole catalog in bounded memory)."""
    return duplicates.find(uris, lambda i: ids[i], sum(len(a) for a in ids))


def metadata_rows(source: str, row_groups: list[int], product_ids: list[str]) -> pa.Table | None:
    """The catalog columns behind ``product_ids`` (from their source file's row groups),
    minus image bytes, aligned with ``product_ids``; first occurrence wins, as in encode."""
    with open_file(source) as pf:
        cols = [c for c in pf.schema_arrow.names if c not in ("image", "images")]
        table = pf.read_row_groups(row_groups, columns=cols)
    first = duplicates.first_positions(table.column("product_id").to_pylist())
    idx = [first.get(p, -1) for p in product_ids]
    taken = table.take(pa.array([max(i, 0) for i in idx], pa.int64()))
    missing = pa.array([i < 0 for i in idx], pa.bool_())
    out = {c: pc.if_else(missing, pa.nulls(len(idx), taken.column(c).type), taken.column(c))
           for c in taken.column_names if c != "product_id"}
    if "image_uri" in out:  # a signed URL is a credential: the id map keeps the URL, not its signature
        out["image_uri"] = pa.array([redact(u) if u else u for u in out["image_uri"].to_pylist()], pa.string())
    if "image_uris" in out:
        out["image_uris"] = pa.array([[redact(u) if u else u for u in us] if us is not None else None
                                      for us in out["image_uris"].to_pylist()], pa.list_(pa.string()))
    return pa.table(out) if out else None


def write_subset(catalog: str, wanted: pa.Array, out: str) -> int:
    """The first catalog row of each wanted product_id, as one Parquet file at ``out``
    (relative image_uris made absolute so they resolve from there). Returns its rows."""
    return write_subsets(catalog, [(wanted, out)])[0]


def write_subsets(catalog: str, subsets: list[tuple[pa.Array, str]],
                  given: list[pa.Table | None] | None = None) -> list[int]:
    """write_subset for several (wanted product_ids, out) at once, in one pass over the
    catalog. The catalog is streamed a row group at a time: memory follows the wanted
    sets, not the catalog. ``given``: per subset, rows already at hand (the refresh diff's
    payload: each wanted product's first catalog row, as the catalog holds it), written
    first; the catalog is streamed only for wanted products they do not hold. Returns each
    file's rows."""
    files, root = catalog_files(catalog)
    targets = [(pa.array(w, pa.string()) if not isinstance(w, (pa.Array, pa.ChunkedArray)) else w, out)
               for w, out in subsets]
    seen: list[set[str]] = [set() for _ in targets]
    writers: list[pq.ParquetWriter | None] = [None] * len(targets)
    rows = [0] * len(targets)

    def write(k: int, t: pa.Table, uri: str) -> None:
        if writers[k] is None:
            writers[k] = pq.ParquetWriter(sinks[k], t.schema, compression="zstd")
        try:
            t = t.cast(writers[k].schema)
        except (pa.ArrowInvalid, ValueError) as exc:
            raise DataError(f"catalog {uri}: its columns differ from the catalog's first file's: {exc}") from exc
        writers[k].write_table(t, row_group_size=2048)
        rows[k] += t.num_rows

    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(storage.open_write(out)) for _, out in targets]
        for k, t in enumerate(given or []):
            if t is not None and t.num_rows:
                cols = check_schema(catalog, t.schema)
                write(k, _absolute_uris(t, cols, root), catalog)
                seen[k] |= set(t.column("product_id").to_pylist())
        streamed = [len(set(wanted.to_pylist()) - seen[k]) > 0 for k, (wanted, _) in enumerate(targets)]
        for uri in files if any(streamed) else ():
            with open_file(uri) as pf:
                cols = check_schema(uri, pf.schema_arrow)
                for rg in range(pf.metadata.num_row_groups):
                    table = pf.read_row_group(rg)
                    for k, (wanted, _) in enumerate(targets):
                        t = table.filter(pc.fill_null(pc.is_in(table["product_id"], wanted), False))
                        first = {p: i for p, i in duplicates.first_positions(
                                 t.column("product_id").to_pylist()).items() if p not in seen[k]}
                        if not first:
                            continue
                        seen[k] |= set(first)
                        write(k, _absolute_uris(t.take(pa.array(sorted(first.values()), pa.int64())), cols, root),
                              uri)
        for (wanted, _), writer in zip(targets, writers):
            if writer is None:
                raise DataError(f"catalog {catalog}: none of the {len(wanted)} product ids wanted from it "
                                "is in it any more")
            writer.close()
    return rows


def _absolute_uris(t: pa.Table, cols: Columns, root: str) -> pa.Table:
    if cols.image == "image_uri":
        uris = [resolve_uri(root, u) if u else u for u in t.column("image_uri").to_pylist()]
        return t.set_column(t.schema.get_field_index("image_uri"), "image_uri", pa.array(uris, pa.string()))
    if cols.image == "image_uris":
        lists = [[resolve_uri(root, u) if u else u for u in us] if us is not None else None
                 for us in t.column("image_uris").to_pylist()]
        return t.set_column(t.schema.get_field_index("image_uris"), "image_uris",
                            pa.array(lists, t.schema.field("image_uris").type))
    return t
