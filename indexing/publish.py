"""Published index layout and the LATEST pointer (DESIGN.md, "Published index").

    <root>/versions/<version>/...           shards, id maps, trained.index, report
    <root>/versions/<version>/manifest.json written last: the version is complete
    <root>/LATEST                           {"version": ...}, replaced with a conditional write

A publisher reads LATEST when it starts (its parent) and replaces it only if it still
names that parent: of two builds racing on one root, exactly one publishes; the other
gets exit 75 and its complete, unpublished version stays for inspection.
"""
from __future__ import annotations

import datetime as dt
import json
import uuid

from mimdex.infra import storage
from mimdex.infra.errors import DataError

INDEX_FORMAT = "mimdex-index/1"


def new_version() -> str:
    # microseconds: names sort in creation order even for builds a second apart
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


def version_uri(root: str, version: str) -> str:
    return storage.join(root, "versions", version)


def latest_uri(root: str) -> str:
    return storage.join(root, "LATEST")


def read_latest(root: str) -> tuple[str | None, str | None]:
    """(version LATEST names, its version token for a conditional replace)."""
    data, token = storage.read_versioned(latest_uri(root))
    if data is None:
        return None, None
    try:
        return json.loads(data)["version"], token
    except (ValueError, KeyError) as exc:
        raise DataError(f"{latest_uri(root)}: not a mimdex LATEST pointer: {exc}") from exc


def read_checked(uri: str, entry: dict) -> bytes:
    """A version's file, verified against the sha256 its manifest records."""
    return storage.read_verified(uri, entry["sha256"], "the index manifest")


def read_manifest(root: str, version: str) -> dict:
    return storage.read_manifest(storage.join(version_uri(root, version), "manifest.json"), INDEX_FORMAT,
                                 f"index {root}: version {version} has no manifest.json "
                                 "(incomplete or not an index version)")


def write_manifest(root: str, version: str, manifest: dict) -> None:
    storage.write_json(storage.join(version_uri(root, version), "manifest.json"),
                       {"format": INDEX_FORMAT, **manifest}, create_only=True)


def point_latest(root: str, version: str, expected_token: str | None, previous: str | None) -> None:
    """Replace LATEST with ``version`` if it is still what the caller read (exit 75 if not)."""
    read_manifest(root, version)  # never point at an incomplete version
    body = json.dumps({"version": version, "previous": previous,
                       "published_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
                      indent=2, sort_keys=True).encode() + b"\n"
    storage.replace_if(latest_uri(root), body, expected_token)


def list_versions(root: str) -> list[str]:
    base = storage.join(root, "versions")
    if not storage.exists(base):
        return []
    fs, path = storage.resolve(base)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
