"""`mimdex encode` on a real local Ray, against a local directory and the local S3 server.

In-process tests share one small Ray started by a fixture (the job joins it); the
crash test runs the real CLI in a subprocess that starts its own embedded Ray.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from conftest import random_bundle
from mimdex.encoders.bundle import load_bundle
from mimdex.infra import storage
from mimdex.infra.local_s3 import create_bucket
from mimdex.pipelines import cli
from mimdex.infra.contracts import embeddings as emb
from mimdex.pipelines.encode.config import EncodeConfig
from mimdex.pipelines.encode import run as _run
from mimdex.pipelines import synth as synth_job
from mimdex.pipelines.synth import SynthConfig


def _png(seed: int, size: int = 48, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.convert(mode).save(buf, "PNG")
    return buf.getvalue()


def _read_parts(root: str) -> pa.Table:
    return emb.read_all(root, emb.read_manifest(root), "part")


def _read_rejects(root: str) -> pa.Table:
    return emb.read_all(root, emb.read_manifest(root), "rejects")


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), -1).astype(np.float32)


# ---------------------------------------------------------------- 2,000 products via S3

def run(*args, **kwargs) -> dict:
    return _run(*args, **kwargs).report


@pytest.fixture(scope="module")
def s3_catalog(s3_server, tmp_path_factory):
    bucket = create_bucket(s3_server, f"mimdex-enc-{uuid.uuid4().hex[:10]}")
    data = bucket + "/data"
    synth_job.run(SynthConfig(products=2000, queries=20, seed=3), data, workers=2, progress=False)
    titles = ds.dataset(storage.resolve(data + "/catalog")[1], filesystem=storage.resolve(data)[0]
                        ).to_table(columns=["title"]).column("title").to_pylist()
    random_bundle(bucket + "/model", titles, "3-tower", seed=1)
    return bucket


def test_s3_to_s3_every_product_once_and_equal_to_in_process_encoding(s3_catalog, local_ray):
    out = s3_catalog + "/emb"
    cfg = EncodeConfig(model=s3_catalog + "/model", catalog=s3_catalog + "/data/catalog", out=out,
                       unit_rows=256, progress=False)
    report = run(cfg)
    catalog = storage.parquet_dataset(s3_catalog + "/data/catalog").to_table(columns=["product_id", "title", "image"])
    assert report["complete"] and report["plan"]["units"] == 8
    c = report["counts"]
    assert c["read"] == catalog.num_rows == 2000 and c["encoded"] + c["rejected"] == 2000
    parts = _read_parts(out)
    ids = parts.column("product_id").to_pylist()
    assert len(ids) == len(set(ids)) == c["encoded"]
    assert set(ids) | set(_read_rejects(out).column("product_id").to_pylist()) == set(
        catalog.column("product_id").to_pylist())
    assert parts.schema.field("image_emb").type == pa.list_(pa.float16(), 128)
    meta = parts.schema.metadata
    enc = load_bundle(s3_catalog + "/model")
    assert meta[b"mimdex.model_sha256"].decode() == enc.sha256 == report["model"]["sha256"]

    # The pipeline's vectors are the bundle's in-process vectors, up to fp16 rounding.
    by_id = {pid: i for i, pid in enumerate(catalog.column("product_id").to_pylist())}
    sample = [ids[i] for i in range(0, len(ids), 7)]
    rows = [by_id[p] for p in sample]
    ref_img = enc.encode_images([catalog.column("image")[r].as_py() for r in rows])
    ref_txt = enc.encode_texts([catalog.column("title")[r].as_py() for r in rows])
    pos = [ids.index(p) for p in sample]
    got_img = _vectors(parts.column("image_emb"))[pos]
    got_txt = _vectors(parts.column("text_emb"))[pos]
    assert np.abs(got_img - ref_img).max() <= 1e-3 and np.abs(got_txt - ref_txt).max() <= 1e-3
    assert np.allclose(got_img, ref_img.astype(np.float16).astype(np.float32), atol=1e-3)

    # The report is next to the output; a re-run skips every committed unit.
    again = run(cfg)
    assert again["counts"]["units_skipped"] == 8 and again["counts"]["skipped"] == 2000
    assert again["recomputed_units"] == [] and again["counts"]["encoded"] == 0
    assert storage.read_json(storage.join(out, "manifest.json"))["counts"]["encoded"] == c["encoded"]


# ---------------------------------------------------------------- bad input

def _write_catalog(path, rows: list[dict], schema: pa.Schema, row_group_size: int = 8) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema), path, row_group_size=row_group_size)


CATALOG_SCHEMA = pa.schema([("product_id", pa.string()), ("title", pa.string()), ("image", pa.binary()),
                            ("brand", pa.string())])


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, "PNG")  # 81 Mpx in a few kB
    return buf.getvalue()


BAD_ROWS = {  # product_id -> (changes to a good row, expected reason)
    "bad-corrupt": ({"image": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4}, "image_corrupt"),
    "bad-truncated": ({"image": _png(900, 64)[:300]}, "image_corrupt"),
    "bad-zero-bytes": ({"image": b""}, "image_empty"),
    "bad-not-an-image": ({"image": b"<html>product page</html>"}, "image_corrupt"),
    "bad-bomb": ({"image": _bomb()}, "image_too_large"),
    "bad-null-image": ({"image": None}, "image_missing"),
    "bad-empty-title": ({"title": ""}, "title_empty"),
    "bad-blank-title": ({"title": "   "}, "title_empty"),
}


def _good(i: int) -> dict:
    return {"product_id": f"p{i:04d}", "title": f"red mug number {i} ünïcode", "image": _png(i),
            "brand": "acme"}


def test_bad_rows_become_rejects_with_reasons_and_good_rows_are_encoded(tmp_path, local_ray):
    rows = [_good(i) for i in range(40)]
    rows += [{**_good(100 + k), "product_id": pid, **change} for k, (pid, (change, _)) in enumerate(BAD_ROWS.items())]
    rows.append({**_good(200), "product_id": ""})              # empty product id
    rows.append({**_good(201), "product_id": None})            # null product id
    rows.append({**_good(202), "product_id": "p0003"})         # duplicate in the same file
    rows.append({**_good(203), "image": _png(203, 40, "RGBA")})  # awkward but fine
    _write_catalog(tmp_path / "cat" / "a.parquet", rows, CATALOG_SCHEMA)
    # a second file: a duplicate of a product of the first file, and a non-UTF-8 title
    raw = pa.array([b"blue vase", b"caf\xe9 \xff mug", b"green hat"], pa.binary()).view(pa.string())
    second = pa.table({"product_id": ["p0010", "bad-not-utf8", "q0001"], "title": raw,
                       "image": [_png(300), _png(301), _png(302)], "brand": ["x", "y", "z"]})
    pq.write_table(second, tmp_path / "cat" / "b.parquet")
    random_bundle(str(tmp_path / "model"), [r["title"] or "" for r in rows], "3-tower")
    out = str(tmp_path / "emb")
    report = run(EncodeConfig(model=str(tmp_path / "model"), catalog=str(tmp_path / "cat"), out=out,
                              unit_rows=16, dtype="float32", progress=False))

    rejects = _read_rejects(out).to_pylist()
    reasons = {r["product_id"]: r["reason"] for r in rejects}
    for pid, (_, reason) in BAD_ROWS.items():
        assert reasons[pid] == reason, pid
    assert reasons["bad-not-utf8"] == "title_not_utf8"
    assert sorted(r["reason"] for r in rejects if not r["product_id"]) == ["product_id_empty"] * 2
    dups = [r for r in rejects if r["reason"] == "duplicate_product_id"]
    assert sorted(r["product_id"] for r in dups) == ["p0003", "p0010"]
    assert all(r["detail"].startswith("first seen at ") and "a.parquet row " in r["detail"] for r in dups)
    assert next(r for r in dups if r["product_id"] == "p0010")["source"].endswith("b.parquet")

    encoded = _read_parts(out)
    ids = encoded.column("product_id").to_pylist()
    assert set(ids) == {f"p{i:04d}" for i in range(40)} | {"p0203", "q0001"} and len(ids) == len(set(ids))
    assert encoded.schema.field("image_emb").type == pa.list_(pa.float32(), 128)
    total = len(rows) + 3
    c = report["counts"]
    assert c["read"] == total and c["encoded"] + c["rejected"] == total and c["rejected"] == len(rejects) == 13
    assert c["rejects_by_reason"]["image_corrupt"] == 3


def test_image_uris_relative_absolute_and_unreachable(s3_bucket, local_ray):
    for i in range(6):
        storage.write_bytes(f"{s3_bucket}/cat/img/{i}.png", _png(i))
    rows = [{"product_id": f"u{i}", "title": f"mug {i}", "image_uri": f"img/{i}.png"} for i in range(5)]
    rows.append({"product_id": "u5", "title": "mug 5", "image_uri": f"{s3_bucket}/cat/img/5.png"})
    rows.append({"product_id": "gone", "title": "mug", "image_uri": "img/missing.png"})
    rows.append({"product_id": "no-bucket", "title": "mug", "image_uri": "s3://no-such-bucket-mimdex/x.png"})
    rows.append({"product_id": "bad-scheme", "title": "mug", "image_uri": "nosuchproto://x/y.png"})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, pa.schema([("product_id", pa.string()), ("title", pa.string()),
                                                          ("image_uri", pa.string())])), buf)
    storage.write_bytes(f"{s3_bucket}/cat/catalog.parquet", buf.getvalue())
    random_bundle(f"{s3_bucket}/model", [r["title"] for r in rows], "image-only")
    out = f"{s3_bucket}/emb"
    report = run(EncodeConfig(model=f"{s3_bucket}/model", catalog=f"{s3_bucket}/cat/catalog.parquet", out=out,
                              progress=False))
    parts = _read_parts(out)
    assert sorted(parts.column("product_id").to_pylist()) == [f"u{i}" for i in range(6)]
    assert "text_emb" not in parts.column_names  # image-only model: no text tower
    assert parts.schema.metadata[b"mimdex.variant"] == b"image-only"
    rejects = {r["product_id"]: r for r in _read_rejects(out).to_pylist()}
    assert {k: v["reason"] for k, v in rejects.items()} == {
        "gone": "image_uri_unreachable", "no-bucket": "image_uri_unreachable", "bad-scheme": "image_uri_unreachable"}
    assert "img/missing.png" in rejects["gone"]["detail"]
    assert report["counts"]["encoded"] == 6 and report["counts"]["rejected"] == 3


@pytest.mark.parametrize("table, message", [
    (pa.table({"product_id": ["a"], "image": [b"x"]}), "missing required column 'title'"),
    (pa.table({"product_id": ["a"], "title": ["t"], "image": ["not bytes"]}),
     "column 'image' has type string; expected binary"),
    (pa.table({"product_id": [1], "title": ["t"], "image": [b"x"]}), "column 'product_id' has type int64"),
    (pa.table({"product_id": ["a"], "title": ["t"]}), "missing required column 'image'"),
])
def test_a_catalog_with_a_bad_schema_fails_at_once_with_65(tmp_path, capsys, table, message):
    pq.write_table(table, tmp_path / "cat.parquet")
    random_bundle(str(tmp_path / "model"), ["t"], "3-tower")
    code = cli.main(["encode", "--model", str(tmp_path / "model"), "--catalog", str(tmp_path / "cat.parquet"),
                     "--out", str(tmp_path / "emb"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 65 and message in err and "cat.parquet" in err and "Traceback" not in err
    assert not (tmp_path / "emb").exists()


# ---------------------------------------------------------------- failures

def _small_catalog(tmp_path, n: int = 600, row_group: int = 30) -> tuple[str, str]:
    rows = [_good(i) for i in range(n)]
    _write_catalog(tmp_path / "cat" / "catalog.parquet", rows, CATALOG_SCHEMA, row_group_size=row_group)
    random_bundle(str(tmp_path / "model"), [r["title"] for r in rows], "3-tower")
    return str(tmp_path / "cat"), str(tmp_path / "model")


def test_killing_an_encoder_actor_mid_run_is_survived(tmp_path, local_ray):
    catalog, model = _small_catalog(tmp_path)
    killed = []

    def kill_one_actor(record):
        if killed:
            return
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("mimdex-encoder-"))
        actor = ray.get_actor(name)
        pid = ray.get(actor.pid.remote())
        os.kill(pid, signal.SIGKILL)  # the process dies as on an OOM kill or a lost node
        killed.append(pid)

    out = str(tmp_path / "emb")
    report = run(EncodeConfig(model=model, catalog=catalog, out=out, unit_rows=30, progress=False),
                 on_commit=kill_one_actor)
    assert killed and not psutil.pid_exists(killed[0])
    assert report["complete"] and report["counts"]["units_encoded"] == 20 and not report["failed_units"]
    ids = _read_parts(out).column("product_id").to_pylist()
    assert sorted(ids) == [f"p{i:04d}" for i in range(600)]


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_sigkilled_driver_resumes_recomputing_only_uncommitted_units(tmp_path):
    catalog, model = _small_catalog(tmp_path, n=1200, row_group=30)
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "mimdex.pipelines.cli", "encode", "--model", model, "--catalog", catalog,
           "--out", str(out), "--unit-rows", "30", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    family: set[int] = set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            family.update(_descendants(proc.pid))
            if len(list((out / "_commits").glob("*.json"))) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    committed = {p.stem for p in (out / "_commits").glob("*.json")}
    assert 5 <= len(committed) < 40 and not (out / "manifest.json").exists()
    # The embedded Ray the driver started goes down with it: nothing is left running.
    deadline = time.time() + 60
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                         for p in family):
        time.sleep(0.5)
    assert not [(p, psutil.Process(p).cmdline()[:3], psutil.Process(p).status()) for p in family
                if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(open(done.stdout.strip().splitlines()[-1]).read())
    all_units = {f"part-{i:05d}" for i in range(40)}
    assert set(report["recomputed_units"]) == all_units - committed
    assert report["counts"]["units_skipped"] == len(committed)
    ids = _read_parts(str(out)).column("product_id").to_pylist()
    assert sorted(ids) == [f"p{i:04d}" for i in range(1200)]
