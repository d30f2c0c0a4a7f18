"""The Beam jobs on a real distributed runner: Beam's DaskRunner on a dask.distributed
cluster on 127.0.0.1 (tests/dask_cluster.py: separate scheduler and worker processes, each
worker with a private /tmp, so only object-store URIs reach them), against the local S3
server. Each job must publish what the DirectRunner publishes from the same input, byte for
byte, and a worker killed mid-build must cost nothing but time. The refresh, compaction and
kill tests are in the slow tier (`make test-slow`, run by .ci/run)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import random_bundle
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.infra.contracts import index_version as iv
from mimdex.pipelines import beam_runner, cli
from test_build_index import clustered, write_embeddings


def _shards(entries) -> list[tuple[str, int, str, str]]:
    return [(s.name, s.ntotal, s.index.sha256, s.ids.sha256) for s in entries]


def published(root: str) -> dict:
    """What a version publishes, without its names and times: each base shard's and delta
    segment's (name, vectors, index sha256, id map sha256), the trained index's sha256."""
    m = iv.read_manifest(root, iv.latest_version(root))
    return {"shards": _shards(m.shards), "trained": m.trained.sha256,
            "deltas": [(_shards(d.shards), d.deleted.sha256 if d.deleted else None, d.added, d.removed_products)
                       for d in m.deltas]}


def idmap_rows(root: str) -> list[tuple]:
    table = IndexReader.open(root).idmap
    return sorted(zip(*(table.column(c).to_pylist() for c in ("id", "product_id"))))


def same_search(a: str, b: str, x: np.ndarray) -> None:
    ra, rb = IndexReader.open(a), IndexReader.open(b)
    sa, ia = ra.search(x, 10, ra.default_nprobe)
    sb, ib = rb.search(x, 10, rb.default_nprobe)
    assert np.array_equal(ia, ib) and np.array_equal(sa, sb)


def no_scratch_left(root: str) -> None:
    """No partial stays in any version: a remote runner's go beside the version, and are
    deleted once merged."""
    fs, path = storage.resolve(root)
    assert [p for p in fs.find(path) if "/_partials/" in p] == []


@pytest.fixture(scope="module")
def vectors(s3_server):
    return seeded_vectors(s3_server, "mimdex-dask-build")


def seeded_vectors(s3_server, bucket_name: str) -> tuple[str, np.ndarray]:
    """1,200 clustered vectors (one NaN row, skipped on every runner) in 8 parts."""
    from mimdex.infra.local_s3 import create_bucket

    bucket = create_bucket(s3_server, bucket_name)
    x = clustered(1200, seed=5)
    x[7] = np.nan   # a skipped row on every runner
    pids = [f"prod-{i:05d}" for i in range(len(x))]
    sha = random_bundle(bucket + "/model", ["a title"], "3-tower")
    write_embeddings(bucket + "/emb", x, pids, bucket + "/model", sha, parts=8)
    return bucket, x


def test_the_dask_short_name_its_flags_and_defaults_resolve_to_beams_class():
    args = beam_runner.resolve(["--runner", "DaskRunner", "--dask_client_address=tcp://127.0.0.1:1"])
    assert args == ["--dask_partition_size=1", "--runner=apache_beam.runners.dask.dask_runner.DaskRunner",
                    "--dask_client_address=tcp://127.0.0.1:1"]
    # the operator's own partitioning wins; resolving twice changes nothing
    args = beam_runner.resolve(["--runner=daskrunner", "--dask_scheduler_file=s.json", "--dask_npartitions=4"])
    assert args[0] == "--runner=apache_beam.runners.dask.dask_runner.DaskRunner" and beam_runner.resolve(args) == args
    assert not beam_runner.runs_here(args) and beam_runner.local_processes(args) == 0


def test_dask_flags_from_a_file_and_the_command_line_and_their_errors(vectors, tmp_path, capsys):
    bucket, _ = vectors
    opts = tmp_path / "dask.options"
    opts.write_text("# the cluster\n--runner=DaskRunner\n--dask_connection_timeout=2\n")
    base = ["build-index", "--embeddings", bucket + "/emb", "--out", bucket + "/unreachable"]
    # the address on the command line, the runner in the file: accepted, and a cluster that
    # does not answer is transient (75), named, with nothing published
    code = cli.main([*base, "--beam-options-file", str(opts), "--dask_client_address=tcp://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 75 and "could not be submitted" in err and "tcp://127.0.0.1:9" in err
    assert not storage.exists(bucket + "/unreachable/LATEST")
    # no cluster named: a usage error before any work
    code = cli.main([*base[:-1], bucket + "/no-cluster", "--beam-options-file", str(opts)])
    err = capsys.readouterr().err
    assert code == 2 and "--runner=DaskRunner needs --dask_client_address or --dask_scheduler_file" in err
    assert not storage.exists(bucket + "/no-cluster")
    with pytest.raises(SystemExit) as exited:  # argparse's exit, as for any misspelt flag
        cli.main([*base, "--runner=DaskRunner", "--dask_client_adress=tcp://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "unrecognized arguments: --dask_client_adress=tcp://127.0.0.1:9" in err


def test_without_the_dask_extra_a_dask_flag_is_one_line_naming_it_exit_2(tmp_path):
    # the extra's module made unimportable in a fresh interpreter, as on an install without it
    code = ("import sys; sys.modules['distributed'] = None\n"
            "from mimdex.pipelines.cli import main\n"
            "sys.exit(main(['build-index', '--embeddings', 'e', '--out', 'o', '--runner=DaskRunner',\n"
            "               '--dask_client_address=tcp://127.0.0.1:9']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines == ["mimdex: error: build-index: --runner=DaskRunner: the 'dask' extra is not installed "
                     "(import of distributed halted; None in sys.modules): pip install 'mimdex[dask]'"]


def test_build_index_on_dask_publishes_the_directrunners_bytes(vectors, dask_two):
    bucket = build_like_the_directrunner(vectors, "dask", dask_two.beam_args())
    report = storage.read_json(storage.list_files(bucket + "/dask/_reports", ".json")[-1])
    assert report["beam_args"][:2] == ["--dask_partition_size=1",
                                       "--runner=apache_beam.runners.dask.dask_runner.DaskRunner"]


def build_like_the_directrunner(vectors, name: str, beam_args: list[str]) -> str:
    """build-index of ``vectors`` on the DirectRunner (<bucket>/direct) and with
    ``beam_args`` (<bucket>/<name>): the same shards, id maps and search results, and no
    partial left. Returns the bucket."""
    bucket, x = vectors
    common = ["build-index", "--embeddings", bucket + "/emb", "--shards", "3", "--eval-queries", "200"]
    assert cli.main([*common, "--out", bucket + "/direct"]) == 0
    assert cli.main([*common, "--out", f"{bucket}/{name}", *beam_args]) == 0
    assert published(f"{bucket}/{name}") == published(bucket + "/direct")
    assert idmap_rows(f"{bucket}/{name}") == idmap_rows(bucket + "/direct")
    same_search(f"{bucket}/{name}", bucket + "/direct", x[::7])
    no_scratch_left(f"{bucket}/{name}")
    return bucket


# --- the slow tier: refresh and compaction, a worker killed mid-build ---

def _refresh_common(bucket: str, world: str) -> list[str]:
    return ["--catalog", bucket + "/cat/catalog.parquet", "--model", bucket + "/model", "--embeddings",
            f"{bucket}/{world}/emb", "--index", f"{bucket}/{world}/index", "--shards", "2", "--unit-rows", "40",
            "--eval-queries", "20", "--no-progress"]


@pytest.mark.slow
def test_refresh_and_compaction_on_dask_publish_the_directrunners_bytes(s3_server, dask_two):
    refresh_and_compact_like_the_directrunner(s3_server, "mimdex-dask-refresh", dask_two.beam_args())


def refresh_and_compact_like_the_directrunner(s3_server, bucket_name: str, beam_args: list[str]) -> None:
    """Two index roots over one catalog, one refreshed and compacted on the DirectRunner,
    the other with ``beam_args``, step by step: the first refresh (a full build), a refresh
    with a real delta (retitled, added and deleted products), then compaction. Each step
    must publish the same bytes on both."""
    import dirty_catalog as dc
    from mimdex.infra.local_s3 import create_bucket

    bucket = create_bucket(s3_server, bucket_name)
    random_bundle(bucket + "/model", ["product title"], "3-tower")
    rows = dc.write_kinds(bucket + "/cat", ["plain"] * 90, row_group_size=40)
    runners = {"direct": [], "remote": beam_args}

    def step(argv_for) -> None:
        for world, extra in runners.items():
            code = cli.main([*argv_for(world), *extra])
            assert code == 0, (world, argv_for(world))
        assert published(f"{bucket}/remote/index") == published(f"{bucket}/direct/index")
        assert idmap_rows(f"{bucket}/remote/index") == idmap_rows(f"{bucket}/direct/index")

    step(lambda w: ["refresh", *_refresh_common(bucket, w)])
    objects = {}
    for r in rows[:5]:
        r["title"] = f"product {r['product_id']} retitled".encode()
    rows = rows[:80] + rows[85:]   # 5 deleted
    for i in range(90, 94):
        r, objs, _ = dc.row("plain", f"P{i:04d}", i)
        rows.append(r)
        objects.update(objs)
    dc.write(bucket + "/cat", rows, objects, row_group_size=40)
    # (an untrained model's vectors drift: this test is about the delta, not the retrain rule)
    step(lambda w: ["refresh", *_refresh_common(bucket, w), "--max-drift", "10", "--max-code-drift", "100",
                    "--max-delta-share", "0.5"])   # the delta stays a delta: compaction is the next step
    for world in runners:
        report = storage.read_json(storage.list_files(f"{bucket}/{world}/index/_reports", ".json")[-1])
        assert report["decision"].startswith("incremental"), report["decision"]
    m = iv.read_manifest(f"{bucket}/remote/index", iv.latest_version(f"{bucket}/remote/index"))
    assert len(m.deltas) == 1 and m.deltas[0].added == 9 and m.deltas[0].removed_products == 10
    step(lambda w: ["compact", "--index", f"{bucket}/{w}/index"])
    assert iv.read_manifest(f"{bucket}/remote/index", iv.latest_version(f"{bucket}/remote/index")).deltas == ()
    for world in runners:
        no_scratch_left(f"{bucket}/{world}/index")


def _build_records(root: str) -> int:
    fs, path = storage.resolve(root)
    return sum("/_build/stats-" in p for p in fs.find(path)) if fs.exists(path) else 0


@pytest.mark.slow
def test_a_dask_worker_killed_mid_build_costs_only_time(s3_server, dask_two):
    """SIGKILL one worker process once the build has written its first outputs: Dask runs
    the lost tasks again (the nanny starts a new worker), the job publishes the
    DirectRunner's bytes, and nothing half-written stays; or it exits 75 within the stall
    timeout and a re-run publishes them."""
    victim = dask_two.worker_pids()[0]
    killed_mid_build(s3_server, "mimdex-dask-kill", dask_two.beam_args(), lambda: os.kill(victim, signal.SIGKILL),
                     stall=60, join=300)
    # the nanny replaces the killed worker: the cluster is whole again for what follows
    deadline = time.monotonic() + 60
    while len(dask_two.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert victim not in dask_two.worker_pids() and len(dask_two.worker_pids()) == 2


def killed_mid_build(s3_server, bucket_name: str, beam_args: list[str], kill, stall: int, join: int,
                     before_rerun=lambda: None) -> int:
    """A 40-part build on the DirectRunner, then with ``beam_args``, ``kill()`` called once
    the second has written its first outputs: it must exit 0, or 75 within the stall
    timeout and then a re-run (after ``before_rerun()``) exits 0; either way the DirectRunner's
    bytes and search results, and no partial left. Returns the first run's exit code."""
    from mimdex.infra.local_s3 import create_bucket

    bucket = create_bucket(s3_server, bucket_name)
    x = clustered(8000, seed=9)
    sha = random_bundle(bucket + "/model", ["a title"], "3-tower")
    write_embeddings(bucket + "/emb", x, [f"p{i:05d}" for i in range(len(x))], bucket + "/model", sha, parts=40)
    common = ["build-index", "--embeddings", bucket + "/emb", "--shards", "4", "--eval-queries", "100",
              "--stall-timeout", str(stall)]
    assert cli.main([*common, "--out", bucket + "/direct"]) == 0
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault("code", cli.main(
        [*common, "--out", bucket + "/remote", *beam_args])))
    start = time.monotonic()
    job.start()
    while _build_records(bucket + "/remote") == 0 and job.is_alive():
        time.sleep(0.05)
    done_at_kill = _build_records(bucket + "/remote")
    kill()
    job.join(join)
    assert not job.is_alive() and 0 < done_at_kill < 40   # killed mid-job, not before or after
    assert result["code"] in (0, 75)
    print(f"killed with {done_at_kill} of 40 parts done: exit {result['code']} after {time.monotonic() - start:.0f} s")
    if result["code"] == 75:   # allowed: then a re-run publishes the same bytes
        assert time.monotonic() - start < stall + 120
        before_rerun()
        assert cli.main([*common, "--out", bucket + "/remote", *beam_args]) == 0
    assert published(bucket + "/remote") == published(bucket + "/direct")
    same_search(bucket + "/remote", bucket + "/direct", x[::50])
    no_scratch_left(bucket + "/remote")
    return result["code"]
