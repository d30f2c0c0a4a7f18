"""`mimdex doctor`: the checks this CPU node passes, the exit codes of a node that lacks a
piece or cannot reach its store, and `--bench` measuring on this CPU (no GPU here: the
CUDA rows are exercised as absent, and `--gpu` makes their absence the failure it is on a
GPU node)."""
from __future__ import annotations

import glob
import json
import os
import socket
import sys


from mimdex.infra import storage
from mimdex.pipelines import cli

CHECKS = ["torch", "cuda", "bf16", "nvjpeg", "faiss", "faiss_gpu", "ray", "apache_beam", "tokenizers"]


def _report(out: str) -> dict:
    (path,) = glob.glob(os.path.join(out, "_reports", "doctor-*.json"))
    return json.load(open(path))


def test_doctor_passes_on_this_cpu_node_and_reaches_its_store(s3_bucket, tmp_path, capsys):
    out = str(tmp_path / "d")
    storage.write_bytes(s3_bucket + "/models/x", b"x")
    assert cli.main(["doctor", "--store", s3_bucket + "/models", "--out", out]) == 0
    printed = capsys.readouterr()
    rows = {ln.split()[0]: ln.split()[1] for ln in printed.out.splitlines()[2:] if ln.strip()}
    assert list(rows) == CHECKS + ["store"]
    assert rows["torch"] == rows["faiss"] == rows["ray"] == rows["apache_beam"] == rows["store"] == "ok"
    assert rows["cuda"] == "-"  # not required on a CPU node
    report = _report(out)
    assert report["node"] == "cpu" and report["missing"] == [] and "bench" not in report
    by = {c["name"]: c for c in report["checks"]}
    assert by["nvjpeg"]["detail"] == "cpu (no GPU on the encoder actor)"
    assert by["store"]["detail"] == f"{s3_bucket}/models reachable (exists)"
    assert f"report: {out}/_reports/doctor-" in printed.err


def test_a_gpu_node_without_cuda_exits_2_naming_each_missing_piece(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert cli.main(["doctor", "--gpu", "--bench", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "mimdex doctor: error: this node lacks cuda: no CUDA device" in err
    assert "nvjpeg: cpu (no GPU on the encoder actor)" in err and "faiss_gpu: a CPU-only faiss build" in err
    assert err.rstrip().endswith("(--bench skipped)")
    report = _report(out)  # written all the same
    assert report["node"] == "gpu" and {"cuda", "nvjpeg", "faiss_gpu"} <= set(report["missing"])
    assert "bench" not in report


def test_a_missing_package_exits_2_naming_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert cli.main(["doctor", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "this node lacks faiss: not importable" in err
    assert _report(str(tmp_path / "d"))["missing"] == ["faiss"]


def test_an_unreachable_store_exits_75_naming_the_uri(s3_server, monkeypatch, tmp_path, capsys):
    import s3fs

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    # one attempt each, so the test does not sit through production's retries (54 s)
    monkeypatch.setitem(storage.STORAGE_OPTIONS["s3"], "config_kwargs",
                        {**storage.STORAGE_OPTIONS["s3"]["config_kwargs"], "retries": {"max_attempts": 1}})
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    assert cli.main(["doctor", "--store", "s3://fleet-index/prod", "--out", str(tmp_path / "d")]) == 75
    err = capsys.readouterr().err
    assert "mimdex doctor: error: the object store did not answer: s3://fleet-index/prod" in err
    assert f"127.0.0.1:{port}" in err


def test_doctor_bench_measures_this_node(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert cli.main(["doctor", "--bench", "--preset", "tiny", "--batch-size", "16", "--batches", "1",
                     "--out", out]) == 0
    printed = capsys.readouterr().out
    report = _report(out)
    names = [m["name"] for m in report["bench"]]
    assert names == ["decode_draft", "decode_full", "image_tower_compiled", "encode_actor_path", "text_tower",
                     "kmeans_assign"]
    assert all(m["value"] > 0 for m in report["bench"])
    assert all(name in printed for name in names)
    by = {m["name"]: m for m in report["bench"]}
    assert "tiny at 64px, batch 16, fp32, compiled in" in by["image_tower_compiled"]["detail"]
    ratio = by["encode_actor_path"]["value"] / by["image_tower_compiled"]["value"]
    stated = float(by["encode_actor_path"]["detail"].split("; ")[1].split("x the compiled tower")[0])
    assert abs(stated - ratio) <= 0.01 + 0.01 * ratio  # the values are rounded to 0.1 images/s
    assert "float32 GEMM" in by["kmeans_assign"]["detail"] or "bfloat16 GEMM" in by["kmeans_assign"]["detail"]


def test_doctor_refuses_a_zero_batch(tmp_path, capsys):
    assert cli.main(["doctor", "--bench", "--batch-size", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
