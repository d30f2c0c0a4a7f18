"""The published index as serving reads it: attribute filters inside the IVF scan (faiss
IDSelectorBitmap over id-map rows), re-ranking in faiss's IndexRefine, and versions mapped
from a local cache. Real faiss, the Beam DirectRunner, seeded data with a category at 50%,
5% and 0.5% selectivity."""
from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_bundle
from mimdex.indexing import filters, mapped, reader as reader_mod
from mimdex.indexing.reader import IndexReader, set_nprobe
from mimdex.indexing.rerank import rerank
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.contracts.vectors import ids_for
from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_delta
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.vectors import shard_of
from mimdex.infra.errors import DataError, UsageError
from mimdex.pipelines.build_index import BuildConfig, run

D, N = 64, 20000
SELECTIVE = {"category=common": 0.5, "category=niche": 0.05, "category=rare": 0.005}


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((50, D)).astype(np.float32)
    x = centers[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("filters")
    x = _clustered(N, 0)
    rng = np.random.default_rng(1)
    u = rng.random(N)
    category = np.where(u < 0.005, "rare", np.where(u < 0.055, "niche", np.where(u < 0.555, "common", "other")))
    pids = [f"p{i:06d}" for i in range(N)]
    meta = pa.table({"product_id": pids, "category": category, "in_stock": rng.random(N) < 0.7,
                     "family": pa.array(rng.integers(0, 100, N), pa.int32())})
    model = str(tmp / "model")
    sha = random_bundle(model, ["t"])
    emb.write_vectors(str(tmp / "emb"), x, pids, ModelRef(model, sha, "3-tower", D, True), "float32", 6,
                      metadata=meta)
    outs = {}
    for name, factory in (("sq8", None), ("refine", "IVF256,PQ32x4fs,Refine(SQ8)")):
        outs[name] = str(tmp / f"index-{name}")
        run(BuildConfig(embeddings=str(tmp / "emb"), out=outs[name], shards=3, eval_queries=200,
                        filter_columns=COLUMNS, **({"factory": factory} if factory else {})))
    noise = 0.05 * np.random.default_rng(9).standard_normal((300, D)).astype(np.float32)
    q = x[::N // 300][:300] + noise
    return x, meta, outs, q / np.linalg.norm(q, axis=1, keepdims=True)


COLUMNS = ("category", "in_stock", "family")


def _exact_filtered(x, meta, flt, q, k=10):
    keep = filters.mask(meta, filters.parse(flt), COLUMNS)
    rows = np.flatnonzero(keep)
    _, nn = faiss.knn(q, x[rows], min(k, len(rows)))
    return ids_for(meta.column("product_id").to_pylist())[rows][nn]


@pytest.mark.parametrize("name", ["sq8", "refine"])
def test_every_result_satisfies_the_filter_k_come_back_and_recall_holds_at_each_selectivity(built, name):
    x, meta, outs, q = built
    reader = IndexReader.open(outs[name])
    by_id = dict(zip(ids_for(meta.column("product_id").to_pylist()).tolist(), range(N)))
    for flt, share in SELECTIVE.items():
        want = _exact_filtered(x, meta, flt, q)
        for exact_share in (0.0, 1e9, reader_mod.EXACT_SHARE):   # the IVF scan, exact search, the default switch
            reader._selections.clear()
            reader_mod.EXACT_SHARE, saved = exact_share, reader_mod.EXACT_SHARE
            try:
                scores, ids = reader.search(q, 10, filter=flt)
            finally:
                reader_mod.EXACT_SHARE = saved
            rows = np.array([by_id[i] for i in ids.ravel()])
            assert (meta.column("category").to_numpy(zero_copy_only=False)[rows] == flt.split("=")[1]).all()
            assert (ids >= 0).all() and (np.diff(scores, axis=1) <= 1e-6).all()       # k each, best first
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), want.tolist())])
            # the IVF scan forced below the switch (not what a search does) may miss a little more
            floor = 0.9 if exact_share == 0.0 and share < 0.05 else 0.95
            assert recall >= floor, (name, flt, exact_share, recall)


def test_a_filter_with_fewer_rows_than_k_returns_exactly_them_and_none_returns_nothing(built):
    x, meta, outs, q = built
    reader = IndexReader.open(outs["refine"])
    flt = "category=rare,in_stock=true,family=0..4"
    expected = set(ids_for(meta.filter(filters.mask(meta, filters.parse(flt), COLUMNS)).column("product_id").to_pylist()).tolist())
    assert 0 < len(expected) < 10
    for exact_share in (0.0, 1e9):
        reader._selections.clear()
        reader_mod.EXACT_SHARE, saved = exact_share, reader_mod.EXACT_SHARE
        try:
            scores, ids = reader.search(q[:20], 10, filter=flt)
        finally:
            reader_mod.EXACT_SHARE = saved
        for row, srow in zip(ids, scores):
            assert set(row[row >= 0].tolist()) == expected and (row[len(expected):] == -1).all()
            assert np.isinf(srow[len(expected):]).all()
    _, ids = reader.search(q[:5], 10, filter="family>=100")
    assert (ids == -1).all()
    products = reader.search_products(q[:3], 4, filter="category=niche,in_stock=false")
    assert all(len(r) == 4 and all(p["category"] == "niche" and p["in_stock"] is False for p in r) for r in products)
    # shards searched apart (one coarse quantisation, merged) filter the same way
    split = IndexReader.open(outs["refine"], consolidate=False)
    for flt in ("category=niche,in_stock=false", "category=common"):
        assert (split.search(q[:50], 10, filter=flt)[1] == reader.search(q[:50], 10, filter=flt)[1]).mean() >= 0.99


def test_reranking_in_faiss_gives_the_numpy_reranking_results(built):
    """IndexRefine over the id map's codes in row order returns the ids the former numpy
    re-ranking returned for the same IVF candidates, with the same distances to float rounding."""
    _, _, outs, q = built
    reader = IndexReader.open(outs["refine"])
    assert reader._refined is not None and reader.k_factor == 10
    codes = faiss.vector_to_array(faiss.downcast_index(reader._refined.refine_index).codes).reshape(reader.ntotal, -1)
    for nprobe in (1, 4, 16):
        set_nprobe(reader.index, nprobe)
        _, candidates = reader.index.search(q, 10 * reader.k_factor)
        want_d, want_rows = rerank(q, candidates, lambda r: r, codes, reader._refine.sa_decode, 10)
        scores, ids = reader.search(q, 10, nprobe)
        assert np.array_equal(ids, np.where(want_rows >= 0, reader._ids[want_rows], -1)), nprobe
        found = want_rows >= 0      # nprobe 1: some queries' probed lists hold fewer than 10
        assert np.allclose(scores[found], 1 - want_d[found] / 2, atol=1e-5) and np.isinf(scores[~found]).all()


def test_a_bad_filter_is_a_usage_error_naming_the_clause(built):
    _, _, outs, q = built
    reader = IndexReader.open(outs["sq8"])
    for text, message in (("colour=red", "'colour' is not a filter column of this version (it filters on: "
                                          "category, in_stock, family)"),
                          ("product_id=p000001", "'product_id' is not a filter column"),
                           ("family=x", "'family=x': family holds integers, not 'x'"),
                           ("category=1..3", "ranges need an integer column; category holds strings"),
                           ("in_stock=maybe", "in_stock holds true/false, not 'maybe'"),
                           ("category", "cannot read 'category'")):
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            reader.search(q[:1], 5, filter=text)


_VALUES = {"s": st.sampled_from(["a", "b", "c", None]), "i": st.one_of(st.none(), st.integers(-5, 5)),
           "b": st.one_of(st.none(), st.booleans())}


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries(_VALUES), min_size=0, max_size=30),
       s=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3, unique=True),
       lo=st.one_of(st.none(), st.integers(-6, 6)), hi=st.one_of(st.none(), st.integers(-6, 6)),
       flag=st.booleans(), use=st.lists(st.sampled_from(["s", "i", "b"]), min_size=1, max_size=3, unique=True))
def test_the_mask_is_the_and_of_its_clauses_and_nulls_never_match(rows, s, lo, hi, flag, use):
    table = pa.table({"s": pa.array([r["s"] for r in rows], pa.string()),
                      "i": pa.array([r["i"] for r in rows], pa.int32()),
                      "b": pa.array([r["b"] for r in rows], pa.bool_())})
    if lo is None and hi is None:
        hi = 0
    text = {"s": "s=" + "|".join(s), "i": f"i={'' if lo is None else lo}..{'' if hi is None else hi}",
            "b": f"b={'true' if flag else 'false'}"}
    checks = {"s": lambda r: r["s"] in s, "b": lambda r: r["b"] is flag,
              "i": lambda r: r["i"] is not None and (lo is None or r["i"] >= lo) and (hi is None or r["i"] <= hi)}
    got = filters.mask(table, filters.parse(",".join(text[c] for c in use)), ("s", "i", "b"))
    assert got.tolist() == [all(checks[c](r) for c in use) for r in rows]
    # the same on dictionary-encoded strings
    encoded = table.set_column(0, "s", table.column("s").dictionary_encode())
    assert filters.mask(encoded, filters.parse(",".join(text[c] for c in use)), ("s", "i", "b")).tolist() \
        == got.tolist()


def _with_delta(root: str, x: np.ndarray, replaced: np.ndarray, seed: int) -> tuple[str, np.ndarray]:
    """A version over LATEST's files plus one delta segment that gives ``replaced`` products
    new vectors (their old ones deleted), written as a refresh writes one."""
    from dataclasses import replace

    base = iv.read_manifest(root, iv.latest_version(root))
    version = iv.new_version()
    vdir = iv.version_uri(root, version)
    index = codec.deserialize(iv.read_trained(iv.version_uri(root, base.version), base.trained))
    nlist, code_size = codec.lists_shape(index)
    v = _clustered(len(replaced), seed)
    lists, codes, refine = codec.encode(index, v)
    pids = [f"p{i:06d}" for i in replaced.tolist()]
    ids = ids_for(pids)
    idmap = iv.with_refine(pa.table({"id": pa.array(ids, pa.int64()), "product_id": pids,
                                     "category": ["delta"] * len(pids)}), refine)
    shard = shard_of(ids, len(base.shards))
    parts = {int(s): (codec.encoded_lists(nlist, code_size, ids[shard == s], lists[shard == s], codes[shard == s]),
                      int((shard == s).sum()), idmap.filter(pa.array(shard == s))) for s in np.unique(shard)}
    segment = index_delta.write_segment(vdir, version, parts, pids)
    home = base.version
    iv.write_manifest(root, replace(base, version=version, parent=base.version, deltas=(segment,),
                                    shards=tuple(index_delta.rebase_shard(s, home) for s in base.shards),
                                    trained=index_delta.rebased(base.trained, home)))
    out = x.copy()
    out[replaced] = v
    return version, out


@pytest.mark.parametrize("name", ["sq8", "refine"])
def test_a_mapped_version_searches_as_the_read_one_and_is_cached_once(built, name, tmp_path, monkeypatch):
    _, _, outs, q = built
    cache = str(tmp_path / "cache")
    read = IndexReader.open(outs[name])
    mapped_reader = IndexReader.open(outs[name], mmap=True, cache_dir=cache)
    path = mapped.cache_path(cache, outs[name], read.version)
    files = {"sq8": ["index.faiss"],   # plain lists: one file of all shards' lists
             "refine": ["shard-00000.faiss", "shard-00001.faiss", "shard-00002.faiss", "refine.faiss"]}[name]
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == sorted(
        ["idmap.arrow", "ready.json"] + files)
    for flt in (None, "category=common", "category=niche", "category=rare,in_stock=true"):
        want, got = read.search(q, 10, filter=flt), mapped_reader.search(q, 10, filter=flt)
        assert np.array_equal(want[1], got[1]) and np.allclose(want[0], got[0], atol=1e-6), flt
    assert mapped_reader.search_products(q[:2], 3) == read.search_products(q[:2], 3)
    # a later open maps the cache: nothing is read from the index root again
    monkeypatch.setattr(reader_mod.ShardLoader, "load", lambda *a: pytest.fail("read a shard again"))
    again = IndexReader.open(outs[name], mmap=True, cache_dir=cache)
    assert np.array_equal(again.search(q, 10)[1], want[1] if flt is None else read.search(q, 10)[1])
    assert (tmp_path / "cache").exists() and path.endswith(read.version)


def test_delta_segments_are_folded_into_the_cache_and_a_bad_file_leaves_no_cache(built, tmp_path):
    x, meta, outs, q = built
    import shutil

    root = str(tmp_path / "index")
    shutil.copytree(outs["refine"], root)
    replaced = np.arange(0, N, 40)
    version, now = _with_delta(root, x, replaced, seed=3)
    read = IndexReader.open(root, version)
    mapped_reader = IndexReader.open(root, version, mmap=True, cache_dir=str(tmp_path / "cache"))
    assert read.ntotal == mapped_reader.ntotal == N
    for flt in (None, "category=delta", "category=common"):
        want, got = read.search(q, 10, filter=flt), mapped_reader.search(q, 10, filter=flt)
        assert np.array_equal(want[1], got[1]), flt
    # the replaced products are found at their new vectors, and only there
    scores, ids = mapped_reader.search(now[replaced[:50]], 1, nprobe=64)
    assert (ids[:, 0] == ids_for([f"p{i:06d}" for i in replaced[:50].tolist()])).mean() >= 0.95
    assert mapped_reader.search_products(now[replaced[:1]], 1, nprobe=64)[0][0]["category"] == "delta"
    # a shard whose bytes are not the manifest's: exit 65 naming it, and no cache left behind
    m = iv.read_manifest(root, version)
    bad = os.path.normpath(os.path.join(iv.version_uri(root, version), m.shards[1].index.file))
    with open(bad, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(DataError, match=m.shards[1].index.file.rsplit("/", 1)[-1]):
        IndexReader.open(root, version, mmap=True, cache_dir=str(tmp_path / "cache2"))
    assert not [p for p in (tmp_path / "cache2").rglob("*") if p.is_file()]


def test_prune_keeps_the_named_versions_and_drops_the_rest(built, tmp_path):
    _, _, outs, _ = built
    cache = str(tmp_path / "cache")
    version = IndexReader.open(outs["sq8"], mmap=True, cache_dir=cache).version
    home = tmp_path / "cache" / mapped.cache_path(cache, outs["sq8"], "x").split("/")[-2]
    (home / "20200101T000000Z-old").mkdir()
    (home / f"{version}.tmp-abcd1234").mkdir()       # a build in progress elsewhere: kept
    assert mapped.prune(cache, outs["sq8"], {version}) == ["20200101T000000Z-old"]
    assert sorted(p.name for p in home.iterdir()) == sorted([version, f"{version}.tmp-abcd1234"])
