"""The one module through which mimdex reads and writes.

Every location is an fsspec URI (a plain path, ``file://``, ``s3://``...). Writes are
whole-object: the bytes are first spooled to a local temporary file and then committed
in one step (``os.replace``/``os.link`` on a local disk, a single PUT or completed
multipart upload on an object store), so a reader sees either the old object, the new
one, or nothing, never a prefix. Create-only writes use a conditional PUT
(``If-None-Match: *``) so that of two writers racing for a key exactly one wins.

S3 credentials and endpoint come from the standard AWS environment; transient S3 failures
are retried by botocore's own retry modes, configured below, not by loops of ours."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import posixpath
import tempfile
import uuid
from typing import IO as BinaryIO, Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from mimdex.infra.errors import DataError, TransientError, UsageError
from mimdex.infra import io_counts
from mimdex.infra.io_counts import IO, CountingReader
from mimdex.infra.written import HashingWriter, sha256_of, stands_as_sent

# storage's API for reports and tests (counted in io_counts)
io_since, trace_reads, retry_count = io_counts.io_since, io_counts.trace_reads, io_counts.retry_count
from mimdex.infra.redact import redact

# Per-protocol options handed to fsspec. A table, not branches: a new scheme needs an
# entry here at most.
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {
        # botocore's "adaptive" mode retries throttling and 5xx with backoff and
        # client-side rate limiting; s3fs's _call_s3 adds its own retries (class
        # attribute S3FileSystem.retries) for connection drops.
        "config_kwargs": {
            "retries": {"max_attempts": 8, "mode": "adaptive"},
            "connect_timeout": 10,
            "read_timeout": 120,
        },
        # Other processes write the same prefixes (Ray workers, Beam workers, a racing
        # publisher): a cached listing would hide their commits.
        "use_listings_cache": False,
    },
}


class ObjectNotFound(DataError):
    """A path that should exist does not; the message names the URI."""


class ObjectExists(TransientError):
    """A create-only write lost: another writer created the key first."""


class StorageFailure(TransientError):
    """A read or write failed after the configured retries."""


class AccessDenied(UsageError):
    """The store refused us (403: a missing grant, a wrong key): retrying as is cannot help."""


def _options(protocol: str) -> dict[str, Any]:
    # a copy: botocore writes total_max_attempts into the dict, outranking MIMDEX_S3_MAX_ATTEMPTS
    options, attempts = copy.deepcopy(STORAGE_OPTIONS.get(protocol, {})), os.environ.get("MIMDEX_S3_MAX_ATTEMPTS")
    if protocol != "s3" or not attempts:  # else: an operator's bound on the retry budget (a deadline)
        return options
    config = options["config_kwargs"]
    return {**options, "config_kwargs": {**config, "retries": {**config["retries"], "max_attempts": int(attempts)}}}


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for ``uri``."""
    protocol, _ = fsspec.core.split_protocol(str(uri))
    return fsspec.core.url_to_fs(str(uri), **_options(protocol or "file"))


def join(base: str, *parts: str) -> str:
    """Join path segments onto a URI with ``/`` whatever the platform. A ``..`` segment
    is resolved here (an index version's manifest names a file of an older version as
    ``../<version>/<file>``): object stores take keys literally."""
    base = str(base)
    out = posixpath.join(base.rstrip("/") if base not in ("/",) else base, *parts)
    if "/../" not in out and not out.endswith("/.."):
        return out
    protocol, path = fsspec.core.split_protocol(out)
    path = posixpath.normpath(path)
    return f"{protocol}://{path}" if protocol else path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    # Local disks need temp-file + rename to be atomic; object stores commit on PUT.
    return isinstance(fs, LocalFileSystem)


@contextlib.contextmanager
def _translate_errors(uri: str, op: str) -> Iterator[None]:
    """Turn filesystem exceptions into mimdex errors that name the URI."""
    try:
        yield
    except (ObjectNotFound, ObjectExists, StorageFailure, AccessDenied):
        raise
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"{op}: no such object or directory: {uri}") from exc
    except FileExistsError as exc:
        raise ObjectExists(
            f"{op}: {uri} already exists (another writer created it first)"
        ) from exc
    except PermissionError as exc:
        raise AccessDenied(f"{op}: permission denied for {uri} (check the credentials and the bucket "
                           f"policy): {exc}") from exc
    except OSError as exc:
        # s3fs turns a 412 from a conditional PUT into OSError(EINVAL) with the
        # botocore error as its cause
        if _looks_like_precondition_failure(exc.__cause__ or exc.__context__):
            raise ObjectExists(f"{op}: {uri} already exists or changed (a conditional write lost)") from exc
        raise StorageFailure(f"{op}: {uri}: {exc}") from exc
    except Exception as exc:  # botocore/aiohttp errors that s3fs did not wrap
        if _looks_like_precondition_failure(exc):
            raise ObjectExists(
                f"{op}: {uri} already exists (another writer created it first)"
            ) from exc
        if type(exc).__module__.split(".")[0] in {"botocore", "aiobotocore", "aiohttp"}:
            raise StorageFailure(f"{op}: {uri}: {exc}") from exc
        raise


def _looks_like_precondition_failure(exc: BaseException | None) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in {412, 409}


_UMASK = os.umask(0)
os.umask(_UMASK)


# Objects at least twice this size go up as a multipart upload in parts of this size
# (s3fs's rule; S3 needs parts of at least 5 MiB).
MULTIPART_PART_BYTES = 50 * 2 ** 20


def _commit(fs: fsspec.AbstractFileSystem, local_tmp: str, path: str, create_only: bool) -> None:
    if _is_local(fs):
        os.chmod(local_tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; others read our output
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        if create_only:
            os.link(local_tmp, path)  # atomic; raises FileExistsError if taken
        else:
            os.replace(local_tmp, path)
        return
    # mode="create" is a conditional PUT (If-None-Match: *): the store refuses it if
    # the key exists, so of two racing writers exactly one wins.
    try:
        fs.put_file(local_tmp, path, mode="create" if create_only else "overwrite", chunksize=MULTIPART_PART_BYTES)
    except Exception:  # another writer's different bytes stay a conflict (create-only: ObjectExists)
        with open(local_tmp, "rb") as sent:
            if not stands_as_sent(fs, path, os.path.getsize(local_tmp), sha256_of(sent)):
                raise
        IO.recognised()


@contextlib.contextmanager
def open_write(uri: str, *, create_only: bool = False) -> Iterator[HashingWriter]:
    """A binary file whose content appears at ``uri`` only if the block succeeds.

    On an exception nothing is written at ``uri`` and the spool file is removed. The
    yielded file reports ``sha256()`` and ``bytes_written`` for manifests.
    """
    fs, path = resolve(uri)
    spool_dir = posixpath.dirname(path) if _is_local(fs) else None
    if spool_dir:
        fs.makedirs(spool_dir, exist_ok=True)
    fd, local_tmp = tempfile.mkstemp(
        prefix=f".{posixpath.basename(path)}.", suffix=f".{uuid.uuid4().hex[:8]}.tmp", dir=spool_dir
    )
    try:
        with os.fdopen(fd, "wb") as raw:
            yield HashingWriter(raw)
        nbytes = os.path.getsize(local_tmp)
        with _translate_errors(uri, "write"):
            _commit(fs, local_tmp, path, create_only)
        IO.wrote(nbytes)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local_tmp)


def write_bytes(uri: str, data: bytes, *, create_only: bool = False) -> None:
    """Write ``data`` as the whole object at ``uri`` (atomically)."""
    with open_write(uri, create_only=create_only) as f:
        f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with _translate_errors(uri, "read"):
        data = fs.cat_file(path)
    IO.read(uri, len(data))
    return data


def not_as_recorded(uri: str, recorded_in: str) -> DataError:
    return DataError(f"{uri}: sha256 does not match {recorded_in}; refusing a corrupt or replaced file")


def read_verified(uri: str, sha256: str, recorded_in: str) -> bytes:
    """The object's bytes, refused (exit 65) unless they hash to what a manifest recorded."""
    data = read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise not_as_recorded(uri, recorded_in)
    return data


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[BinaryIO[bytes]]:
    fs, path = resolve(uri)
    with _translate_errors(uri, "read"):
        f = fs.open(path, "rb")
    with f:
        yield CountingReader(f, uri)


def write_json(uri: str, obj: Any, *, create_only: bool = False) -> None:
    """Write ``obj`` as stable, human-readable JSON (sorted keys) atomically, with any
    credential or URL signature in it redacted (infra.redact)."""
    text = redact(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False))
    write_bytes(uri, (text + "\n").encode("utf-8"), create_only=create_only)


def read_json(uri: str) -> Any:
    raw = read_bytes(uri)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"read: {uri} is not valid JSON: {exc}") from exc


class ConcurrentUpdate(TransientError):
    """A conditional replace lost: the object changed since it was read."""


def read_versioned(uri: str) -> tuple[bytes | None, str | None]:
    """The object's bytes and a version token for ``replace_if`` (None, None if absent).

    The token is the ETag on an object store and the content's sha256 on a local disk.
    """
    fs, path = resolve(uri)
    with _translate_errors(uri, "read"):
        try:
            # The ETag is taken before the body: if the object changes in between, the
            # token is older than the bytes and a replace_if fails (safe), never succeeds
            # over an update it did not see.
            etag = None if _is_local(fs) else fs.info(path)["ETag"]
            data = fs.cat_file(path)
        except FileNotFoundError:
            return None, None
        if _is_local(fs):
            return data, hashlib.sha256(data).hexdigest()
    return data, etag


def replace_if(uri: str, data: bytes, expected: str | None) -> None:
    """Write ``data`` at ``uri`` only if the object is still the version ``expected``
    (None: only if it does not exist). Raises ConcurrentUpdate (exit 75) otherwise.

    S3: a conditional PUT (If-Match / If-None-Match). Local: the same check under an
    exclusive lock on a sidecar lock file, then an atomic rename.
    """
    fs, path = resolve(uri)
    lost = ConcurrentUpdate(f"replace: {uri} changed since it was read (another publisher "
                            f"replaced it first); nothing was written")
    if _is_local(fs):
        import fcntl

        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with open(posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _, current = read_versioned(uri)
            if current != expected:
                raise lost
            write_bytes(uri, data)
        return
    bucket, key, _ = fs.split_path(path)
    condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
    try:
        with _translate_errors(uri, "replace"):
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except (ObjectExists, StorageFailure) as exc:
        # Our own update, answered late: the retry's 412 meets the bytes we sent, which
        # carry a token of their writer (LATEST names its publisher), so no other writer's
        # object can look like ours.
        if read_versioned(uri)[0] == data:
            IO.recognised()
            return
        if isinstance(exc, ObjectExists):
            raise lost from exc
        raise


def read_manifest(uri: str, fmt: str, missing: str) -> dict:
    """A JSON manifest of format ``fmt``; exit 65 with ``missing`` if absent, or if it
    is some other document."""
    if not exists(uri):
        raise ObjectNotFound(missing)
    manifest = read_json(uri)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{uri}: not a {fmt} manifest (format {found!r})")
    return manifest


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with _translate_errors(uri, "exists"):
        return fs.exists(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the files directly under the directory/prefix ``uri``.

    Spool files of in-progress writes (dot-prefixed) are never listed.
    """
    fs, path = resolve(uri)
    with _translate_errors(uri, "list"):
        entries = fs.ls(path, detail=True)
    out = []
    for entry in entries:
        name = posixpath.basename(entry["name"].rstrip("/"))
        if entry.get("type") != "file" or name.startswith(".") or not name.endswith(suffix):
            continue
        out.append(join(uri, name))
    return sorted(out)


def delete(uri: str, *, recursive: bool = False) -> None:
    """Delete the object (or, ``recursive``, the prefix). What is already gone counts as
    deleted: a retried DELETE whose first answer was lost, or two cleaners of one path."""
    fs, path = resolve(uri)
    with _translate_errors(uri, "delete"):
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass


def head(uri: str) -> dict:
    """An object's metadata (size, ETag or mtime, VersionId where versioned) without its
    bytes: one HEAD on an object store, a stat on a disk."""
    fs, path = resolve(uri)
    IO.head()
    with _translate_errors(uri, "head"):
        return fs.info(path)


def list_info(uri: str) -> dict[str, dict]:
    """name -> metadata (size, ETag or mtime) of every object directly under a
    directory/prefix, from its listing (one LIST per 1,000 keys on S3); {} if absent."""
    fs, path = resolve(uri)
    IO.listed()
    with _translate_errors(uri, "list"):
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
    return {posixpath.basename(e["name"].rstrip("/")): e for e in entries}


def size(uri: str) -> int:
    fs, path = resolve(uri)
    with _translate_errors(uri, "stat"):
        return int(fs.size(path))


def parquet_dataset(uri: str | list[str], **kwargs: Any):
    """A ``pyarrow.dataset`` over a Parquet file or directory at any fsspec URI, or over a
    list of file URIs.

    pyarrow's discovery skips names starting with '.' or '_' (our spool files, reports).
    """
    import pyarrow.dataset as ds

    if isinstance(uri, (list, tuple)):  # these files exactly (on one filesystem)
        fs = resolve(uri[0])[0]
        with _translate_errors(uri[0], "open dataset"):
            return ds.dataset([resolve(u)[1] for u in uri], filesystem=fs, format="parquet", **kwargs)
    fs, path = resolve(uri)
    with _translate_errors(uri, "open dataset"):
        if not fs.exists(path):
            raise FileNotFoundError(path)
        return ds.dataset(path, filesystem=fs, format="parquet", **kwargs)
