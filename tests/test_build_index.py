"""`mimdex build-index`, the reader, `search` and `eval`: Beam DirectRunner, real faiss,
the local S3 server. Embeddings are seeded clustered unit vectors written in the
embeddings contract, except in the end-to-end test, which encodes a synthetic catalog."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import random_bundle
from mimdex.infra.contracts import index_version as publish
from mimdex.infra.contracts.vectors import ids_for
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.pipelines import cli
from mimdex.pipelines.build_index import BuildConfig
from mimdex.pipelines.build_index import run as _run
from mimdex.infra.contracts import embeddings as shards
from mimdex.infra.contracts.model import ModelRef

D = 64


def run(*args) -> dict:
    return _run(*args).report


def clustered(n: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, D)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(root: str, vectors: np.ndarray, pids: list[str], model_uri: str, sha: str,
                     parts: int = 5, override: dict | None = None) -> None:
    """An embeddings root in the encode contract, without running encode; ``override``
    rewrites one part with other schema metadata (a part from another model...)."""
    model = ModelRef(model_uri, sha, "3-tower", D, True)
    shards.write_vectors(root, vectors, pids, model, "float16", parts)
    for i, meta in (override or {}).items():
        uri = storage.join(root, f"part-{i:05d}.parquet")
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        table = table.replace_schema_metadata({**table.schema.metadata,
                                               **{f"mimdex.{k}".encode(): str(v).encode() for k, v in meta.items()}})
        with storage.open_write(uri) as f:
            pq.write_table(table, f)


@pytest.fixture
def emb_root(s3_bucket):
    n = 3000
    x = clustered(n)
    x[10] = np.nan  # bad vectors are counted and skipped, never indexed
    x[11] = np.inf
    x[12] = 0.0
    pids = [f"prod-{i:05d}" for i in range(n)]
    model = s3_bucket + "/model"
    sha = random_bundle(model, ["a title"], "3-tower")
    root = s3_bucket + "/emb"
    write_embeddings(root, x, pids, model, sha)
    return s3_bucket, root, x, pids


def test_build_on_s3_every_id_in_one_shard_and_self_search_first(emb_root):
    bucket, emb, x, pids = emb_root
    out = bucket + "/index"
    report = run(BuildConfig(embeddings=emb, out=out, shards=4, eval_queries=300))
    assert report["published"] and report["counts"]["skipped"] == {"nan_or_inf": 2, "zero": 1}
    version = publish.latest_version(out)
    assert version == report["version"]
    manifest = publish.read_manifest(out, version)
    assert len(manifest.shards) == 4 and manifest.params["factory"] == report["params"]["factory"]
    seen: list[str] = []
    for entry in manifest.shards:
        fs, path = storage.resolve(storage.join(publish.version_uri(out, version), entry.ids.file))
        seen += pq.read_table(path, filesystem=fs).column("product_id").to_pylist()
    good = [p for i, p in enumerate(pids) if i not in (10, 11, 12)]
    assert sorted(seen) == good  # exactly once each, bad vectors nowhere

    reader = IndexReader.open(out)
    assert reader.version == version and reader.ntotal == len(good)
    sample = np.random.default_rng(1).choice([i for i in range(len(pids)) if i > 12], 400, replace=False)
    scores, ids = reader.search(x[sample], 5)
    assert (ids[:, 0] == ids_for([pids[i] for i in sample])).mean() >= 0.99
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    # searching shard by shard and merging gives what the consolidated index gives: the
    # same scores; ids can differ only in the order of equal scores (fast-scan distances
    # are quantised, so ties are common, also with the (k+1)-th result)
    split_scores, split_ids = IndexReader.open(out, consolidate=False).search(x[sample], 5)
    assert np.array_equal(split_scores, scores) and (split_ids == ids).mean() >= 0.98
    held = report["evaluation"]["held_out"]
    assert held["default_nprobe"] == manifest.default_nprobe
    # the default nprobe is the smallest reaching the 0.95 target, else the best one tried
    at = {r["nprobe"]: r["recall@10"] for r in held["sweep"]}
    reached = [p for p, r in at.items() if r >= 0.95]
    assert held["default_nprobe"] == (min(reached) if reached else max(at, key=lambda p: (at[p], -p)))


def test_mismatched_parts_are_refused_with_65_naming_them(s3_bucket, capsys):
    x = clustered(600, seed=2)
    model = s3_bucket + "/model"
    sha = random_bundle(model, ["t"], "3-tower")
    emb = s3_bucket + "/emb"
    write_embeddings(emb, x, [f"p{i}" for i in range(600)], model, sha, parts=3,
                     override={1: {"model_sha256": "0" * 64}})
    code = cli.main(["build-index", "--embeddings", emb, "--out", s3_bucket + "/index", "--shards", "2"])
    err = capsys.readouterr().err
    assert code == 65 and "part-00001.parquet" in err and "model_sha256" in err
    assert not storage.exists(s3_bucket + "/index/LATEST")


def test_a_part_with_no_usable_vector_still_builds_and_evaluates(tmp_path):
    """Every row of one part is a bad vector, so that part has no candidate for any
    evaluation query (its ground truth was inf, which JSON cannot hold: the build died with a
    traceback, which the kill soak's 300-product catalog met)."""
    x = clustered(600, seed=4)
    x[400:] = np.nan
    model = str(tmp_path / "model")
    sha = random_bundle(model, ["t"], "3-tower")
    write_embeddings(str(tmp_path / "emb"), x, [f"p{i}" for i in range(600)], model, sha, parts=3)
    out = str(tmp_path / "index")
    assert cli.main(["build-index", "--embeddings", str(tmp_path / "emb"), "--out", out, "--shards", "2",
                     "--eval-queries", "50"]) == 0
    reader = IndexReader.open(out)
    assert sorted(reader.idmap.column("product_id").to_pylist()) == sorted(f"p{i}" for i in range(400))
    manifest = publish.read_manifest(out, publish.latest_version(out))
    assert manifest.counts["skipped"] and manifest.counts["indexed"] == 400
    held = manifest.evaluation["held_out"]
    assert held["queries"] > 0 and held["sweep"][0]["recall@10"] >= 0.95


def test_min_recall_gate_keeps_a_weak_index_unpublished(emb_root, capsys):
    bucket, emb, _, _ = emb_root
    out = bucket + "/index"
    code = cli.main(["build-index", "--embeddings", emb, "--out", out, "--shards", "2", "--factory", "IVF64,PQ8x4fs",
                     "--recall-target", "0.3", "--min-recall", "0.99"])
    captured = capsys.readouterr()
    assert code == 65 and "below --min-recall 0.99" in captured.err and "not published" in captured.err
    assert not storage.exists(out + "/LATEST")


_KILL_BEFORE_POINTER = """
import os, signal, sys
from mimdex.infra.contracts import index_version as publish
publish.point_latest = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
from mimdex.pipelines import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_build_killed_before_the_pointer_leaves_the_previous_version_served(emb_root):
    bucket, emb, x, _ = emb_root
    out = bucket + "/index"
    first = run(BuildConfig(embeddings=emb, out=out, shards=2, eval_queries=200))
    proc = subprocess.run([sys.executable, "-c", _KILL_BEFORE_POINTER, "build-index", "--embeddings", emb,
                           "--out", out, "--shards", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert publish.latest_version(out) == first["version"]
    assert len(publish.list_versions(out)) == 2  # the killed build's version is there, unpublished
    reader = IndexReader.open(out)
    assert reader.version == first["version"] and reader.search(x[100:101], 1)[1].shape == (1, 1)


def test_a_second_publisher_racing_on_the_same_root_gets_a_clear_75(emb_root, monkeypatch, capsys):
    bucket, emb, _, _ = emb_root
    out = bucket + "/index"
    original = publish.point_latest

    def other_publisher_wins_first(*args, **kwargs):
        # a real second process builds and publishes on the same root while we were building
        other = subprocess.run([sys.executable, "-m", "mimdex.pipelines.cli", "build-index", "--embeddings", emb,
                                "--out", out, "--shards", "2"], capture_output=True, text=True, timeout=300)
        assert other.returncode == 0, other.stderr
        return original(*args, **kwargs)

    monkeypatch.setattr(publish, "point_latest", other_publisher_wins_first)
    code = cli.main(["build-index", "--embeddings", emb, "--out", out, "--shards", "2"])
    err = capsys.readouterr().err
    assert code == 75 and "another publisher replaced" in err and "complete but not published" in err
    winner = publish.latest_version(out)
    assert winner in publish.list_versions(out) and len(publish.list_versions(out)) == 2


def test_concurrent_pointer_replacements_have_exactly_one_winner(emb_root):
    from concurrent.futures import ThreadPoolExecutor

    bucket, emb, _, _ = emb_root
    out = bucket + "/index"
    base = run(BuildConfig(embeddings=emb, out=out, shards=1, eval_queries=100))
    _, token = publish.read_latest(out)

    def attempt(_):
        try:
            publish.point_latest(out, base["version"], token, base["version"])
            return "won"
        except storage.ConcurrentUpdate:
            return "lost"

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(attempt, range(6)))
    assert sorted(results) == ["lost"] * 5 + ["won"]


def test_catalog_to_search_end_to_end_through_the_cli(tmp_path):
    from mimdex.pipelines import synth as synth_job
    from mimdex.pipelines.synth import SynthConfig

    data = str(tmp_path / "data")
    synth_job.run(SynthConfig(products=300, queries=40, seed=5), data, workers=2, progress=False)
    titles = storage.parquet_dataset(data + "/catalog").to_table(columns=["title"]).column("title").to_pylist()
    random_bundle(str(tmp_path / "model"), titles, "3-tower")
    mimdex = [sys.executable, "-m", "mimdex.pipelines.cli"]
    enc = subprocess.run(mimdex + ["encode", "--model", str(tmp_path / "model"), "--catalog", data + "/catalog",
                                   "--out", str(tmp_path / "emb"), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert enc.returncode == 0, enc.stderr
    out = str(tmp_path / "index")
    build = subprocess.run(mimdex + ["build-index", "--embeddings", str(tmp_path / "emb"), "--out", out,
                                     "--shards", "3", "--vector", "fused", "--queries", data + "/queries",
                                     "--filter-columns", "category,family", "--runner=DirectRunner"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    report = json.loads(open(build.stdout.strip().splitlines()[-1]).read())
    assert report["published"] and "street" in report["evaluation"] and report["vector"] == "fused"
    assert report["params"]["filter_columns"] == ["category", "family"]
    bad_queries = str(tmp_path / "bad-queries.parquet")
    pq.write_table(pa.table({"query_image": [b"x"], "product_id": ["P1"], "kind": ["shop"]}), bad_queries)
    bad = subprocess.run(mimdex + ["build-index", "--embeddings", str(tmp_path / "emb"), "--out", out + "-q",
                                   "--queries", bad_queries], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 65 and f"queries {bad_queries}: row 0: kind 'shop' is not one of" in bad.stderr, bad.stderr
    for flag, code, message in (("category,size", 65, "no filter column 'size'"),
                                ("title", 2, "'title' cannot be a filter column")):
        bad = subprocess.run(mimdex + ["build-index", "--embeddings", str(tmp_path / "emb"), "--out", out + "-bad",
                                       "--filter-columns", flag], capture_output=True, text=True, timeout=300)
        assert bad.returncode == code and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        if code == 65:
            assert "catalog" in bad.stderr and data + "/catalog/" in bad.stderr   # the file is named

    catalog = storage.parquet_dataset(data + "/catalog").to_table().slice(0, 1).to_pylist()[0]
    (tmp_path / "q.jpg").write_bytes(catalog["image"])
    hit = subprocess.run(mimdex + ["search", "--index", out, "--image", str(tmp_path / "q.jpg"), "--text",
                                   catalog["title"], "-k", "3", "--json"], capture_output=True, text=True, timeout=120)
    assert hit.returncode == 0, hit.stderr
    results = json.loads(hit.stdout)["results"]
    # a catalog product's own image + title is its own fused vector: it comes back first,
    # with the catalog's metadata from the id map
    assert results[0]["product_id"] == catalog["product_id"] and results[0]["category"] == catalog["category"]
    # a filter applies inside the search: k results, each of the other category
    cats = storage.parquet_dataset(data + "/catalog").to_table(columns=["category"]).column("category").to_pylist()
    other = next(c for c in sorted(set(cats)) if c != catalog["category"])
    hit = subprocess.run(mimdex + ["search", "--index", out, "--image", str(tmp_path / "q.jpg"), "-k", "4", "--json",
                                   "--filter", f"category={other}"], capture_output=True, text=True, timeout=120)
    assert hit.returncode == 0, hit.stderr
    got = json.loads(hit.stdout)
    assert [r["category"] for r in got["results"]] == [other] * 4
    assert got["filter"] == {"text": f"category={other}", "rows": cats.count(other)}
    for bad, message in (("size=m", "'size' is not a filter column of this version (it filters on: category, family)"),
                         ("colour=red", "'colour' is not a filter column"),
                         ("family=x", "family holds integers, not 'x'")):
        miss = subprocess.run(mimdex + ["search", "--index", out, "--image", str(tmp_path / "q.jpg"),
                                        "--filter", bad], capture_output=True, text=True, timeout=120)
        assert miss.returncode == 2 and message in miss.stderr and "Traceback" not in miss.stderr, miss.stderr
    ev = subprocess.run(mimdex + ["eval", "--index", out, "--queries", data + "/queries", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.splitlines()[0])
    # `mimdex eval` reports exactly what the quality gate recorded in the version
    gate = report["evaluation"]["queries"]
    assert {k: v for k, v in result.items() if k != "version"} == gate and result["version"] == report["version"]
    assert gate["street_queries"] == 40 and gate["reformulation_queries"] == 20, gate
    assert 0.0 <= gate["recall@1"] <= gate["recall@10"] <= gate["recall@100"] and 0 <= gate["wrong_category@1"] <= 1
    assert {"reform_recall@1_image", "reform_recall@1_image_text"} <= set(gate)
    missing = subprocess.run(mimdex + ["search", "--index", str(tmp_path / "nowhere"), "--image",
                                       str(tmp_path / "q.jpg")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 65 and "no LATEST" in missing.stderr and "Traceback" not in missing.stderr


def test_a_lost_beam_worker_stops_the_build_with_75_and_a_rerun_publishes(tmp_path):
    """The DirectRunner's multi-process mode: an SDK worker SIGKILLed mid-build leaves the
    runner waiting forever; build-index notices that nothing is written any more, stops its
    workers and exits 75; the re-run publishes."""
    import psutil

    from conftest import random_bundle

    model = str(tmp_path / "model")
    sha = random_bundle(model, ["a title"], "3-tower")
    x = clustered(2000)
    write_embeddings(str(tmp_path / "emb"), x, [f"p{i}" for i in range(len(x))], model, sha, parts=8)
    argv = [sys.executable, "-m", "mimdex.pipelines.cli", "build-index", "--embeddings", str(tmp_path / "emb"),
            "--out", str(tmp_path / "index"), "--shards", "2", "--eval-queries", "50", "--stall-timeout", "15",
            "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.time() + 120
    while victim is None and proc.poll() is None and time.time() < deadline:
        for child in psutil.Process(proc.pid).children(recursive=True):
            cmd = child.cmdline()
            if cmd[:1] and cmd[0].endswith("python") and "apache_beam.runners.worker.sdk_worker_main" in cmd:
                victim = child
                break
        time.sleep(0.05)
    assert victim is not None, "no SDK worker seen"
    victim.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert "the Beam job wrote nothing for" in err and "re-run" in err
    assert not storage.exists(str(tmp_path / "index" / "LATEST"))
    done = subprocess.run(argv[:-2], capture_output=True, text=True, timeout=300)  # the default runner
    assert done.returncode == 0, done.stderr[-2000:]
    assert IndexReader.open(str(tmp_path / "index")).ntotal == 2000
