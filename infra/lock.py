"""A lease on a job: one nightly refresh per index root at a time.

The lock is one small object written create-only (a conditional PUT on S3), naming its
holder (host, pid, run) and when it was taken. A second job gets exit 75 naming the
holder. A holder that died cannot release it, so a lock is broken when its process is
provably gone (same host, pid no longer running) or when it is older than the TTL.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import uuid

import psutil

from mimdex.infra import storage
from mimdex.infra.errors import TransientError


class Locked(TransientError):
    """Another job holds the lock."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Lease:
    def __init__(self, uri: str, ttl_hours: float = 6.0, what: str = "job"):
        self.uri, self.ttl_hours, self.what = uri, ttl_hours, what
        self.token = uuid.uuid4().hex
        self.broken: dict | None = None

    def _stale(self, holder: dict) -> bool:
        age = (_now() - dt.datetime.fromisoformat(holder["acquired_at"])).total_seconds() / 3600
        if age > self.ttl_hours:
            return True
        return holder.get("host") == socket.gethostname() and not psutil.pid_exists(int(holder.get("pid", -1)))

    def acquire(self) -> "Lease":
        body = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "acquired_at": _now().isoformat(timespec="seconds")}
        for attempt in (1, 2):
            try:
                storage.write_json(self.uri, body, create_only=True)
                return self
            except storage.ObjectExists:
                try:
                    holder = storage.read_json(self.uri)
                except storage.ObjectNotFound:
                    continue  # released in between
                if attempt == 1 and self._stale(holder):
                    self.broken = holder
                    storage.delete(self.uri)
                    continue
                raise Locked(f"another {self.what} holds {self.uri}: host {holder.get('host')}, pid "
                             f"{holder.get('pid')}, since {holder.get('acquired_at')}; retry later") from None
        raise Locked(f"could not take {self.uri}")

    def release(self) -> None:
        try:
            if storage.read_json(self.uri).get("token") == self.token:
                storage.delete(self.uri)
        except storage.ObjectNotFound:
            pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
