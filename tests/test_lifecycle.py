"""A dirty catalog through the whole lifecycle: encode -> build-index -> refresh (nothing
changed: 99) -> refresh after edits, deletions, additions and newly broken rows ->
backfill -> rollback -> refresh (the changes since that version again) -> refresh (99). Real Ray, Beam's DirectRunner, the local S3 server.

The checks read what the jobs wrote as a reader would (manifest JSON, Parquet parts and
rejects, the published id maps), not through mimdex's own readers: at every step each
product is encoded exactly once or rejected with the reason its row deserves.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dirty_catalog as dc
from conftest import random_bundle
from mimdex.infra import storage
from mimdex.pipelines import cli

ROW_ONLY = ("product_id_empty", "duplicate_product_id")


def _table(root: str, ref: dict) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(root, ref["file"]))))


def _live(root: str, which: str) -> list[dict]:
    """Live rows of the current embeddings' parts (or rejects), as docs/contracts.md says to
    read them: minus the ids in the part's deletion file (or, written before those, inline)."""
    manifest = json.loads(storage.read_bytes(storage.join(root, "manifest.json")))
    rows = []
    for entry in manifest["parts"]:
        if entry[which]:
            gone = set(entry.get("exclude", []))
            if entry.get("deleted"):
                gone |= {r["product_id"] for r in _table(root, entry["deleted"]).to_pylist()}
            rows += [r for r in _table(root, entry[which]).to_pylist() if r["product_id"] not in gone]
    return rows


def _published(index: str) -> tuple[str, list[str]]:
    """LATEST's products as docs/contracts.md says to read them: the base shards' id maps,
    then each delta segment's, a segment's deletion list removing the products of the base
    and of the segments before it."""
    version = json.loads(storage.read_bytes(index + "/LATEST"))["version"]
    vdir = f"{index}/versions/{version}"
    manifest = json.loads(storage.read_bytes(vdir + "/manifest.json"))
    segments = [manifest["shards"]] + [seg["shards"] for seg in manifest.get("deltas", [])]
    deleted = [set(_table(vdir, seg["deleted"]).column("product_id").to_pylist()) if seg["deleted"] else set()
               for seg in manifest.get("deltas", [])]
    ids = []
    for i, shards in enumerate(segments):
        gone = set().union(*deleted[i:])
        ids += [p for s in shards for p in _table(vdir, s["ids"]).column("product_id").to_pylist() if p not in gone]
    return version, sorted(ids)


class Catalog:
    """The catalog as the test edits it, and what encode must make of each product."""

    def __init__(self, root: str):
        self.root, self.rows, self.expect, self.seed = root, [], {}, 0

    def add(self, kind: str, pid: str | None = None) -> str:
        self.seed += 1
        pid = pid if pid is not None or kind in ("empty_id", "null_id") else f"P{self.seed:04d}"
        row, objects, reason = dc.row(kind, pid, self.seed)
        for name, data in objects.items():
            storage.write_bytes(storage.join(self.root, name), data)
        self.rows.append(row)
        if kind not in dc.ROW_ONLY:
            self.expect[pid] = reason
        return pid

    def find(self, pid: str) -> dict:
        return next(r for r in self.rows if r["product_id"] == pid)

    def save(self) -> None:
        dc.write(self.root, self.rows, {})

    @property
    def good(self) -> list[str]:
        return sorted(p for p, reason in self.expect.items() if reason is None)

    @property
    def bad(self) -> dict[str, str]:
        return {p: reason for p, reason in self.expect.items() if reason is not None}


def _check(cat: Catalog, emb: str) -> None:
    """Every product is encoded exactly once or rejected with its reason; never both."""
    encoded = sorted(r["product_id"] for r in _live(emb, "part"))
    assert encoded == cat.good
    rejected = [r for r in _live(emb, "rejects") if r["reason"] not in ROW_ONLY]
    assert sorted(r["product_id"] for r in rejected) == sorted(cat.bad)  # each once
    assert {r["product_id"]: r["reason"] for r in rejected} == cat.bad


@pytest.fixture
def world(s3_bucket, local_ray):
    cat = Catalog(s3_bucket + "/cat")
    for i in range(150):
        cat.add("plain")
    for kind in dc.AWKWARD + tuple(dc.BAD):
        cat.add(kind)
    cat.add("empty_id")
    cat.add("null_id")
    first = cat.good[0]
    cat.add("duplicate", first)  # a later row repeating a product_id: rejected, the first one kept
    cat.save()
    model = s3_bucket + "/model"
    random_bundle(model, ["product title"], "3-tower")
    return cat, model, s3_bucket + "/emb", s3_bucket + "/index"


def _mimdex(*argv: str) -> int:
    return cli.main([*argv, "--no-progress"] if argv[0] in ("encode", "refresh", "backfill") else list(argv))


def test_a_dirty_catalog_through_the_whole_lifecycle(world, capsys, tmp_path):
    cat, model, emb, index = world
    catalog = cat.root + "/catalog.parquet"  # images/ beside it, image_uris relative to it
    refresh = ("--catalog", catalog, "--model", model, "--embeddings", emb, "--index", index, "--unit-rows", "64")

    # encode: every row encoded or rejected with its reason, row-only rejects included
    assert _mimdex("encode", "--model", model, "--catalog", catalog, "--out", emb, "--unit-rows", "64") == 0
    _check(cat, emb)
    row_only = sorted((r["reason"], r["row"]) for r in _live(emb, "rejects") if r["reason"] in ROW_ONLY)
    n = len(cat.rows)
    assert row_only == [("duplicate_product_id", n - 1), ("product_id_empty", n - 3), ("product_id_empty", n - 2)]

    assert _mimdex("build-index", "--embeddings", emb, "--out", index, "--shards", "3", "--eval-queries", "50") == 0
    first_version, ids = _published(index)
    assert ids == cat.good
    first_good = cat.good

    # nothing changed: exit 99, nothing encoded, nothing published (rejected rows are not "new")
    capsys.readouterr()
    assert _mimdex("refresh", *refresh) == 99
    assert "nothing changed" in capsys.readouterr().err
    assert _published(index)[0] == first_version
    _check(cat, emb)

    # a night of edits
    plain = [p for p in cat.good if cat.find(p)["title"].startswith(b"product")]
    for pid in plain[:3]:                                   # retitled
        cat.find(pid)["title"] += b" (2027 edition)"
    deleted = plain[3:6]
    cat.rows = [r for r in cat.rows if r["product_id"] not in deleted]
    for pid in deleted:
        del cat.expect[pid]
    for kind in ("plain",) * 4 + ("no_image",):                    # new products, one of them bad
        cat.add(kind)
    corrupt, untitled = plain[6], plain[7]
    storage.write_bytes(storage.join(cat.root, cat.find(corrupt)["image_uri"]), b"\x89PNG broken now")
    cat.expect[corrupt] = "image_corrupt"
    cat.find(untitled)["title"] = b" "
    cat.expect[untitled] = "title_empty"
    fixed = next(p for p, r in cat.bad.items() if r == "title_empty" and p != untitled)
    cat.find(fixed)["title"] = b"a title at last"
    cat.expect[fixed] = None
    gone_bad = next(p for p, r in cat.bad.items() if r == "image_corrupt" and p != corrupt)
    cat.rows = [r for r in cat.rows if r["product_id"] != gone_bad]
    del cat.expect[gone_bad]
    cat.save()

    # the refresh runs in its own process, as the nightly job does
    done = subprocess.run([sys.executable, "-m", "mimdex.pipelines.cli", "refresh", *refresh, "--no-progress"],
                          capture_output=True, text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0, done.stderr
    report = json.loads(storage.read_bytes(done.stdout.strip().splitlines()[-1]))
    assert report["read"]["catalog_rows"] == len(cat.rows) and report["read"]["image_bytes"] == 0
    assert report["decision"].startswith("incremental")
    assert report["diff"] == {"new": 5, "changed": 5, "rejudged": 1, "deleted": 3, "retagged": 0,
                              "forgotten_rejects": 1, "unchanged": len(first_good) - 8, "still_rejected": len(dc.BAD) - 2,
                              "row_only_rejects": 3}
    assert report["encode"]["rows"] == 11  # exactly the new, changed and re-judged products
    assert sorted(r["product_id"] for r in report["removed_now_rejected"]) == sorted([corrupt, untitled])
    second_version, ids = _published(index)
    assert second_version != first_version and ids == cat.good
    assert not set(ids) & set(deleted + [corrupt, untitled])
    _check(cat, emb)

    # backfill: a product added to the catalog, and one re-encoded on request
    added = cat.add("palette")
    cat.save()
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(f"{added}\n{plain[10]}\n")
    assert _mimdex("backfill", *refresh, "--ids", str(ids_file)) == 0
    assert _published(index)[1] == cat.good
    _check(cat, emb)

    # a night with deletions only: nothing to encode, the products leave the index
    dropped = plain[11]
    cat.rows = [r for r in cat.rows if r["product_id"] != dropped]
    del cat.expect[dropped]
    cat.save()
    assert _mimdex("refresh", *refresh) == 0
    assert _published(index)[1] == cat.good and dropped not in cat.good
    _check(cat, emb)

    # rollback serves the first version again
    assert _mimdex("rollback", "--index", index, "--to", first_version) == 0
    assert _published(index) == (first_version, first_good)

    # the next refresh re-applies every change made since that version (it diffs against the
    # embeddings the version was built from), so the index converges to the catalog again
    assert _mimdex("refresh", *refresh) == 0
    assert _published(index)[1] == cat.good
    _check(cat, emb)
    # and then the catalog has not changed: nothing to do
    assert _mimdex("refresh", *refresh) == 99
