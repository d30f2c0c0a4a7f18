"""versions, rollback and retention on the local S3 server (and a local directory)."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from conftest import random_bundle
from mimdex.indexing import versions
from mimdex.infra.contracts import index_version as publish
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.pipelines import cli
from mimdex.pipelines.build_index import BuildConfig
from mimdex.pipelines.build_index import run as _run
from mimdex.infra.contracts import embeddings as shards
from mimdex.infra.contracts.model import ModelRef


def run(*args) -> dict:
    return _run(*args).report


@pytest.fixture
def three_versions(store_root):
    rng = np.random.default_rng(0)
    model_uri = store_root + "/model"
    sha = random_bundle(model_uri, ["t"], "3-tower")
    model = ModelRef(model_uri, sha, "3-tower", 32, True)
    out, built = store_root + "/index", []
    for i in range(3):  # each version indexes a different catalog size
        x = rng.standard_normal((400 + 100 * i, 32)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb = f"{store_root}/emb{i}"
        shards.write_vectors(emb, x, [f"p{j}" for j in range(len(x))], model, "float16", 2)
        built.append(run(BuildConfig(embeddings=emb, out=out, shards=2, eval_queries=50))["version"])
    return out, built


def test_versions_lists_every_version_and_marks_latest(three_versions, capsys):
    out, built = three_versions
    storage.write_bytes(publish.version_uri(out, "20990101T000000000000Z-aaaaaa") + "/trained.index", b"x")  # unpublished
    rows = versions.describe(out)
    assert [r["version"] for r in rows] == built + ["20990101T000000000000Z-aaaaaa"]
    assert [r["latest"] for r in rows] == [False, False, True, False]
    assert [r.get("vectors") for r in rows[:3]] == [400, 500, 600] and rows[3]["complete"] is False
    assert cli.main(["versions", "--index", out]) == 0
    text = capsys.readouterr().out
    assert f"*  {built[2]}" in text and "incomplete" in text


def test_rollback_makes_the_reader_serve_the_older_version(three_versions, capsys):
    out, built = three_versions
    assert cli.main(["rollback", "--index", out, "--to", built[0]]) == 0
    assert IndexReader.open(out).version == built[0] and IndexReader.open(out).ntotal == 400
    pointer, _ = publish.read_latest(out)
    assert pointer.previous == built[2]
    assert cli.main(["rollback", "--index", out, "--to", "nope"]) == 2
    assert "no such version" in capsys.readouterr().err
    assert IndexReader.open(out).version == built[0]


def test_retention_keeps_newest_latest_and_what_latest_replaced(three_versions):
    out, built = three_versions
    more = run(BuildConfig(embeddings=out.rsplit("/", 1)[0] + "/emb0", out=out, shards=1, eval_queries=50))["version"]
    versions.rollback(out, built[1])  # LATEST -> built[1]; it replaced `more`
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    result = versions.prune(out, keep=1, grace_hours=24, now=later)
    # newest (`more`), LATEST (built[1]) and the one LATEST replaced (`more` again) stay
    assert sorted(result["deleted"]) == sorted([built[0], built[2]])
    assert publish.list_versions(out) == sorted([built[1], more])
    assert IndexReader.open(out).version == built[1]
    # within the grace period nothing is deleted, whatever --keep says
    assert versions.prune(out, keep=1, grace_hours=24)["deleted"] == []
    assert json.loads(storage.read_bytes(publish.latest_uri(out)))["version"] == built[1]


def test_a_rollback_and_retention_racing_never_leave_latest_on_a_deleted_version(three_versions, monkeypatch):
    """Retention takes no lease. Both interleavings of the race, made to happen: retention
    deletes the target right after rollback moved LATEST (rollback sees it, puts LATEST
    back, exit 75); a rollback moves LATEST to a version right after retention deleted its
    manifest (retention sees it and puts the manifest back: the version stays whole)."""
    from mimdex.infra.errors import TransientError

    out, built = three_versions
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    before, _ = publish.read_latest(out)
    real_replace = storage.replace_if

    def deleted_right_after(uri, data, expected):
        real_replace(uri, data, expected)
        if json.loads(data)["version"] == built[0]:
            storage.delete(storage.join(publish.version_uri(out, built[0]), "manifest.json"))

    monkeypatch.setattr(storage, "replace_if", deleted_right_after)
    with pytest.raises(TransientError, match=f"--to {built[0]}: retention deleted version {built[0]} while LATEST "
                                             f"was moved to it; LATEST names {built[2]} again"):
        versions.rollback(out, built[0])
    after, _ = publish.read_latest(out)
    assert (after.version, after.previous) == (before.version, before.previous)  # exactly as it was
    monkeypatch.undo()
    _, token = publish.read_latest(out)  # nothing protects built[1] now but what races below
    storage.replace_if(publish.latest_uri(out), json.dumps({"version": built[2], "previous": None}).encode(), token)

    real_delete = storage.delete

    def rolled_back_meanwhile(uri, **kw):
        real_delete(uri, **kw)
        if uri.endswith(f"{built[1]}/manifest.json"):  # a rollback to built[1] lands now
            _, token = publish.read_latest(out)
            storage.replace_if(publish.latest_uri(out), json.dumps(
                {"version": built[1], "previous": built[2], "writer": "x"}).encode(), token)

    monkeypatch.setattr(storage, "delete", rolled_back_meanwhile)
    result = versions.prune(out, keep=1, grace_hours=24, now=later)
    assert built[1] in result["kept"] and built[1] not in result["deleted"]
    assert IndexReader.open(out).version == built[1]  # whole: every file verified


def test_rollback_refuses_a_version_that_lost_a_file(three_versions, capsys):
    out, built = three_versions
    shard = publish.read_manifest(out, built[0]).shards[0].index.file
    storage.delete(storage.join(publish.version_uri(out, built[0]), shard))
    assert cli.main(["rollback", "--index", out, "--to", built[0]]) == 2
    assert f"--to {built[0]}: that version lost 1 file(s) (first: {built[0]}/{shard}); it cannot be served" in \
        capsys.readouterr().err
    assert publish.latest_version(out) == built[2]


def test_retention_racing_a_build_never_lets_it_publish_deleted_files(three_versions, monkeypatch):
    """A --grace-hours shorter than a build: retention finds the build's version incomplete.
    Both interleavings, made to happen: retention marks it before the build writes its
    manifest (the build refuses to complete it, exit 75, LATEST unchanged, the mark stays);
    the build completes it between retention's listing and its mark (retention keeps it whole)."""
    from mimdex.infra.errors import TransientError

    out, built = three_versions
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    emb = out.rsplit("/", 1)[0] + "/emb0"
    real_write = publish.write_manifest

    def pruned_first(root, manifest):
        versions.prune(root, keep=1, grace_hours=0, now=later)
        real_write(root, manifest)

    monkeypatch.setattr(publish, "write_manifest", pruned_first)
    with pytest.raises(TransientError, match=r"retention \(versions --prune\) deleted version \S+ while it was "
                                             "being built"):
        run(BuildConfig(embeddings=emb, out=out, shards=2, eval_queries=50))
    monkeypatch.undo()
    assert publish.latest_version(out) == built[2]
    lost = [v for v in publish.list_versions(out) if v not in built]
    assert len(lost) == 1 and not publish.is_complete(out, lost[0])
    assert storage.list_files(publish.version_uri(out, lost[0])) == [publish.version_uri(out, lost[0]) + "/_pruned"]
    # a second prune leaves the mark (the build might still be writing) and deletes nothing else
    assert lost[0] in versions.prune(out, keep=1, grace_hours=0, now=later)["deleted"]
    assert storage.list_files(publish.version_uri(out, lost[0])) == [publish.version_uri(out, lost[0]) + "/_pruned"]

    real_mark = publish.mark_pruned
    completed: list[str] = []

    def completed_meanwhile(root, version):
        if version == late and not completed:  # the build writes its manifest right now
            completed.append(version)
            storage.write_bytes(storage.join(publish.version_uri(root, version), "manifest.json"),
                                storage.read_bytes(storage.join(publish.version_uri(root, built[2]), "manifest.json")))
        return real_mark(root, version)

    late = publish.new_version()  # older than `later`: no grace protects it
    storage.write_bytes(publish.version_uri(out, late) + "/trained.index", b"x")
    monkeypatch.setattr(publish, "mark_pruned", completed_meanwhile)
    result = versions.prune(out, keep=1, grace_hours=0, now=later)
    assert late in result["kept"] and late not in result["deleted"] and completed == [late]
    assert publish.is_complete(out, late)
    assert sorted(storage.list_files(publish.version_uri(out, late))) == sorted(
        publish.version_uri(out, late) + f for f in ("/manifest.json", "/trained.index"))


def test_a_file_gone_from_a_jobs_parent_is_a_lost_race_only_once_latest_moved(three_versions, tmp_path):
    """index_version.started_from, which refresh and compact read their parent under: while
    LATEST names the parent, a missing file is damage (ObjectNotFound, exit 65); once
    LATEST moved on, retention removed it and the job lost its race (exit 75, naming both
    versions). A runner that returns a worker's error only as text (Flink, Dask) keeps it
    an ObjectNotFound (beam_runner), so that compaction's Beam stage is judged the same."""
    from mimdex.infra.errors import TransientError
    from mimdex.pipelines import beam_runner

    out, built = three_versions
    gone = publish.version_uri(out, built[2]) + "/trained.index.gone"
    with pytest.raises(storage.ObjectNotFound) as damaged, publish.started_from(out, built[2]):
        storage.read_bytes(gone)
    assert damaged.value.exit_code == 65
    versions.rollback(out, built[0])
    with pytest.raises(TransientError, match=f"{gone}: LATEST moved from {built[2]} to {built[0]} while this "
                                             "job ran") as lost, publish.started_from(out, built[2]):
        storage.read_bytes(gone)
    assert lost.value.exit_code == 75

    def remote_failure(pipeline):   # what a portable runner hands back: the worker's traceback as text
        raise RuntimeError(f"Pipeline failed:\nmimdex.infra.storage.ObjectNotFound: read: no such object or "
                           f"directory: {gone}")
    with pytest.raises(TransientError, match="LATEST moved"), publish.started_from(out, built[2]):
        beam_runner.run(remote_failure, [], str(tmp_path / "progress"), 1, 60.0, "unfinished")


def test_a_reader_of_latest_whose_files_retention_removed_mid_open_opens_the_new_latest(three_versions,
                                                                                         monkeypatch):
    """A server opening LATEST while an engineer's build publishes, a rollback follows and
    retention runs: the version it was reading loses its files (it is neither LATEST nor
    the one LATEST replaced). The reader opens the new LATEST instead of failing; a named
    version that lost its files stays an error (exit 65). The race is placed by wrapping
    the reader's first shard load; the build, rollback and retention are the real ones."""
    from mimdex.indexing import reader as reader_mod

    out, built = three_versions
    load, raced = reader_mod.ShardLoader.load, []

    def racing_load(self, entry):
        if not raced:
            raced.append(entry)   # first: the build below loads shards too
            run(BuildConfig(embeddings=out.rsplit("/", 1)[0] + "/emb1", out=out, shards=2, eval_queries=50))
            versions.rollback(out, built[0])
            versions.prune(out, keep=1, grace_hours=0)
            assert not publish.is_complete(out, built[2])
        return load(self, entry)

    monkeypatch.setattr(reader_mod.ShardLoader, "load", racing_load)
    reader = IndexReader.open(out)
    assert raced and reader.version == built[0] and reader.ntotal == 400
    with pytest.raises(storage.ObjectNotFound) as gone:
        IndexReader.open(out, version=built[2])
    assert gone.value.exit_code == 65
    # any other exit-75 failure (storage retries exhausted) is not a lost race: raised, not opened again
    from mimdex.infra.errors import TransientError
    calls = []

    def throttled(self, entry):
        calls.append(entry)
        raise TransientError("storage retries exhausted")
    monkeypatch.setattr(reader_mod.ShardLoader, "load", throttled)
    with pytest.raises(TransientError, match="^storage retries exhausted$"):
        IndexReader.open(out)
    assert len(calls) == 1
