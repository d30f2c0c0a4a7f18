"""`mimdex demo` end to end on a small catalog: S3 path with the HTML report rendered in
a real headless Chromium; --no-s3 re-run reuse; a failing stage named."""
from __future__ import annotations

import contextlib
import io
import os
import socket
from urllib.parse import urlparse

import pytest

from mimdex.infra import storage
from mimdex.pipelines import cli
from mimdex.pipelines.demo import MULTIMODAL_EXAMPLES, STREET_EXAMPLES

SMALL = ["--preset", "tiny", "--products", "200", "--queries", "40", "--epochs", "1", "--shards", "2"]


def _run(capsys, argv):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


@pytest.fixture(scope="module")
def s3_demo(tmp_path_factory):
    """One full default-path demo run (local S3 server, three models)."""
    workdir = tmp_path_factory.mktemp("demo-s3")
    out = io.StringIO()  # a module fixture cannot use capsys
    with contextlib.redirect_stdout(out):
        code = cli.main(["demo", "--workdir", str(workdir), *SMALL])
    return code, out.getvalue().strip().splitlines(), workdir


def test_demo_publishes_to_a_local_s3_server_that_it_stops(s3_demo):
    code, lines, workdir = s3_demo
    assert code == 0
    html, json_uri = lines[-1], lines[-2]
    assert html == str(workdir / "report.html") and os.path.getsize(html) > 10_000
    report = storage.read_json(json_uri)
    endpoint = next(line.split(" on ")[1].split()[0] for line in lines if "local S3 server on" in line)
    host, port = urlparse(endpoint).hostname, urlparse(endpoint).port
    assert host == "127.0.0.1"
    with pytest.raises(OSError):  # stopped when the demo ended
        socket.create_connection((host, port), timeout=1).close()
    assert [r["model"] for r in report["results"]] == ["histogram NN (exact)", "image-only", "3-tower", "4-tower"]
    products = report["dataset"]["products"]
    for variant, facts in report["indexes"].items():
        assert facts["uri"] == f"s3://mimdex-demo/index/{variant}"
        assert facts["vectors"] == products and facts["shards"] == 2
    for r in report["results"]:
        assert 0.0 <= r["recall@1"] <= r["recall@10"] <= 1.0 and 0.0 <= r["wrong_category@1"] <= 1.0
    # Only text-capable models answer image + text queries.
    assert "reform_recall@1_image_text" not in report["results"][1]
    assert "reform_recall@1_image_text" in report["results"][3]
    for stage in ("synth-catalog", "train-4-tower", "upload-catalog", "encode-3-tower", "build-index-image-only",
                  "evaluate"):
        assert report["timings_s"][stage] > 0


def test_demo_report_renders_with_every_image_in_headless_chromium(s3_demo, chromium):
    code, lines, workdir = s3_demo
    assert code == 0
    report = storage.read_json(lines[-2])
    kinds = storage.parquet_dataset(str(workdir / "dataset" / "queries")).to_table(columns=["kind"]).column("kind")
    street = min(STREET_EXAMPLES, kinds.to_pylist().count("street"))
    mm = min(MULTIMODAL_EXAMPLES, kinds.to_pylist().count("reformulation"))
    chromium.get("file://" + lines[-1])
    images = chromium.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    # each example: the query photo + top-5 of two lanes
    assert len(images) == (street + mm) * 11, len(images)
    broken = [alt for alt, complete, w, h in images if not (complete and w > 0 and h > 0)]
    assert broken == []
    text = chromium.find_element("tag name", "body").text
    for row in report["results"]:
        assert row["model"] in text
    for needle in ("Street photo → top 5: image-only vs 3-tower", "Multimodal search (4-tower)",
                   "Indexes published", "Stage timings", "IVF"):
        assert needle in text
    # hit / wrong-category marks are drawn from the search results, one border per tile
    marks = chromium.execute_script(
        "return Array.from(document.querySelectorAll('figure')).map(f => getComputedStyle(f.querySelector('img')).borderTopColor)")
    assert len(marks) == (street + mm) * 10 and len(set(marks)) >= 2


def test_demo_rerun_reuses_complete_work_and_a_failure_names_its_stage(tmp_path, capsys):
    argv = ["demo", "--workdir", str(tmp_path), "--no-s3", "--variants", "3-tower", *SMALL]
    code, lines, _ = _run(capsys, argv)
    assert code == 0
    first = storage.read_json(lines[-2])
    code, lines, _ = _run(capsys, argv)
    assert code == 0
    again = storage.read_json(lines[-2])
    # Same bundle, same published version (nothing retrained, re-encoded or rebuilt).
    assert again["models"] == first["models"]
    assert again["results"] == first["results"]
    assert any("already has version" in line for line in lines)
    assert again["timings_s"]["train-3-tower"] < first["timings_s"]["train-3-tower"] / 3
    # A broken index pointer: the build stage fails, names itself, keeps the work.
    (tmp_path / "index" / "3-tower" / "LATEST").write_text("not json")
    code, lines, err = _run(capsys, argv)
    assert code == 65
    assert "demo stage 'build-index-3-tower' failed" in err and str(tmp_path) in err
    assert (tmp_path / "embeddings" / "3-tower" / "manifest.json").exists()


def test_demo_refuses_unknown_variants(tmp_path, capsys):
    code, _, err = _run(capsys, ["demo", "--workdir", str(tmp_path), "--variants", "2-tower"])
    assert code == 2 and "--variants: unknown 2-tower" in err
