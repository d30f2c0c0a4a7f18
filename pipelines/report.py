"""Stage timers and the JSON report every job writes next to its output."""
from __future__ import annotations

import contextlib
import datetime as dt
import platform
import sys
import time
from typing import Iterator

from mimdex.infra import storage


class StageTimer:
    """Wall-clock seconds per named stage, in the order the stages ran, and the bytes this
    process read and wrote in each (``io``: storage.IO; a stage nested in another counts
    in both)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.io: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start, io0 = time.perf_counter(), storage.IO.snapshot()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
            used = storage.io_since(io0)
            mine = self.io.setdefault(name, {"read_bytes": 0, "written_bytes": 0})
            for k in mine:
                mine[k] += used[k]

    @property
    def total(self) -> float:
        return round(sum(self.seconds.values()), 3)


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def write_report(out_uri: str, job: str, report: dict) -> str:
    """Write ``report`` to ``<out>/_reports/<job>-<utc>.json`` and return its URI."""
    body = {
        "job": job,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "host": platform.node(),
        **report,
    }
    uri = storage.join(out_uri, "_reports", f"{job}-{utc_stamp()}.json")
    storage.write_json(uri, body)
    return uri
