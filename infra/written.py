"""What a write sent, and whether the object that stands is it: the sha256 and size of a
spooled write (HashingWriter), and the check storage makes when a write's answer was lost.
"""
from __future__ import annotations

import hashlib
import io
from typing import IO as BinaryIO

import fsspec


class HashingWriter(io.RawIOBase):
    """A write-only binary file that keeps the sha256 and size of what passed through."""

    def __init__(self, raw: BinaryIO[bytes]):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.bytes_written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.bytes_written += len(view)
        return self._raw.write(view)

    def tell(self) -> int:
        return self.bytes_written

    def flush(self) -> None:
        self._raw.flush()

    def sha256(self) -> str:
        return self._hash.hexdigest()


def sha256_of(f: BinaryIO[bytes]) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def stands_as_sent(fs: fsspec.AbstractFileSystem, path: str, size: int, sha256: str) -> bool:
    """Whether the object at ``path`` is byte for byte what we sent. A write whose answer
    was lost (the store committed it, then the connection dropped) is retried by botocore,
    and the retry meets our own object: a 412 for a create-only PUT, NoSuchUpload for a
    completed multipart upload. S3's guidance for conditional writes is to check whether
    the object that now stands is yours. One HEAD, and a read only when the sizes agree."""
    try:
        if int(fs.info(path).get("size", -1)) != size:
            return False
        with fs.open(path, "rb") as f:
            return sha256_of(f) == sha256
    except FileNotFoundError:
        return False
