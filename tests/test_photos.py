"""Products with several photos (docs/contracts.md, "Photos"), on a real local Ray and
Beam's DirectRunner: photo-level rejects, refreshes that re-encode exactly the changed
photos, indexes that hold every photo, and searches that return distinct products."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import random_bundle
from mimdex.indexing.collapse import ProductOf, collapse
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.infra.contracts import catalog, photos
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts.vectors import column_matrix, ids_for
from mimdex.infra.errors import DataError
from mimdex.pipelines import cli
from mimdex.pipelines import synth as synth_job
from mimdex.pipelines.build_index import BuildConfig
from mimdex.pipelines.build_index import run as build
from mimdex.pipelines.encode import EncodeConfig
from mimdex.pipelines.encode import run as encode
from mimdex.pipelines.refresh import RefreshConfig, run
from mimdex.pipelines.synth import SynthConfig


# ------------------------------------------------------------------ pure rules

def _brute_collapse(scores, ids, products, k):
    out = []
    for srow, irow, prow in zip(scores, ids, products):
        seen, row = set(), []
        for s, i, p in zip(srow, irow, prow):
            if i >= 0 and p not in seen:
                seen.add(p)
                row.append((float(s), int(i), int(p)))
        out.append(row[:k])
    return out


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_collapse_keeps_each_products_best_photo_in_order(q, m, k, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 40, (q, m)).astype(np.int64)
    ids[rng.random((q, m)) < 0.15] = -1                     # searches short of results
    products = ids // 4                                      # four photos per product
    scores = np.sort(rng.random((q, m)).astype(np.float32), axis=1)[:, ::-1]  # best first
    s, i, p, found = collapse(scores, ids, products, k)
    for row, want in enumerate(_brute_collapse(scores, ids, products, k)):
        assert found[row] == len(want)
        assert [(int(x), int(y)) for x, y in zip(i[row, :found[row]], p[row, :found[row]])] == \
            [(x, y) for _, x, y in want]
        assert np.allclose(s[row, :found[row]], [v for v, _, _ in want])
        assert (i[row, found[row]:] == -1).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 2**31 - 1), st.booleans())
def test_product_lookup_equals_a_binary_search(n, seed, clustered):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**63 - 1, n, dtype=np.int64)
    if clustered:  # many ids in one bucket: slower, still exact
        ids[: n // 2] = rng.integers(0, 2**20, n // 2)
    ids = np.unique(ids)
    products = rng.integers(0, 50, len(ids)).astype(np.int64)
    known = rng.choice(ids, 100) if len(ids) else np.zeros(0, np.int64)
    probe = np.concatenate([known, rng.integers(0, 2**63 - 1, 50, dtype=np.int64), [-1, -1]]).reshape(-1, 2)
    lookup = dict(zip(ids.tolist(), products.tolist()))
    want = np.array([lookup.get(i, -1) for i in probe.ravel().tolist()]).reshape(probe.shape)
    assert (ProductOf(ids, products)(probe) == want).all()


def test_photo_ids_and_product_state():
    key = int(ids_for(["P1"])[0])
    assert photos.photo_id(key, 0) == key                   # a one-photo product keeps its product id
    assert len({photos.photo_id(key, p) for p in range(16)}) == 16
    assert photos.product_state(["a", "b"]) != photos.product_state(["b", "a"])
    assert photos.bounded(list(range(20))) == (list(range(16)), 4)


def test_list_columns_of_the_wrong_type_are_refused_naming_file_and_column(tmp_path):
    uri = str(tmp_path / "c.parquet")
    pq.write_table(pa.table({"product_id": ["a"], "title": ["t"], "images": pa.array([[1, 2]], pa.list_(pa.int64()))}),
                   uri)
    with pytest.raises(DataError, match=r"c\.parquet: column 'images' has type list<element: int64>; expected "
                                        r"list<binary>"):
        catalog.read_columns(uri)
    schema = pa.schema([("product_id", pa.string()), ("title", pa.string()), ("image_uris", pa.list_(pa.string()))])
    assert catalog.check_schema("x", schema) == catalog.Columns("image_uris", "string")
    with pytest.raises(DataError, match=r"x: column 'image_versions' has type list<item: int64>; expected "
                                        r"list<string>: each photo's sha256 or version"):
        catalog.check_schema("x", schema.append(pa.field("image_versions", pa.list_(pa.int64()))))


# ------------------------------------------------------------------ a mixed catalog, end to end

@pytest.fixture(scope="module")
def views(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("views"))
    synth_job.run(SynthConfig(products=40, queries=4, seed=5, image_size=64, views=4), data, workers=2, progress=False)
    return storage.parquet_dataset(data + "/catalog").to_table().to_pylist()


def _rejpeg(data: bytes, quality: int) -> bytes:
    """The same picture as other bytes: a 'new photo' a test model embeds in-distribution."""
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def _write(root: str, rows: list[dict]) -> None:
    """The catalog as image_uris: each photo a file under <root>/photos (relative URIs)."""
    out = []
    for r in rows:
        uris = None
        if r["photos"] is not None:
            uris = []
            for k, data in enumerate(r["photos"]):
                if data is None or isinstance(data, str):
                    uris.append(data)  # a null, or a URI given as is (a missing file)
                    continue
                name = f"photos/{r['product_id']}-{k}-{len(data)}.jpg"
                path = os.path.join(root, name)
                # an unchanged photo is not written again: on a disk its mtime is its fingerprint
                if not (os.path.exists(path) and open(path, "rb").read() == data):
                    storage.write_bytes(path, data)
                uris.append(name)
        out.append({"product_id": r["product_id"], "title": r["title"], "image_uris": uris})
    schema = pa.schema([("product_id", pa.string()), ("title", pa.string()), ("image_uris", pa.list_(pa.string()))])
    pq.write_table(pa.Table.from_pylist(out, schema), os.path.join(root, "catalog.parquet"), row_group_size=16)


def _mixed(views: list[dict]) -> tuple[list[dict], dict]:
    rows = [{"product_id": v["product_id"], "title": v["title"], "photos": list(v["images"])} for v in views]
    by_len = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["photos"]), i))
    a, b, c, d = (rows[i]["product_id"] for i in by_len[:4])          # products with the most photos
    one = next(r["product_id"] for r in rows if len(r["photos"]) == 1)
    special = {"A": a, "B": b, "C": c, "D": d, "one": one}
    rows = {r["product_id"]: r for r in rows}
    rows[d]["photos"][1] = b"\xff\xd8 not really a jpeg"             # a corrupt second photo
    e, f, g, h = [p for p in rows if p not in special.values()][:4]
    rows[e]["photos"] = []                                            # an empty list
    base = rows[f]["photos"][0]
    rows[f]["photos"] = [_rejpeg(base, 60 + q) for q in range(18)]    # more than MAX_PHOTOS
    rows[g]["photos"] = rows[g]["photos"][:1] + [None]                # a null photo
    rows[h]["photos"] = rows[h]["photos"][:1] + ["photos/missing.jpg"]  # a URI with nothing behind it
    special.update(E=e, F=f, G=g, H=h)
    return list(rows.values()), special


def _reject_set(root: str) -> set:
    rej = emb.read_all(root, emb.read_manifest(root), "rejects")
    return set(zip(rej.column("product_id").to_pylist(), rej.column("photo").to_pylist(),
                   rej.column("reason").to_pylist()))


def _photo_rows(root: str) -> dict:
    """product_id -> [(photo, content_hash, image vector bytes)] of the current embeddings."""
    table = emb.read_all(root, emb.read_manifest(root), "part")
    vec = column_matrix(table, "image_emb")
    out: dict = {}
    for i, (p, ph, h) in enumerate(zip(table.column("product_id").to_pylist(), table.column("photo").to_pylist(),
                                       table.column("content_hash").to_pylist())):
        out.setdefault(p, []).append((ph, h, vec[i].tobytes()))
    return out


def test_a_mixed_catalog_through_encode_build_refresh_and_search(tmp_path, views, local_ray, capsys):
    rows, s = _mixed(views)
    cat = str(tmp_path / "cat")
    _write(cat, rows)
    random_bundle(str(tmp_path / "model"), [r["title"] for r in rows], "3-tower")
    cfg = RefreshConfig(catalog=cat + "/catalog.parquet", model=str(tmp_path / "model"),
                        embeddings=str(tmp_path / "emb"), index=str(tmp_path / "index"), shards=3, unit_rows=16,
                        eval_queries=20, progress=False)
    first = encode(EncodeConfig(model=cfg.model, catalog=cfg.catalog, out=cfg.embeddings, unit_rows=16,
                                progress=False)).report
    build(BuildConfig(embeddings=cfg.embeddings, out=cfg.index, shards=3, eval_queries=20))

    # photo-level rejects, exactly; the products keep their good photos
    assert _reject_set(cfg.embeddings) == {(s["D"], 1, "image_corrupt"), (s["E"], None, "image_missing"),
                                           (s["G"], 1, "image_missing"), (s["H"], 1, "image_uri_unreachable")}
    assert first["counts"]["photos"] == {"photos_encoded": sum(len(r["photos"]) for r in rows) - 2 - 3,
                                         "photos_reused": 0, "photos_cut": 2, "products_cut": 1}
    before = _photo_rows(cfg.embeddings)
    assert [ph for ph, _, _ in before[s["D"]]] == [p for p in range(len(before[s["D"]]) + 1) if p != 1]
    assert [ph for ph, _, _ in before[s["F"]]] == list(range(16)) and s["E"] not in before

    reader = IndexReader.open(cfg.index)
    assert reader.manifest.photos == "every"
    assert reader.ntotal == sum(len(v) for v in before.values()) and reader.products == len(rows) - 1
    _assert_distinct(reader, cfg.embeddings)

    # a photo added (A), one removed (B), the list reordered (C), the title changed (T)
    old = {r["product_id"]: list(r["photos"]) for r in rows}
    by_id = {r["product_id"]: r for r in rows}
    by_id[s["A"]]["photos"].append(_rejpeg(old[s["A"]][0], 55))
    del by_id[s["B"]]["photos"][1]
    by_id[s["C"]]["photos"].reverse()
    retitled = next(p for p in by_id if p not in s.values() and len(old[p]) >= 2)
    by_id[retitled]["title"] += " (2027 edition)"
    _write(cat, rows)
    second = run(cfg)
    assert second["diff"]["changed"] == 4 and second["diff"]["new"] == second["diff"]["deleted"] == 0
    assert second["decision"].startswith("incremental")
    reused = len(old[s["A"]]) + len(old[s["B"]]) - 1 + len(old[s["C"]]) + len(old[retitled])
    assert second["encode"]["photos"] == {"photos_encoded": 1, "photos_reused": reused, "photos_cut": 0,
                                          "products_cut": 0}
    after = _photo_rows(cfg.embeddings)
    changed = (s["A"], s["B"], s["C"], retitled)
    assert {p: v for p, v in after.items() if p not in changed} == {p: v for p, v in before.items() if p not in changed}
    # a new title: new content hashes (the state), the same image vectors (copied)
    assert [v for _, _, v in after[retitled]] == [v for _, _, v in before[retitled]]
    assert all(a[1] != b[1] for a, b in zip(after[retitled], before[retitled]))
    n_c = len(before[s["C"]])
    # reordered: the same vectors and hashes, at mirrored positions (copied, not re-encoded)
    assert sorted(after[s["C"]]) == sorted((n_c - 1 - ph, h, v) for ph, h, v in before[s["C"]])
    assert [(h, v) for _, h, v in after[s["B"]]] == [(h, v) for ph, h, v in before[s["B"]] if ph != 1]
    assert after[s["A"]][:-1] == before[s["A"]] and after[s["A"]][-1][0] == len(old[s["A"]])

    reader = IndexReader.open(cfg.index)
    photos_of = {}
    for p, ph in zip(reader.idmap.column("product_id").to_pylist(), reader.idmap.column("photo").to_pylist()):
        photos_of.setdefault(p, []).append(ph)
    assert sorted(photos_of[s["B"]]) == list(range(len(old[s["B"]]) - 1))
    assert sorted(photos_of[s["A"]]) == list(range(len(old[s["A"]]) + 1))
    _assert_distinct(reader, cfg.embeddings)

    # mimdex search --json: distinct products, each with the photo (and its URI) that matched
    photo = os.path.join(cat, "photos", sorted(os.listdir(os.path.join(cat, "photos")))[0])
    capsys.readouterr()
    assert cli.main(["search", "--index", cfg.index, "--image", photo, "-k", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out.splitlines()[0])["results"]
    assert len({r["product_id"] for r in results}) == len(results) == 5
    assert all(isinstance(r["photo"], int) and r["image_uri"].endswith(".jpg") for r in results)

    # unchanged since: nothing to do (the corrupt, null and missing photos stay rejected)
    assert run(cfg).get("nothing_to_do") is True


def test_per_photo_versions_mean_no_head_and_a_new_version_is_a_change(tmp_path, views, local_ray):
    """An image_uris catalog with ``image_versions`` (a version per photo; one null): the
    diff HEADs only the photo without a version and lists nothing; a new version of a photo
    is a change, and what encode records agrees with the diff (nothing to do afterwards)."""
    rows = [{"product_id": v["product_id"], "title": v["title"], "photos": list(v["images"])}
            for v in views if len(v["images"]) >= 2][:10]
    cat = str(tmp_path / "cat")

    def write(versions: dict) -> None:
        _write(cat, rows)
        table = pq.read_table(os.path.join(cat, "catalog.parquet"))
        table = table.append_column("image_versions", pa.array(
            [versions[r["product_id"]] for r in rows], pa.list_(pa.string())))
        pq.write_table(table, os.path.join(cat, "catalog.parquet"), row_group_size=16)

    versions = {r["product_id"]: [f"v1-{k}" for k in range(len(r["photos"]))] for r in rows}
    unversioned = rows[0]["product_id"]
    versions[unversioned][1] = None
    write(versions)
    random_bundle(str(tmp_path / "model"), [r["title"] for r in rows], "3-tower")
    cfg = RefreshConfig(catalog=cat + "/catalog.parquet", model=str(tmp_path / "model"),
                        embeddings=str(tmp_path / "emb"), index=str(tmp_path / "index"), shards=2, unit_rows=16,
                        eval_queries=10, progress=False)
    assert run(cfg)["decision"].startswith("first run")
    quiet = run(cfg)
    assert quiet.get("nothing_to_do") and quiet["read"]["image_heads"] == 1 and quiet["read"]["image_lists"] == 0

    # a new photo under a new version (re-encoded), and a new version of unchanged bytes (a
    # change by the catalog's word; the bytes' vector is copied, not encoded again)
    renewed, relabelled = rows[1]["product_id"], rows[2]["product_id"]
    rows[1]["photos"][0] = _rejpeg(rows[1]["photos"][0], 50)
    versions[renewed][0], versions[relabelled][1] = "v2-0", "v2-1"
    write(versions)
    night = run(cfg)
    assert night["diff"]["changed"] == 2 and night["read"]["image_heads"] == 1
    assert night["encode"]["photos"]["photos_encoded"] == 1
    assert night["encode"]["photos"]["photos_reused"] == len(rows[1]["photos"]) - 1 + len(rows[2]["photos"])
    assert run(cfg).get("nothing_to_do")


def _assert_distinct(reader: IndexReader, root: str, k: int = 10) -> None:
    """Each query returns k distinct products, its own product first with the photo it is."""
    table = emb.read_all(root, emb.read_manifest(root), "part")
    x = column_matrix(table, "image_emb")
    scores, ids, keys = reader.search_distinct(x, k, reader.nlist)
    for row in range(len(x)):
        assert len(set(keys[row].tolist())) == k and (ids[row] >= 0).all()
    assert (keys[:, 0] == ids_for(table.column("product_id").to_pylist())).mean() >= 0.95
    results = reader.search_products(x[:3], k)
    for res, pid, ph in zip(results, table.column("product_id").to_pylist(), table.column("photo").to_pylist()):
        assert len({r["product_id"] for r in res}) == len(res) == k
        assert res[0]["product_id"] == pid and res[0]["photo"] == ph and res[0]["image_uri"].endswith(".jpg")


# ------------------------------------------------------------------ single-image catalogs, training, synth, demo

def test_single_image_parts_and_rejects_keep_their_schema(tmp_path):
    """A catalog with one image per product writes exactly what it wrote before photos."""
    from mimdex.infra.contracts.model import ModelRef

    model = ModelRef("m", "0" * 64, "3-tower", 4, True)
    table = emb.part_table(model, "float16", "part-00000", "f", ["a"], ["h"], np.ones((1, 4)), np.ones((1, 4)))
    assert table.schema.names == ["product_id", "image_emb", "text_emb", "content_hash"]
    emb.write_part(str(tmp_path), "part-00000", table, [{"product_id": "b", "reason": "title_empty", "detail": "",
                                                         "source": "c", "row": 1, "content_hash": "x"}])
    assert pq.read_schema(tmp_path / "rejects" / "part-00000.parquet").names == catalog.REJECT_SCHEMA.names
    multi = emb.part_table(model, "float16", "p", "f", ["a", "a"], ["h", "i"], np.ones((2, 4)), np.ones((2, 4)),
                           [0, 2], ["s0", "s2"])
    assert multi.schema.names == ["product_id", "photo", "image_emb", "text_emb", "content_hash", "photo_sha256"]


def test_training_draws_the_positive_from_any_photo():
    from mimdex.encoders.train_data import TrainData

    view_start = np.array([0, 1, 4, 6])                     # products of 1, 3 and 2 photos
    views = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1) * np.ones((6, 2, 2, 3), np.uint8)
    empty = np.zeros(0, np.int64)
    data = TrainData(["a", "b", "c"], ["t"] * 3, [None] * 3, views[view_start[:-1]], empty, empty, views[:0], [],
                     empty, views[:0], [], empty, views[:0], views, view_start)
    rng = np.random.default_rng(0)
    drawn = {p: set() for p in range(3)}
    for _ in range(200):
        picked = data.product_views(np.array([0, 1, 2, 1]), rng)[:, 0, 0, 0]
        for p, v in zip([0, 1, 2, 1], picked.tolist()):
            drawn[p].add(v)
    assert drawn == {0: {0}, 1: {1, 2, 3}, 2: {4, 5}}


def test_synth_views_are_deterministic_and_bounded(tmp_path, views):
    counts = [len(v["images"]) for v in views]
    assert min(counts) == 1 and max(counts) == 4 and all(v["views"][0] == "main" for v in views)
    assert all(len(v["views"]) == len(v["images"]) == len(set(v["views"])) for v in views)
    again = str(tmp_path / "again")
    synth_job.run(SynthConfig(products=40, queries=4, seed=5, image_size=64, views=4), again, workers=1,
                  progress=False)
    assert storage.parquet_dataset(again + "/catalog").to_table().to_pylist() == views
    with pytest.raises(Exception, match=r"--views must be in \[1, 4\]"):
        SynthConfig(products=40, queries=4, seed=5, views=5).validate()


def test_the_demo_report_shows_which_view_matched():
    from mimdex.pipelines.demo.evaluation import Catalog, marked
    from mimdex.pipelines.demo.html_report import _tiles

    q = Catalog({"P1": "mug", "P2": "vase"}, {})
    rows = [{"product_id": "P1", "photo": 2, "views": ["main", "crop", "background"], "title": "a mug", "score": 0.9,
             "category": "mug"},
            {"product_id": "P2", "photo": 0, "views": ["main"], "title": "a vase", "score": 0.5, "category": "vase"}]
    shown = marked(rows, "P1", q)
    assert [(r["photo"], r["view"]) for r in shown] == [(2, "background"), (0, "main")]
    html = _tiles(shown, {"P1#2": b"x", "P2#0": b"y"})
    assert "[background]" in html and "[main]" in html


def test_inline_photos_encode_and_a_reorder_costs_no_encoding(tmp_path, views, local_ray):
    cat = str(tmp_path / "catalog.parquet")
    table = pa.Table.from_pylist(views)
    pq.write_table(table, cat, row_group_size=16)
    random_bundle(str(tmp_path / "model"), table.column("title").to_pylist(), "image-only")
    cfg = RefreshConfig(catalog=cat, model=str(tmp_path / "model"), embeddings=str(tmp_path / "emb"),
                        index=str(tmp_path / "index"), shards=2, unit_rows=16, eval_queries=20, progress=False)
    first = run(cfg)
    total = sum(len(v["images"]) for v in views)
    assert first["encode"]["photos"]["photos_encoded"] == total and not _reject_set(cfg.embeddings)
    assert IndexReader.open(cfg.index).idmap.column("views").type == pa.list_(pa.string())
    multi = next(i for i, v in enumerate(views) if len(v["images"]) >= 3)
    rows = [dict(v) for v in views]
    rows[multi]["images"] = rows[multi]["images"][::-1]
    rows[multi]["views"] = rows[multi]["views"][::-1]
    pq.write_table(pa.Table.from_pylist(rows, table.schema), cat, row_group_size=16)
    second = run(cfg)
    assert second["diff"]["changed"] == 1
    assert second["encode"]["photos"] == {"photos_encoded": 0, "photos_reused": len(rows[multi]["images"]),
                                          "photos_cut": 0, "products_cut": 0}
