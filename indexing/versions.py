"""Index versions: list them, point LATEST back at an older one, and prune old ones.

Retention never deletes what a reader may be using: the version LATEST names, the one
it named before (a reader that opened just before the switch is still on it), and any
version younger than the grace period (a build that has not published yet, a reader
that opened a named version). A version is deleted manifest first, so that a reader
that races the deletion finds an incomplete version and says so, not half a version.
"""
from __future__ import annotations

import datetime as dt
import json

from mimdex.indexing.evaluate import held_out_at
from mimdex.indexing import publish
from mimdex.infra import storage
from mimdex.infra.errors import UsageError


def _created(version: str) -> dt.datetime | None:
    for fmt in ("%Y%m%dT%H%M%S%fZ", "%Y%m%dT%H%M%SZ"):
        try:
            return dt.datetime.strptime(version.split("-")[0], fmt).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
    return None


def latest_pointer(root: str) -> tuple[dict | None, str | None]:
    data, token = storage.read_versioned(publish.latest_uri(root))
    return (json.loads(data) if data else None), token


def describe(root: str) -> list[dict]:
    """Every version under the root, oldest first, with what a person needs to choose one."""
    pointer, _ = latest_pointer(root)
    current = (pointer or {}).get("version")
    rows = []
    for version in publish.list_versions(root):
        row = {"version": version, "latest": version == current, "complete": False,
               "created": (_created(version) or dt.datetime.min).isoformat()}
        try:
            m = publish.read_manifest(root, version)
        except storage.ObjectNotFound:
            rows.append(row)
            continue
        at = held_out_at(m.get("evaluation", {}), m.get("default_nprobe"))
        row.update(complete=True, vectors=sum(s["ntotal"] for s in m["shards"]), shards=len(m["shards"]),
                   model=m["model"]["sha256"][:12], variant=m["model"].get("variant"), vector=m.get("vector"),
                   factory=m.get("factory"), nprobe=m.get("default_nprobe"), recall_at_10=at.get("recall@10"),
                   parent=m.get("parent"))
        rows.append(row)
    return rows


def rollback(root: str, to: str) -> dict:
    """Point LATEST at an older complete version (conditional write: exit 75 if LATEST
    moved while we looked)."""
    if to not in publish.list_versions(root):
        raise UsageError(f"--to {to}: no such version under {root} (see `mimdex versions --index {root}`)")
    try:
        publish.read_manifest(root, to)
    except storage.ObjectNotFound as exc:
        raise UsageError(f"--to {to}: that version is incomplete (no manifest.json); it cannot be served") from exc
    pointer, token = latest_pointer(root)
    previous = (pointer or {}).get("version")
    publish.point_latest(root, to, token, previous)
    return {"index_root": root, "from": previous, "to": to}


def prune(root: str, keep: int, grace_hours: float = 24.0, now: dt.datetime | None = None) -> dict:
    """Delete versions beyond the newest ``keep`` complete ones, except what readers may use."""
    if keep < 1:
        raise UsageError("--keep must be at least 1")
    now = now or dt.datetime.now(dt.timezone.utc)
    pointer, _ = latest_pointer(root)
    protected = {v for v in ((pointer or {}).get("version"), (pointer or {}).get("previous")) if v}
    rows = describe(root)
    complete = [r["version"] for r in rows if r["complete"]]
    protected |= set(complete[-keep:])
    deleted, kept = [], []
    for r in rows:
        created = _created(r["version"])
        young = created is None or (now - created).total_seconds() < grace_hours * 3600
        if r["version"] in protected or young:
            kept.append(r["version"])
            continue
        vdir = publish.version_uri(root, r["version"])
        manifest = storage.join(vdir, "manifest.json")
        if storage.exists(manifest):
            storage.delete(manifest)
        storage.delete(vdir, recursive=True)
        deleted.append(r["version"])
    return {"index_root": root, "keep": keep, "grace_hours": grace_hours, "deleted": deleted, "kept": kept,
            "protected": sorted(protected)}
