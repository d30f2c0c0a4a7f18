"""encode on a real multi-node Ray cluster (a head with no CPUs and two worker nodes, all
on loopback): the work spreads over the workers, a worker node lost mid-run costs nothing
(every product encoded exactly once, no unit lost or committed twice), and a job that
cannot make progress stops with exit 75 saying what it waited for instead of hanging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import dirty_catalog as dc
from conftest import random_bundle
from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.pipelines.encode.job import loopback_only

N = 1200


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    dc.write_kinds(str(root / "cat"), ["plain"] * N, row_group_size=100)
    random_bundle(str(root / "model"), ["product title"], "3-tower")
    return root


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    with loopback_only():
        c = Cluster(initialize_head=True, connect=False,
                    head_node_args={"num_cpus": 0, "include_dashboard": False})
        workers = [c.add_node(num_cpus=2) for _ in range(2)]
        c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def _encode(catalog, out: str, address: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mimdex.pipelines.cli", "encode", "--model", str(catalog / "model"),
           "--catalog", str(catalog / "cat" / "catalog.parquet"), "--out", out, "--unit-rows", "100",
           "--ray-address", address, "--no-progress", *extra]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the driver joins on loopback too
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _exactly_once(out: str) -> None:
    table = emb.read_all(out, emb.read_manifest(out))  # every part checked against its sha256
    ids = table.column("product_id").to_pylist()
    assert len(ids) == N and sorted(ids) == [f"P{i:04d}" for i in range(N)]


def test_encode_spreads_over_the_worker_nodes(catalog, cluster, tmp_path):
    c, workers = cluster
    proc = _encode(catalog, str(tmp_path / "emb"), c.address, "--encoders", "2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(storage.read_bytes(out.strip().splitlines()[-1]))
    worker_ids = {w.node_id for w in workers}
    assert set(report["nodes"]["decode"]) == worker_ids  # both workers decoded
    assert set(report["nodes"]["encode"]) == worker_ids  # one actor on each
    assert c.head_node.node_id not in set(report["nodes"]["decode"]) | set(report["nodes"]["encode"])
    _exactly_once(str(tmp_path / "emb"))


def test_a_worker_node_lost_mid_run_costs_nothing(catalog, cluster, tmp_path):
    c, workers = cluster
    out_uri = str(tmp_path / "emb")
    proc = _encode(catalog, out_uri, c.address, "--encoders", "2", "--stall-timeout", "120")
    commits = tmp_path / "emb" / "_commits"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if commits.exists() and len(list(commits.glob("*.json"))) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()
    c.remove_node(workers[1])  # its raylet, workers and actor die with it
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(storage.read_bytes(out.strip().splitlines()[-1]))
    assert report["complete"] and not report["failed_units"]
    assert report["counts"]["units_encoded"] == 12  # none lost, none committed twice
    _exactly_once(out_uri)


def test_a_job_that_cannot_progress_exits_75_saying_what_it_waits_for(catalog, cluster, tmp_path):
    c, _ = cluster
    # each decode task asks for 3 CPUs: no node has that many, so nothing can ever run
    proc = _encode(catalog, str(tmp_path / "emb"), c.address, "--decode-cpus", "3", "--stall-timeout", "8")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err
    assert "no unit committed for" in err and "decode task(s) (each needs 3 CPU)" in err
    assert "Traceback" not in err
