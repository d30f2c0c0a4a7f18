"""What went through the storage layer in this process: bytes read and written, reads,
HEADs and LISTs (``storage`` counts into ``IO``). Job reports say what a run read and
wrote from these; tests trace the URIs read. Also the retries botocore and s3fs made.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator


class IOCounts:
    """Bytes and requests that went through this module in this process (thread-safe):
    job reports say what a run read and wrote from these. ``trace`` keeps the URI of
    every read while a ``trace_reads()`` block is open (tests assert on it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read_bytes = self.reads = self.heads = self.lists = self.written_bytes = self.writes = 0
        self.recognised_writes = 0
        self.trace: list[tuple[str, int]] | None = None
        self._local = threading.local()   # this thread's reads: a DoFn's own, under a threaded runner

    def _mine(self) -> dict:
        if not hasattr(self._local, "counts"):
            self._local.counts = {"read_bytes": 0, "heads": 0, "lists": 0}
        return self._local.counts

    def read(self, uri: str, nbytes: int) -> None:
        self._mine()["read_bytes"] += nbytes
        with self._lock:
            self.read_bytes += nbytes
            self.reads += 1
            if self.trace is not None:
                self.trace.append((uri, nbytes))

    def head(self) -> None:
        self._mine()["heads"] += 1
        with self._lock:
            self.heads += 1

    def listed(self) -> None:
        self._mine()["lists"] += 1
        with self._lock:
            self.lists += 1

    def thread_snapshot(self) -> dict:
        return dict(self._mine())

    def thread_since(self, before: dict) -> dict:
        """What this thread (and none other) read since ``before`` (``thread_snapshot()``);
        reads made by helper threads it started are not included."""
        return {k: v - before.get(k, 0) for k, v in self._mine().items()}

    def recognised(self) -> None:
        """A write whose answer was lost and whose retry found our own object standing."""
        with self._lock:
            self.recognised_writes += 1

    def wrote(self, nbytes: int) -> None:
        with self._lock:
            self.written_bytes += nbytes
            self.writes += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"read_bytes": self.read_bytes, "reads": self.reads, "heads": self.heads, "lists": self.lists,
                    "written_bytes": self.written_bytes, "writes": self.writes}


IO = IOCounts()


def io_since(before: dict) -> dict:
    """What this process read and wrote since ``before`` (an ``IO.snapshot()``)."""
    now = IO.snapshot()
    return {k: now[k] - before.get(k, 0) for k in now}


@contextlib.contextmanager
def trace_reads() -> Iterator[list[tuple[str, int]]]:
    """(uri, bytes) of every read in this process while the block runs."""
    IO.trace = []
    try:
        yield IO.trace
    finally:
        IO.trace = None


class CountingReader:
    """A read-only file that counts the bytes its reader actually took (a Parquet reader
    seeks to the footer and the column chunks it needs, so this is less than the size)."""

    def __init__(self, f, uri: str):
        self._f, self._uri = f, uri

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        IO.read(self._uri, len(data))
        return data

    def read_buffer(self, n: int = -1):  # what pyarrow's Parquet reader calls (no copy)
        data = self._f.read(n)
        IO.read(self._uri, len(data))
        return data

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        IO.read(self._uri, n or 0)
        return n

    def __getattr__(self, name: str):
        if name in ("__fspath__", "fileno"):  # else pyarrow reopens a local file by path, uncounted
            raise AttributeError(name)
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class _RetryCounter(logging.Handler):
    """Counts the retries botocore (adaptive mode) and s3fs's own loop make, from the debug
    records they log, so that job reports can say how many a job needed. Records of
    WARNING and above go on to the root logger as before; debug records stop here."""

    MARKERS = {"botocore.retries.standard": "Retry needed, retrying", "s3fs": "Retryable error"}

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        marker = self.MARKERS.get(record.name)
        if marker and isinstance(record.msg, str) and record.msg.startswith(marker):
            self.count += 1
        if record.levelno >= logging.WARNING:
            logging.getLogger().handle(record)


_RETRIES = _RetryCounter()
for _name in _RetryCounter.MARKERS:
    _logger = logging.getLogger(_name)
    _logger.setLevel(logging.DEBUG)
    _logger.propagate = False
    _logger.addHandler(_RETRIES)


def retry_count() -> int:
    """Storage retries this process has made so far (botocore and s3fs)."""
    return _RETRIES.count
