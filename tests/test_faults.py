"""A sustained S3 fault rate: encode -> build-index -> search -> refresh -> compact
through a proxy that fails 10% of requests (503 SlowDown, 500, a dropped connection, and a
write that commits and then loses its answer) and delays 3% more give the same
embeddings, the same index codes and the same search results as a run without faults,
and every job exits 0; botocore's and s3fs's retry settings absorb the failures, storage
recognises its own committed writes, and the job reports count the retries. (The 30% run
is tests/benchmarks/bench_faults.py; the run where every conditional write loses its
answer once is in the slow tier.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dirty_catalog as dc
from conftest import random_bundle
from fault_proxy import FaultProxy
from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts import index_version as iv


def lifecycle(bucket: str, model_src: str, env: dict, products: int = 160) -> dict:
    """The CLI lifecycle on one bucket; what it produced, read back without faults."""
    rows = dc.write_kinds(bucket + "/cat", ["plain"] * products, row_group_size=40)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        storage.write_bytes(f"{bucket}/model/{name}", storage.read_bytes(f"{model_src}/{name}"))
    catalog, model, out, index = bucket + "/cat/catalog.parquet", bucket + "/model", bucket + "/emb", bucket + "/index"
    mimdex = [sys.executable, "-m", "mimdex.pipelines.cli"]
    query = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"q-{os.getpid()}.jpg")
    with open(query, "wb") as f:
        f.write(dc.picture(7))
    reports, searched = {}, None
    steps = [("encode", ["encode", "--model", model, "--catalog", catalog, "--out", out, "--unit-rows", "40",
                         "--no-progress"], 0),
             ("build-index", ["build-index", "--embeddings", out, "--out", index, "--shards", "2",
                              "--eval-queries", "20"], 0),
             ("search", ["search", "--index", index, "--image", query, "-k", "10", "--json"], 0),
             ("edit", None, None),
             ("refresh", ["refresh", "--catalog", catalog, "--model", model, "--embeddings", out, "--index", index,
                          "--unit-rows", "40", "--eval-queries", "20", "--no-progress"], 0),
             ("compact", ["compact", "--index", index], 0)]
    for name, argv, code in steps:
        if argv is None:  # three retitled products for the refresh
            for r in rows[:3]:
                r["title"] += b" (2027)"
            dc.write(bucket + "/cat", rows, {}, row_group_size=40)
            continue
        done = subprocess.run(mimdex + argv, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == code, (name, done.stderr[-3000:])
        if name == "search":
            searched = [r["product_id"] for r in json.loads(done.stdout)["results"]]
        else:
            reports[name] = json.loads(storage.read_bytes(done.stdout.strip().splitlines()[-1]))
    manifest = emb.read_manifest(out)
    parts = emb.read_all(out, manifest)
    latest = iv.read_manifest(index, iv.latest_version(index))
    return {"vectors": dict(zip(parts.column("product_id").to_pylist(),
                                np.array(parts.column("image_emb").to_pylist(), np.float32))),
            # codes byte for byte; id maps by their ids (their image_uri metadata names the bucket)
            "shards": [(s.index.sha256, s.ntotal) for s in latest.shards],
            "ids": [iv.read_shard(iv.version_uri(index, latest.version), s)[1].column("id").to_pylist()
                    for s in latest.shards],
            "trained": latest.trained.sha256, "searched": searched, "reports": reports}


@pytest.fixture(scope="module")
def clean(s3_server, tmp_path_factory):
    from mimdex.infra.local_s3 import create_bucket

    model_src = str(tmp_path_factory.mktemp("model") / "model")
    random_bundle(model_src, ["product title"], "3-tower")
    return model_src, lifecycle(create_bucket(s3_server, "mimdex-clean"), model_src, dict(os.environ))


def faulty_lifecycle(s3_server: str, model_src: str, bucket: str, **faults) -> tuple[dict, FaultProxy]:
    from mimdex.infra.local_s3 import create_bucket

    host, port = s3_server.rsplit("//", 1)[1].split(":")
    proxy = FaultProxy((host, int(port)), **faults)
    with proxy as via:
        faulty = lifecycle(create_bucket(s3_server, bucket), model_src, {**os.environ, "AWS_ENDPOINT_URL_S3": via})
    return faulty, proxy


def same_outcome(faulty: dict, clean: dict) -> None:
    assert faulty["vectors"].keys() == clean["vectors"].keys()
    assert all(np.array_equal(faulty["vectors"][p], clean["vectors"][p]) for p in clean["vectors"])
    assert faulty["shards"] == clean["shards"] and faulty["trained"] == clean["trained"]  # same codes
    assert faulty["ids"] == clean["ids"]
    assert faulty["searched"] == clean["searched"]
    assert faulty["reports"]["refresh"]["diff"]["changed"] == 3
    assert faulty["reports"]["compact"]["delta_segments"] == clean["reports"]["compact"]["delta_segments"] >= 1


@pytest.mark.slow   # 2 min (the clean lifecycle, then the faulty one): it keeps `make test` under 20 min
def test_a_sustained_fault_rate_changes_nothing_but_the_retry_count(s3_server, clean):
    model_src, clean = clean
    faulty, proxy = faulty_lifecycle(s3_server, model_src, "mimdex-faulty", rate=0.10, latency_rate=0.03, seed=1)
    assert proxy.failures >= 20 and set(proxy.injected) == {"slowdown", "internal", "reset", "ambiguous", "latency"}
    assert len(proxy.committed_then_dropped) >= 1  # writes the server made whose answer never came
    same_outcome(faulty, clean)
    retried = {job: sum(r["storage_retries"].values()) for job, r in faulty["reports"].items() if "storage_retries" in r}
    assert sum(retried.values()) >= proxy.failures * 0.5, (retried, proxy.injected)
    assert all(sum(r["storage_retries"].values()) == 0 for r in clean["reports"].values() if "storage_retries" in r)


@pytest.mark.slow
def test_every_conditional_write_that_loses_its_answer_once_is_recognised(s3_server, clean):
    """The operator's case: every create-only PUT (manifests, the refresh lease) and every
    LATEST update commits on the server, then its answer is dropped once.
    Before, build-index exited 75 ("manifest.json already exists (another writer created it
    first)") and refresh 75 on its own lease; now every job exits 0 with the same bytes."""
    model_src, clean = clean
    faulty, proxy = faulty_lifecycle(s3_server, model_src, "mimdex-ambiguous", ambiguous_once="conditional")
    dropped = [path for _, path in proxy.committed_then_dropped]
    for name in ("/manifest.json", "LATEST", "_locks/refresh.json"):
        assert any(name in p for p in dropped), name
    same_outcome(faulty, clean)
