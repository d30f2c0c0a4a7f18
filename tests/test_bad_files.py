"""Unreadable files and misspelt flags: every command exits 65 naming the bad file (or 2
naming the bad flag), never with a traceback. Local directories, Beam's DirectRunner."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import random_bundle
from mimdex.encoders.bundle import load_bundle
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts.model import ModelRef
from mimdex.pipelines import cli


def _parquet(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A model, a catalog, embeddings and a published index, all on a local disk."""
    root = tmp_path_factory.mktemp("world")
    model = str(root / "model")
    random_bundle(model, ["red mug"], "3-tower")
    enc = load_bundle(model)
    x = np.random.default_rng(0).standard_normal((400, enc.cfg.embed_dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ref = ModelRef(model, enc.sha256, "3-tower", enc.cfg.embed_dim, True)
    emb.write_vectors(str(root / "emb"), x, [f"p{i}" for i in range(400)], ref, "float16", 2)
    assert cli.main(["build-index", "--embeddings", str(root / "emb"), "--out", str(root / "index"),
                     "--shards", "2", "--eval-queries", "50"]) == 0
    return root


def _run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_a_catalog_that_is_not_parquet_is_65_naming_it(built, tmp_path, capsys):
    bad = tmp_path / "catalog.parquet"
    bad.write_bytes(b"product_id,title\n1,mug\n")
    code, err = _run(capsys, "encode", "--model", str(built / "model"), "--catalog", str(bad), "--out",
                     str(tmp_path / "emb"), "--no-progress")
    assert code == 65 and str(bad) in err and "not a readable Parquet" in err

    # a directory with one good file and one truncated: the truncated one is named
    (tmp_path / "cat").mkdir()
    good = _parquet(pa.table({"product_id": ["a"], "title": ["t"], "image": [b"x"]}))
    (tmp_path / "cat" / "part-0.parquet").write_bytes(good)
    (tmp_path / "cat" / "part-1.parquet").write_bytes(good[: len(good) // 2])
    for argv in (("encode", "--model", str(built / "model"), "--catalog", str(tmp_path / "cat"), "--out",
                  str(tmp_path / "emb"), "--no-progress"),
                 ("refresh", "--catalog", str(tmp_path / "cat"), "--model", str(built / "model"), "--embeddings",
                  str(tmp_path / "emb2"), "--index", str(tmp_path / "idx2"), "--no-progress")):
        code, err = _run(capsys, *argv)
        assert code == 65 and "part-1.parquet" in err, (argv[0], err)


def test_a_catalog_with_a_wrong_schema_is_65_naming_column_and_file(built, tmp_path, capsys):
    (tmp_path / "c.parquet").write_bytes(_parquet(pa.table({"product_id": ["a"], "image": [b"x"]})))
    code, err = _run(capsys, "encode", "--model", str(built / "model"), "--catalog", str(tmp_path / "c.parquet"),
                     "--out", str(tmp_path / "emb"), "--no-progress")
    assert code == 65 and "missing required column 'title'" in err and "c.parquet" in err


def _copy_emb(built, tmp_path) -> str:
    import shutil

    shutil.copytree(built / "emb", tmp_path / "emb")
    return str(tmp_path / "emb")


def test_an_embeddings_part_that_is_not_parquet_is_65_naming_it(built, tmp_path, capsys):
    root = _copy_emb(built, tmp_path)
    part = tmp_path / "emb" / "part-00001.parquet"
    # a valid part file, but not the one the manifest lists: its checksum is refused
    part.write_bytes((tmp_path / "emb" / "part-00000.parquet").read_bytes())
    code, err = _run(capsys, "build-index", "--embeddings", root, "--out", str(tmp_path / "i"))
    assert code == 65 and "part-00001.parquet" in err and "sha256 does not match" in err
    # not Parquet at all (whatever the manifest says)
    garbage = b"PAR1 this is not a part"
    part.write_bytes(garbage)
    code, err = _run(capsys, "build-index", "--embeddings", root, "--out", str(tmp_path / "i"))
    assert code == 65 and "part-00001.parquet" in err and "not a readable Parquet file" in err
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    manifest["parts"][1]["part"].update(sha256=hashlib.sha256(garbage).hexdigest(), bytes=len(garbage))
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps(manifest))
    code, err = _run(capsys, "build-index", "--embeddings", root, "--out", str(tmp_path / "i"))
    assert code == 65 and "part-00001.parquet" in err and "not a readable Parquet file" in err
    (tmp_path / "emb" / "manifest.json").write_text("{not json")
    code, err = _run(capsys, "build-index", "--embeddings", root, "--out", str(tmp_path / "i"))
    assert code == 65 and "manifest.json is not valid JSON" in err


def test_a_damaged_index_file_is_65_naming_it_in_search_and_eval(built, tmp_path, capsys):
    import shutil

    shutil.copytree(built / "index", tmp_path / "index")
    index = str(tmp_path / "index")
    version = json.loads((tmp_path / "index" / "LATEST").read_text())["version"]
    (tmp_path / "index" / "versions" / version / "shard-00001.ids.parquet").write_bytes(b"garbage")
    img = tmp_path / "q.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)
    code, err = _run(capsys, "search", "--index", index, "--image", str(img))
    assert code == 65 and "shard-00001.ids.parquet" in err
    (tmp_path / "q.parquet").write_bytes(b"not parquet")
    code, err = _run(capsys, "eval", "--index", str(built / "index"), "--queries", str(tmp_path / "q.parquet"))
    assert code == 65 and "q.parquet" in err and "not a readable Parquet" in err
    (tmp_path / "index" / "LATEST").write_text("[]")
    code, err = _run(capsys, "search", "--index", index, "--image", str(img))
    assert code == 65 and "LATEST" in err and "not a mimdex LATEST pointer" in err


@pytest.mark.parametrize("flags,bad", [(["--shardz", "2"], "--shardz"), (["--shard", "2"], "--shard"),
                                       (["--", "--no_such_beam_option=1"], "--no_such_beam_option=1")])
def test_a_misspelt_or_abbreviated_flag_is_exit_2_naming_it(flags, bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["build-index", "--embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "i"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"unrecognized arguments: {bad}" in err and "Beam pipeline option" in err


def test_beam_options_pass_through_only_when_beam_knows_them(tmp_path, capsys):
    # known to Beam, before or after `--`: accepted (then the missing embeddings are exit 65)
    for flags in (["--direct_num_workers=1"], ["--", "--direct_running_mode=in_memory"]):
        code, err = _run(capsys, "build-index", "--embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "i"),
                         *flags)
        assert code == 65 and "no manifest.json" in err
    opts = tmp_path / "beam.options"
    opts.write_text("--runner=DirectRunner\n--job_nmae=typo\n")
    code, err = _run(capsys, "build-index", "--embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "i"),
                     "--beam-options-file", str(opts))
    assert code == 2 and str(opts) in err and "--job_nmae=typo" in err
