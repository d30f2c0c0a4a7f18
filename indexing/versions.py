"""Index versions: list them, point LATEST back at an older one, and prune old ones.

Retention never deletes what a reader may be using: the version LATEST names, the one
it named before (a reader that opened just before the switch is still on it), and any
version younger than the grace period (a build that has not published yet, a reader
that opened a named version), nor a file that a kept version references (a refresh's
delta segment uses its parent's shards and codebooks): a deleted version whose files are
still used keeps exactly those, and loses its manifest. A version is deleted manifest first, so that a reader
that races the deletion finds an incomplete version and says so, not half a version.
With a grace period shorter than a build, retention can race the build itself: a version
found incomplete is marked before it is deleted and its build then refuses to complete
it (index_version.write_manifest), and a publisher that moved LATEST to a version whose
manifest retention just deleted moves it back (index_version.point_latest).
"""
from __future__ import annotations

import datetime as dt

from mimdex.indexing.evaluate import held_out_at
from mimdex.infra import storage
from mimdex.infra.contracts import index_delta
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.errors import TransientError, UsageError


def describe(root: str) -> list[dict]:
    """Every version under the root, oldest first, with what a person needs to choose one."""
    current = iv.latest_version(root)
    rows = []
    for version in iv.list_versions(root):
        row = {"version": version, "latest": version == current, "complete": False,
               "created": (iv.created(version) or dt.datetime.min).isoformat()}
        try:
            m = iv.read_manifest(root, version)
        except storage.ObjectNotFound:
            rows.append(row)
            continue
        at = held_out_at(m.evaluation, m.default_nprobe)
        row.update(complete=True, vectors=m.ntotal, shards=len(m.shards), model=m.model.sha256[:12],
                   variant=m.model.variant, vector=m.vector, factory=m.factory, nprobe=m.default_nprobe,
                   recall_at_10=at.get("recall@10"), parent=m.parent)
        rows.append(row)
    return rows


def rollback(root: str, to: str) -> dict:
    """Point LATEST at an older complete version (conditional write: exit 75 if LATEST
    moved while we looked)."""
    if to not in iv.list_versions(root):
        raise UsageError(f"--to {to}: no such version under {root} (see `mimdex versions --index {root}`)")
    try:
        manifest = iv.read_manifest(root, to)
    except storage.ObjectNotFound as exc:
        raise UsageError(f"--to {to}: that version is incomplete (no manifest.json); it cannot be served") from exc
    # an unpublished version may reference files retention removed since (its parent's,
    # when LATEST had moved on while it was built): never serve one
    lost = sorted(f"{home}/{name}" for home, name in index_delta.files_of(manifest)
                  if not storage.exists(storage.join(iv.version_uri(root, home), name)))
    if lost:
        raise UsageError(f"--to {to}: that version lost {len(lost)} file(s) (first: {lost[0]}); it cannot be served")
    pointer, token = iv.read_latest(root)
    previous = pointer.version if pointer else None
    try:
        iv.point_latest(root, to, token, previous)
    except TransientError as exc:
        raise TransientError(f"--to {to}: {exc}") from exc
    return {"index_root": root, "from": previous, "to": to}


def prune(root: str, keep: int, grace_hours: float = 24.0, now: dt.datetime | None = None) -> dict:
    """Delete versions beyond the newest ``keep`` complete ones, except what readers may use."""
    if keep < 1:
        raise UsageError("--keep must be at least 1")
    now = now or dt.datetime.now(dt.timezone.utc)
    pointer, _ = iv.read_latest(root)
    protected = {v for v in ((pointer.version, pointer.previous) if pointer else ()) if v}
    rows = describe(root)
    complete = [r["version"] for r in rows if r["complete"]]
    protected |= set(complete[-keep:])
    deleted, kept = [], []
    for r in rows:
        created = iv.created(r["version"])
        young = created is None or (now - created).total_seconds() < grace_hours * 3600
        (kept if r["version"] in protected or young else deleted).append(r["version"])
    # a kept version may use files of older ones (delta segments reference their parent's
    # shards and codebooks): those files stay, whatever happens to their own version
    used: set[tuple[str, str]] = set()
    for version in kept:
        if iv.is_complete(root, version):
            used |= index_delta.files_of(iv.read_manifest(root, version))
    still_used = {}
    for version in list(deleted):
        vdir = iv.version_uri(root, version)
        manifest = storage.join(vdir, "manifest.json")
        marked: set[str] = set()  # a version deleted before it was complete keeps its mark (iv.write_manifest)
        if storage.exists(manifest):
            body = storage.read_bytes(manifest)
            storage.delete(manifest)
            # a rollback may have pointed LATEST here since we read it (rollback() checks
            # the manifest after its write, we check LATEST after our delete): keep it whole
            now_at, _ = iv.read_latest(root)
            if now_at and version in (now_at.version, now_at.previous):
                storage.write_bytes(manifest, body, create_only=True)
                deleted.remove(version)
                kept.append(version)
                used |= index_delta.files_of(iv.read_manifest(root, version))
                continue
        elif not iv.mark_pruned(root, version):  # a build completed it since we listed it
            deleted.remove(version)
            kept.append(version)
            used |= index_delta.files_of(iv.read_manifest(root, version))
            continue
        else:
            marked = {iv.PRUNED}
        keep_files = {name for home, name in used if home == version}
        if not keep_files | marked:
            storage.delete(vdir, recursive=True)
            continue
        fs, path = storage.resolve(vdir)
        for entry in fs.find(path):
            name = entry[len(path):].lstrip("/")
            if name not in keep_files | marked:
                storage.delete(storage.join(vdir, name))
        if keep_files:
            still_used[version] = sorted(keep_files)
    return {"index_root": root, "keep": keep, "grace_hours": grace_hours, "deleted": deleted, "kept": kept,
            "protected": sorted(protected), "files_kept_for_newer_versions": still_used}
