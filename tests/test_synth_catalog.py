"""`mimdex synth-catalog`: contracts, determinism, awkward rows, and the confounder."""
from __future__ import annotations

import collections
import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mimdex.encoders.images import decode_rgb
from mimdex.infra import storage
from mimdex.pipelines import cli
from mimdex.pipelines.demo import evaluate_histogram_nn
from mimdex.pipelines.synth.attributes import CATEGORIES, COLOURS, PATTERNS, Product, product_title
from mimdex.pipelines.synth.rows import LARGE_IMAGE_SIZE

ARGS = ["--products", "2000", "--queries", "500", "--seed", "1", "--no-progress"]


def _files(root: str) -> dict[str, bytes]:
    """Every data file of a dataset (reports carry timings and are excluded)."""
    out = {"manifest.json": storage.read_bytes(storage.join(root, "manifest.json"))}
    for table in ("catalog", "train_pairs", "queries"):
        for uri in storage.list_files(storage.join(root, table)):
            out[uri[len(root) + 1:]] = storage.read_bytes(uri)
    return out


def _table(root: str, name: str) -> list[dict]:
    return storage.parquet_dataset(storage.join(root, name)).to_table().to_pylist()


@pytest.fixture(scope="module")
def s3_dataset(s3_server, tmp_path_factory):
    """The issue's dataset, generated twice on the local S3 server through the CLI."""
    from mimdex.infra.local_s3 import create_bucket

    bucket = create_bucket(s3_server, "mimdex-synth-module")
    first, second = f"{bucket}/cat", f"{bucket}/cat-again"
    outputs = []
    for out in (first, second):
        rc = cli.main(["synth-catalog", "--out", out, *ARGS])
        assert rc == 0
        outputs.append(out)
    return first, second


def test_cli_run_prints_report_uri_last(s3_dataset, capsys, s3_server):
    first, _ = s3_dataset
    rc = cli.main(["synth-catalog", "--out", first, *ARGS])  # same config: reuse, no rewrite
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert "already complete" in lines[-2]
    report = storage.read_json(lines[-1])
    assert lines[-1].startswith(first + "/_reports/synth-catalog-")
    assert report["job"] == "synth-catalog" and report["skipped"] is True


def test_same_seed_gives_byte_identical_files(s3_dataset):
    first, second = s3_dataset
    a, b = _files(first), _files(second)
    assert sorted(a) == sorted(b)
    assert len(a) >= 4
    for name in a:
        assert a[name] == b[name], f"{name} differs between two runs with the same seed"


def test_tables_follow_the_contracts(s3_dataset):
    root = s3_dataset[0]
    manifest = storage.read_json(storage.join(root, "manifest.json"))
    catalog, pairs, queries = (_table(root, t) for t in ("catalog", "train_pairs", "queries"))
    assert len(catalog) == 2000 == manifest["counts"]["products"]
    ids = [r["product_id"] for r in catalog]
    assert len(set(ids)) == len(ids) and all(ids)
    split = {r["product_id"]: r["split"] for r in catalog}
    heldout = {pid for pid, s in split.items() if s == "heldout"}
    assert 0.1 < len(heldout) / len(ids) < 0.3
    # Training pairs only show training products; queries only held-out ones.
    assert {r["product_id"] for r in pairs} <= set(ids) - heldout
    assert {r["source_product_id"] for r in pairs} <= set(ids) - heldout
    assert {r["product_id"] for r in queries} <= heldout
    assert {r["source_product_id"] for r in queries} <= heldout
    kinds = collections.Counter(r["kind"] for r in queries)
    assert kinds == {"street": 500, "reformulation": 250}
    for name, table in (("train_pairs", pairs), ("queries", queries)):
        assert manifest["tables"][name]["rows"] == len(table)
    # Every file the manifest lists exists with the recorded checksum.
    import hashlib
    for table in manifest["tables"].values():
        for f in table["files"]:
            data = storage.read_bytes(storage.join(root, f["path"]))
            assert hashlib.sha256(data).hexdigest() == f["sha256"]


def test_titles_match_attributes_and_text_queries_point_at_the_right_product(s3_dataset):
    root = s3_dataset[0]
    catalog = {r["product_id"]: r for r in _table(root, "catalog")}
    for r in catalog.values():
        p = Product(r["product_id"], r["family"], r["category"], r["colour"], r["pattern"],
                    r["ink"], r["brand"])
        assert r["title"] == product_title(p)
        assert r["category"] in CATEGORIES and r["colour"] in COLOURS and r["pattern"] in PATTERNS
        assert f" {r['colour']} " in r["title"] and r["title"].startswith(r["brand"])
    assert any(not r["title"].isascii() for r in catalog.values()), "no non-ASCII titles"
    for q in _table(root, "queries"):
        target, source = catalog[q["product_id"]], catalog[q["source_product_id"]]
        if q["kind"] == "street":
            assert q["product_id"] == q["source_product_id"]
            assert q["query_text"].endswith(target["category"])
        else:  # a sibling: same family, exactly one attribute differs, named by the text
            assert target["family"] == source["family"]
            diff = (target["colour"] != source["colour"]) + (target["pattern"] != source["pattern"])
            assert diff == 1
            if target["colour"] != source["colour"]:
                assert q["query_text"] == f"in {target['colour']}"
            else:
                assert q["query_text"] in ("plain", f"with {PATTERNS[target['pattern']][0]}")
        assert catalog[q["distractor_product_id"]]["category"] != source["category"]


def test_every_image_decodes_and_awkward_rows_are_present(s3_dataset):
    root = s3_dataset[0]
    modes = collections.Counter()
    large = 0
    for r in _table(root, "catalog"):
        raw = Image.open(io.BytesIO(r["image"]))
        modes[raw.mode] += 1
        large += raw.size == (LARGE_IMAGE_SIZE, LARGE_IMAGE_SIZE)
        rgb = decode_rgb(r["image"])
        assert rgb.mode == "RGB"
    assert modes["RGBA"] >= 10 and modes["L"] >= 10 and modes["RGB"] > 1800
    assert large >= 5
    for name in ("train_pairs", "queries"):
        for r in _table(root, name):
            assert decode_rgb(r["query_image"]).size == (160, 160)


def test_rgba_rows_have_transparent_backgrounds_that_decode_to_white(s3_dataset):
    rgba = [r for r in _table(s3_dataset[0], "catalog") if Image.open(io.BytesIO(r["image"])).mode == "RGBA"]
    img = Image.open(io.BytesIO(rgba[0]["image"]))
    assert img.getpixel((0, 0))[3] == 0  # transparent corner
    assert decode_rgb(rgba[0]["image"]).getpixel((0, 0)) == (255, 255, 255)


def test_the_confounder_is_real(s3_dataset):
    """Histogram NN picks a wrong-category product far more often than the right one,
    and its top-1 carries the background distractor's look rather than the product's."""
    m = evaluate_histogram_nn(s3_dataset[0])
    assert m["street_queries"] == 500
    assert m["wrong_category@1"] >= 0.8
    assert m["wrong_category@1"] >= 10 * max(m["recall@1"], 0.01)
    assert m["top1_has_distractor_look"] >= 3 * max(m["top1_has_own_look"], 0.02)


def test_streams_in_row_groups_and_files(tmp_path):
    out = str(tmp_path / "small")
    from mimdex.pipelines.synth import job
    from mimdex.pipelines.synth import SynthConfig

    cfg = SynthConfig(products=230, queries=10, seed=3, rows_per_file=100, row_group_rows=25)
    job.run(cfg, out, workers=1, progress=False)
    files = storage.list_files(storage.join(out, "catalog"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.parquet", "part-00001.parquet",
                                                     "part-00002.parquet"]
    md = pq.ParquetFile(files[0]).metadata
    assert md.num_rows == 100 and md.num_row_groups == 4
    assert pq.ParquetFile(files[2]).metadata.num_rows == 30


def test_different_seed_differs_and_other_settings_refuse_an_existing_dataset(tmp_path, capsys):
    out = str(tmp_path / "ds")
    assert cli.main(["synth-catalog", "--out", out, "--products", "40", "--queries", "5",
                     "--seed", "1", "--no-progress", "--workers", "1"]) == 0
    rc = cli.main(["synth-catalog", "--out", out, "--products", "40", "--queries", "5",
                   "--seed", "2", "--no-progress", "--workers", "1"])
    assert rc == 2
    assert "already holds a dataset made with other settings" in capsys.readouterr().err
    other = str(tmp_path / "ds2")
    assert cli.main(["synth-catalog", "--out", other, "--products", "40", "--queries", "5",
                     "--seed", "2", "--no-progress", "--workers", "1"]) == 0
    assert _files(out)["catalog/part-00000.parquet"] != _files(other)["catalog/part-00000.parquet"]


def test_a_run_without_manifest_is_cleared_before_rewriting(tmp_path):
    from mimdex.pipelines.synth import job
    from mimdex.pipelines.synth import SynthConfig

    out = str(tmp_path / "ds")
    stale = storage.join(out, "catalog", "part-00007.parquet")
    storage.write_bytes(stale, b"left over by a killed run")
    job.run(SynthConfig(products=40, queries=5, seed=1), out, workers=1, progress=False)
    assert not storage.exists(stale)
    assert len(_table(out, "catalog")) == 40


@pytest.mark.parametrize("flag,value,message", [
    ("--products", "5", "--products must be at least 20"),
    ("--queries", "0", "--queries must be at least 1"),
    ("--image-size", "8", "--image-size must be in"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, flag, value, message):
    args = {"--products": "40", "--queries": "5", "--image-size": "160"}
    args[flag] = value
    argv = ["synth-catalog", "--out", str(tmp_path / "x"), "--no-progress"]
    for k, v in args.items():
        argv += [k, v]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
