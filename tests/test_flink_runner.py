"""The Beam jobs on Apache Flink, in production's topology (tests/flink_cluster.py: a
JobManager and 2 TaskManagers as separate JVMs, a Beam worker pool beside each TaskManager,
Beam's Flink job server), with the options of infra/beam/flink.options and the Flink
settings of infra/k8s/flink-deployment.yaml, modulo addresses and sizes, against the local
S3 server. Each job must publish what the DirectRunner publishes from the same input, byte
for byte, with every TaskManager slot doing a share of each stage; a TaskManager killed
mid-build must cost nothing but time. The cluster tests are in the slow tier (`make
test-slow`, run by .ci/run); what needs no cluster runs in `make test`."""
from __future__ import annotations

import contextlib
import os
import time

import psutil
import pytest

from mimdex.pipelines import cli
from mimdex.pipelines.refresh import diff as refresh_diff
from mimdex.pipelines.refresh import diff_graph
from mimdex.pipelines.cli_beam import unknown_beam_flags
from flink_cluster import options_file_lines
from test_dask_runner import (build_like_the_directrunner, killed_mid_build, refresh_and_compact_like_the_directrunner,
                              seeded_vectors)

def test_the_options_file_is_beam_options_and_a_flink_runner_never_downloads_its_job_server(tmp_path, capsys):
    assert unknown_beam_flags(options_file_lines()) == []
    base = ["build-index", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "out"), "--runner=FlinkRunner"]
    cases = [
        ([], "--runner=FlinkRunner needs --job_endpoint (a running Beam job server), or --flink_master"),
        (["--flink_master=[auto]", f"--flink_job_server_jar={tmp_path}"], "needs --job_endpoint"),
        (["--flink_master=127.0.0.1:8081", "--flink_job_server_jar=https://repo1.maven.org/x.jar"],
         "--flink_job_server_jar https://repo1.maven.org/x.jar: a path on this machine, not a URL"),
        (["--flink_master=127.0.0.1:8081", f"--flink_job_server_jar={tmp_path}/none.jar"],
         f"--flink_job_server_jar {tmp_path}/none.jar: no such file"),
    ]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture(scope="module")
def vectors(s3_server):
    return seeded_vectors(s3_server, "mimdex-flink-build")


def _last_job(cluster) -> dict:
    jobs = sorted(cluster.rest_get("/jobs/overview")["jobs"], key=lambda j: j["start-time"])
    return cluster.rest_get(f"/jobs/{jobs[-1]['jid']}")


def slot_shares(cluster, job: dict) -> dict[str, list[int]]:
    """Records each subtask (slot) of each stage read, from Flink's REST API: the stages
    that run our DoFns in the SDK workers (Flink's MapPartition operators; not its own
    shuffles) with work to spread (at least 2 records in)."""
    shares = {}
    for vertex in job["vertices"]:
        if "MapPartition" not in vertex["name"] or vertex["metrics"]["read-records"] < 2:
            continue
        detail = cluster.rest_get(f"/jobs/{job['jid']}/vertices/{vertex['id']}")
        shares[vertex["name"]] = [s["metrics"]["read-records"] for s in detail["subtasks"]]
    return shares


def listening_addresses(cluster) -> set[str]:
    found = set()
    for proc in cluster.processes.values():
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in family:
            with contextlib.suppress(psutil.Error):
                found |= {c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    return found


@pytest.mark.slow
def test_build_index_on_flink_publishes_the_directrunners_bytes_every_slot_working(vectors, flink_two):
    build_like_the_directrunner(vectors, "flink", flink_two.beam_args())
    job = _last_job(flink_two)
    assert job["state"] == "FINISHED"
    shares = slot_shares(flink_two, job)
    # the parts (8), the per-shard vectors and the shards (3): each stage on both slots
    assert any("AddPerShard" in name for name in shares) and any("MergeShard" in name for name in shares), shares
    assert all(len(s) == 2 and min(s) > 0 for s in shares.values()), shares
    # each TaskManager's own pool ran its SDK worker; nothing listened beyond loopback
    logs = os.listdir(os.path.join(flink_two.state, "log"))
    assert {n.split(":")[0] for n in logs if n.startswith("worker-")} == {"worker-127.0.0.2", "worker-127.0.0.3"}
    assert all(ip.removeprefix("::ffff:").startswith("127.") for ip in listening_addresses(flink_two))


@pytest.mark.slow
def test_refresh_and_compaction_on_flink_publish_the_directrunners_bytes(s3_server, flink_two, monkeypatch):
    # the diff's units and buckets are sized for millions of rows: smaller here, so that
    # each of its stages has several elements to spread (the driver sizes both, for both runners)
    monkeypatch.setattr(diff_graph, "UNIT_ROWS", 40)
    monkeypatch.setattr(diff_graph, "BATCH_ROWS", 40)
    monkeypatch.setattr(refresh_diff, "ROWS_PER_BUCKET", 16)
    before = {j["jid"] for j in flink_two.rest_get("/jobs/overview")["jobs"]}
    refresh_and_compact_like_the_directrunner(s3_server, "mimdex-flink-refresh", flink_two.beam_args())
    jobs = [flink_two.rest_get(f"/jobs/{j['jid']}") for j in flink_two.rest_get("/jobs/overview")["jobs"]
            if j["jid"] not in before]
    assert jobs and all(j["state"] == "FINISHED" for j in jobs)
    # the diffs, the first refresh's build and the compaction: every DoFn stage on both slots
    shares = [(name, s) for job in jobs for name, s in slot_shares(flink_two, job).items()]
    for stage in ("CatalogStates", "PreviousStates", "JoinBucket", "AddPerShard", "MergeShard", "CompactShard"):
        assert any(stage in name for name, _ in shares), (stage, shares)
    assert all(len(s) == 2 and min(s) > 0 for _, s in shares), shares


@pytest.mark.slow
def test_a_taskmanager_killed_mid_build_costs_only_time(s3_server, flink_two):
    """SIGKILL one TaskManager once the build has written its first outputs, and start it
    again 3 s later (what the operator does for a lost pod): Flink's restart strategy runs
    the lost tasks again and the job publishes the DirectRunner's bytes, with nothing
    half-written left; or it exits 75 within the stall timeout and a re-run publishes them."""
    def kill() -> None:
        flink_two.kill_taskmanager(1)
        time.sleep(3)
        flink_two.start_taskmanager(1)

    code = killed_mid_build(s3_server, "mimdex-flink-kill", flink_two.beam_args(), kill, stall=90, join=400,
                            before_rerun=flink_two.wait_for_taskmanagers)
    if code == 0:   # recovered: Flink saw the loss and ran the lost tasks again
        history = flink_two.rest_get(f"/jobs/{_last_job(flink_two)['jid']}/exceptions")["exceptionHistory"]["entries"]
        assert history, "the job finished without seeing the TaskManager go"
    flink_two.wait_for_taskmanagers()   # whole again for what follows
