"""Exit paths of the contract in infra/errors.py (docs/cli.md, "Exit codes") that a user
can meet and no other test reaches, each with its exact code and message: a compaction
with nothing to do (99), encode units that failed on bad data (65) or transiently (75),
storage retries exhausted (75), access denied (2), a Ray that cannot be joined (75), an
interrupt (130)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import s3fs

import dirty_catalog as dc
from conftest import random_bundle
from fault_proxy import FaultProxy
from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.pipelines import cli
from test_build_index import clustered, write_embeddings

MIMDEX = [sys.executable, "-m", "mimdex.pipelines.cli"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_index(tmp_path):
    x = clustered(600)
    model = str(tmp_path / "model")
    sha = random_bundle(model, ["a title"], "3-tower")
    write_embeddings(str(tmp_path / "emb"), x, [f"p{i}" for i in range(len(x))], model, sha, parts=2)
    index = str(tmp_path / "index")
    assert cli.main(["build-index", "--embeddings", str(tmp_path / "emb"), "--out", index, "--shards", "2",
                     "--eval-queries", "50"]) == 0
    return index


def test_compact_with_no_delta_segment_exits_99(local_index, capsys):
    capsys.readouterr()
    assert cli.main(["compact", "--index", local_index]) == 99
    out, err = capsys.readouterr()
    assert "has no delta segments: nothing to compact" in out
    assert err.strip() == "mimdex compact: nothing to compact"
    assert out.strip().splitlines()[-1].startswith(local_index + "/_reports/compact-")


@pytest.fixture
def proxied(s3_bucket, monkeypatch):
    """The local S3 server behind a fault proxy; yields (bucket, proxy factory)."""
    host, port = os.environ["AWS_ENDPOINT_URL_S3"].rsplit("//", 1)[1].split(":")
    started = []

    def start(**kwargs) -> FaultProxy:
        proxy = FaultProxy((host, int(port)), **kwargs)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.__enter__())
        s3fs.S3FileSystem.clear_instance_cache()  # the cached instance points at the old endpoint
        started.append(proxy)
        return proxy

    yield s3_bucket, start
    for proxy in started:
        proxy.__exit__(None, None, None)
    s3fs.S3FileSystem.clear_instance_cache()


def test_storage_retries_exhausted_exit_75_naming_the_object(proxied, monkeypatch, capsys):
    bucket, start = proxied
    storage.write_bytes(bucket + "/index/LATEST", b'{"version": "v1"}')
    start(rate=1.0, kinds=("slowdown",))
    monkeypatch.setenv("MIMDEX_S3_MAX_ATTEMPTS", "1")  # production's 8 take 4.7 minutes here
    assert cli.main(["versions", "--index", bucket + "/index"]) == 75
    err = capsys.readouterr().err
    assert err.startswith("mimdex versions: error: ") and f"{bucket}/index" in err
    assert err.strip() == f"mimdex versions: error: read: {bucket}/index/LATEST: [Errno 16] Service Unavailable"


def test_access_denied_exits_2_naming_the_object(proxied, capsys):
    bucket, start = proxied
    start(rate=1.0, kinds=("denied",))
    assert cli.main(["versions", "--index", bucket + "/index"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimdex versions: error: ") and f"permission denied for {bucket}/index" in err
    assert "check the credentials and the bucket policy" in err


def _catalog(root: str, n: int) -> list[dict]:
    return dc.write_kinds(root, ["plain"] * n, row_group_size=20)


def test_encode_units_that_failed_on_bad_data_exit_65(tmp_path, local_ray, monkeypatch, capsys):
    """The catalog file is replaced by garbage after the first unit committed: the other
    units fail on it (65 each), the committed one is kept, and the run exits 65."""
    from mimdex.pipelines.encode import commits

    root = str(tmp_path / "cat")
    rows = _catalog(root, 60)
    model = str(tmp_path / "model")
    random_bundle(model, [r["title"].decode() for r in rows], "3-tower")
    real = commits.commit

    def commit_then_break_the_catalog(out, record):
        real(out, record)
        with open(root + "/catalog.parquet", "wb") as f:
            f.write(b"not parquet any more")

    monkeypatch.setattr(commits, "commit", commit_then_break_the_catalog)
    code = cli.main(["encode", "--model", model, "--catalog", root + "/catalog.parquet", "--out",
                     str(tmp_path / "emb"), "--unit-rows", "20", "--max-in-flight", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 65, err
    assert "mimdex encode: error: 2 of 3 units failed (first: " in err and "catalog.parquet" in err
    assert "committed units are kept and a re-run encodes only the rest" in err
    assert len(commits.committed(str(tmp_path / "emb"))) == 1
    assert not storage.exists(emb.manifest_uri(str(tmp_path / "emb")))  # not complete: no manifest


def test_encode_units_that_failed_transiently_exit_75(proxied, tmp_path):
    """Every write of one unit's part answers 503 SlowDown until the retries give up: that
    unit fails (75), the others commit, the run exits 75 naming it."""
    bucket, start = proxied
    rows = _catalog(bucket + "/cat", 60)
    random_bundle(bucket + "/model", [r["title"].decode() for r in rows], "3-tower")
    start(rate=1.0, kinds=("slowdown",), only=("PUT", "part-00001.parquet"))
    env = {**os.environ, "MIMDEX_S3_MAX_ATTEMPTS": "1"}
    done = subprocess.run(MIMDEX + ["encode", "--model", bucket + "/model", "--catalog", bucket + "/cat/catalog.parquet",
                                    "--out", bucket + "/emb", "--unit-rows", "20", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 75, done.stderr[-2000:]
    assert "mimdex encode: error: 1 of 3 units failed (first: " in done.stderr
    assert "part-00001.parquet" in done.stderr and "Errno 16" in done.stderr


def test_a_ray_cluster_that_cannot_be_joined_exits_75(tmp_path):
    rows = _catalog(str(tmp_path / "cat"), 20)
    random_bundle(str(tmp_path / "model"), [r["title"].decode() for r in rows], "3-tower")
    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    done = subprocess.run(MIMDEX + ["encode", "--model", str(tmp_path / "model"), "--catalog",
                                    str(tmp_path / "cat" / "catalog.parquet"), "--out", str(tmp_path / "emb"),
                                    "--ray-address", address, "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 75, done.stderr[-2000:]
    assert f"mimdex encode: error: cannot start or join Ray (--ray-address {address})" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - t0 < 240


def test_an_interrupt_exits_130_with_nothing_half_written(tmp_path):
    """Ctrl-C during build-index: exit 130, one line, and no manifest or LATEST: a
    version is complete only when its manifest is written, last."""
    x = clustered(60000)
    model = str(tmp_path / "model")
    sha = random_bundle(model, ["a title"], "3-tower")
    write_embeddings(str(tmp_path / "emb"), x, [f"p{i}" for i in range(len(x))], model, sha, parts=4)
    index = str(tmp_path / "index")
    # SIGINT as a terminal's child has it: a suite started in the background (`&` without job
    # control) hands its children SIGINT ignored, and Python keeps an inherited SIG_IGN
    proc = subprocess.Popen(MIMDEX + ["build-index", "--embeddings", str(tmp_path / "emb"), "--out", index,
                                      "--shards", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120  # interrupt the build itself, not the interpreter's start-up
    while not os.path.exists(index) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "mimdex build-index: interrupted"
    assert not os.path.exists(os.path.join(index, "LATEST"))
    assert not [p for p in (tmp_path / "index").rglob("manifest.json")]
