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
    """Wall-clock seconds per named stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)

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
