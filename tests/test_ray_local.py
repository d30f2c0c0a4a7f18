"""An embedded Ray keeps to itself: every socket it opens listens on loopback only, and it
starts its own instance even when another Ray cluster runs on the same machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

import dirty_catalog as dc
from conftest import random_bundle
from mimdex.infra import storage

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.fixture
def small_catalog(tmp_path):
    dc.write_kinds(str(tmp_path / "cat"), ["plain"] * 60, row_group_size=20)
    random_bundle(str(tmp_path / "model"), ["product title"], "3-tower")
    return tmp_path


def _encode_cmd(tmp_path, out: str) -> list[str]:
    return [sys.executable, "-m", "mimdex.pipelines.cli", "encode", "--model", str(tmp_path / "model"),
            "--catalog", str(tmp_path / "cat" / "catalog.parquet"), "--out", out, "--unit-rows", "20",
            "--no-progress"]


def _listening(pids: set[int]) -> set[tuple[int, str]]:
    return {(c.pid, c.laddr.ip) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def test_an_embedded_ray_listens_on_loopback_only(small_catalog):
    proc = subprocess.Popen(_encode_cmd(small_catalog, str(small_catalog / "emb")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set[tuple[int, str]] = set()
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        try:
            tree = {proc.pid} | {c.pid for c in parent.children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        seen |= _listening(tree)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len({pid for pid, _ in seen}) >= 2  # the GCS, the raylet, workers... were seen listening
    assert {ip for _, ip in seen} <= set(LOOPBACK), seen


def test_an_embedded_encode_starts_its_own_ray_next_to_another_cluster(small_catalog, tmp_path):
    """`ray start --head` registers a cluster for the machine (/tmp/ray/ray_current_cluster);
    a plain ray.init() then joins it and refuses num_cpus. Embedded mode must not."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    address_file = "/tmp/ray/ray_current_cluster"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # the other cluster on loopback too
    started = subprocess.run([ray_bin, "start", "--head", "--num-cpus=1", "--port=0", "--include-dashboard=false",
                              "--disable-usage-stats"], capture_output=True, text=True, timeout=120, env=env)
    address = open(address_file).read().strip() if os.path.exists(address_file) else "?"
    try:
        assert started.returncode == 0, started.stderr
        done = subprocess.run(_encode_cmd(small_catalog, str(tmp_path / "emb2")), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        report = json.loads(storage.read_bytes(done.stdout.strip().splitlines()[-1]))
        assert report["sizing"]["cpus"] == os.cpu_count()  # its own Ray, not the other cluster's 1 CPU
    finally:  # stop exactly that cluster's processes (`ray stop` would stop every Ray here)
        procs = list(psutil.process_iter(["cmdline"]))
        cmds = {p.pid: " ".join(p.info["cmdline"] or []) for p in procs}
        # its raylet and agents name the address; its GCS (on a dynamic port) only the session
        sessions = {arg.split("=", 1)[1] for cmd in cmds.values() if address in cmd
                    for arg in cmd.split() if arg.startswith("--session-name=")}
        for p in procs:
            if address in cmds[p.pid] or any(s in cmds[p.pid] for s in sessions):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        if os.path.exists(address_file) and open(address_file).read().strip() == address:
            os.remove(address_file)
