"""build-index at scale, on small data: the streaming sample, the exact neighbours found
inside the Beam job, the HNSW coarse quantizer, the re-ranking stage, the default nprobe
rule and duplicate detection in bounded memory. Real faiss, the Beam DirectRunner."""
from __future__ import annotations

import tracemalloc
import weakref

import faiss
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_bundle
from mimdex.indexing.evaluate import choose_nprobe
from mimdex.indexing.exact import ExactTopK, exact_search, merge_nearest
from mimdex.indexing.params import choose
from mimdex.indexing.reader import IndexReader, ShardLoader
from mimdex.indexing import release
from mimdex.indexing.release import Source, sample_vectors
from mimdex.indexing.sample import draw
from mimdex.indexing.shard_search import ShardSearch
from mimdex.indexing.train import train_index
from mimdex.infra import storage
from mimdex.infra.contracts import duplicates
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.contracts.recall import recall_at
from mimdex.infra.contracts.vectors import ids_for
from mimdex.infra.errors import DataError
from mimdex.pipelines.build_index import BuildConfig, run

D = 64


def clustered(n: int, seed: int = 0, clusters: int = 50, noise: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, D)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _parts(count: int, rows: int, seed: int = 0):
    """(name, vectors, ids) made one at a time: column 0 holds the row's id."""
    for p in range(count):
        v = np.random.default_rng([seed, p]).standard_normal((rows, D)).astype(np.float32)
        ids = np.arange(p * rows, (p + 1) * rows, dtype=np.int64)
        v[:, 0] = ids
        yield f"part-{p:05d}", v, ids


def test_sample_is_reproducible_order_free_exact_and_streams():
    n, train, held = 40 * 2000, 3000, 200
    tracemalloc.start()
    a = draw(_parts(40, 2000), n, train, held, D, seed=7)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 40 parts are 20.5 MB; the sample is 0.8 MB: the draw holds one part and the candidates
    assert peak < 4_000_000, peak
    assert len(a.train) == train and len(a.held) == held and a.rows == n
    b = draw(reversed(list(_parts(40, 2000))), n, train, held, D, seed=7)
    assert np.array_equal(np.sort(a.train[:, 0]), np.sort(b.train[:, 0]))   # the parts' order does not matter
    assert np.array_equal(np.sort(a.held_ids), np.sort(b.held_ids))
    assert np.array_equal(a.held[:, 0].astype(np.int64), a.held_ids)
    assert not set(a.train[:, 0].astype(np.int64)) & set(a.held_ids.tolist())  # held out of training
    c = draw(_parts(40, 2000), n, train, held, D, seed=8)
    assert len(set(c.train[:, 0].tolist()) & set(a.train[:, 0].tolist())) < train // 5


def test_partial_nearest_neighbours_merge_to_the_brute_force_ones():
    x, q = clustered(5000, seed=1), clustered(300, seed=2)
    ids = np.random.default_rng(3).permutation(10 ** 6)[:5000].astype(np.int64)
    exclude = ids[:300].copy()
    q[:150] = x[:150]                       # half the queries are catalog vectors, excluded from themselves
    exclude[150:] = -1
    parts = np.array_split(np.arange(5000), 7)
    found = []
    for p in parts:
        acc = ExactTopK(q, 1, exclude)
        acc.add(x[p], ids[p])
        found.append(acc.result())
    _, nearest = merge_nearest([f[0][:, 0] for f in found], [f[1][:, 0] for f in found])
    d = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    d[np.arange(150), np.arange(150)] = np.inf
    assert np.array_equal(nearest, ids[d.argmin(1)])
    assert np.array_equal(nearest, exact_search(q, [(x, ids)], 1, exclude)[1][:, 0])


def _build(tmp_path, name: str, x: np.ndarray, **kw) -> tuple[dict, str]:
    model_uri = str(tmp_path / "model")
    sha = random_bundle(model_uri, ["t"])
    root = str(tmp_path / f"emb-{name}")
    pids = [f"p{i:06d}" for i in range(len(x))]
    if not (tmp_path / f"emb-{name}").exists():
        emb.write_vectors(root, x, pids, ModelRef(model_uri, sha, "3-tower", D, True), "float16", 6)
    out = str(tmp_path / f"index-{name}")
    return run(BuildConfig(embeddings=root, out=out, shards=3, eval_queries=400, **kw)).report, out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default build, evaluated one shard at a time as an index over
    EVAL_LOADED_MAX_BYTES is (the test below checks every sweep row against the loaded reader)."""
    tmp = tmp_path_factory.mktemp("scale")
    x = clustered(20000)
    limit, release.EVAL_LOADED_MAX_BYTES = release.EVAL_LOADED_MAX_BYTES, 0
    try:
        return tmp, x, _build(tmp, "default", x)
    finally:
        release.EVAL_LOADED_MAX_BYTES = limit


def test_beam_found_neighbours_equal_brute_force_and_the_defaults_reach_the_target(built):
    tmp, x, (report, out) = built
    assert report["params"]["factory"] == "IVF512,SQ8"
    src = Source(str(tmp / "emb-default"), emb.read_manifest(str(tmp / "emb-default")), "image", 0.5)
    p = report["params"]
    sample = sample_vectors(src, len(x), p["train_size"], 400, 0)       # the same draw, again
    vdir = iv.version_uri(out, report["version"])
    stats = [storage.read_json(u) for u in storage.list_files(storage.join(vdir, "_build"), ".json")
             if u.rsplit("/", 1)[-1].startswith("stats-")]
    assert len(stats) == 6 and all(len(s["truth"]["ids"]) == 400 for s in stats)   # one per part, from AddPart
    _, nearest = merge_nearest([np.array(s["truth"]["dist"]) for s in stats], [np.array(s["truth"]["ids"]) for s in stats])
    xs = x.astype(np.float16).astype(np.float64)
    d = ((sample.held.astype(np.float64)[:, None, :] - xs[None]) ** 2).sum(-1)     # brute force, all in memory
    ids = ids_for([f"p{i:06d}" for i in range(len(x))])
    d[ids[None, :] == sample.held_ids[:, None]] = np.inf
    truth = ids[d.argmin(1)]
    row_of = {int(i): r for r, i in enumerate(ids)}
    gap = d[np.arange(400), [row_of[int(i)] for i in nearest]] - d.min(1)
    assert np.all((nearest == truth) | (gap < 1e-5))           # the same, but for fp32 rounding of near ties
    assert (nearest == truth).mean() >= 0.99
    reader = IndexReader.open(out)
    assert report["evaluation"]["held_out"]["searched"] == "one shard at a time"
    for row in report["evaluation"]["held_out"]["sweep"]:         # the evaluation found exactly these
        found = reader.search(sample.held, 11, row["nprobe"])[1]
        found = np.array([[i for i in r if i != own][:10] for r, own in zip(found, sample.held_ids)])
        assert recall_at(found, nearest)["recall@10"] == row["recall@10"]
    at = next(r for r in report["evaluation"]["held_out"]["sweep"] if r["nprobe"] == report["default_nprobe"])
    assert at["recall@10"] >= 0.95
    assert "why" in report["evaluation"]["held_out"]
    assert not storage.exists(storage.join(vdir, "_partials"))         # the partial codes are gone


def test_hnsw_coarse_quantizer_and_refine_codes_build_merge_and_search(built):
    tmp, x, _ = built
    recalls = {}
    for name, factory in (("flat", "IVF256,PQ32x4fs,Refine(SQ8)"), ("hnsw32", "IVF256_HNSW32,PQ32x4fs,Refine(SQ8)")):
        report, out = _build(tmp, "default", x, factory=factory)
        assert report["params"]["coarse"] == name and report["params"]["k_factor"] == 10
        reader = IndexReader.open(out)                       # 3 shards merged into one index
        assert reader.ntotal == len(x)
        shard = iv.read_shard(iv.version_uri(out, reader.version), reader.manifest.shards[0])[1]
        assert shard.schema.field(iv.REFINE_COLUMN).type == pa.binary(D)     # SQ8: a byte per dimension
        m = reader.manifest   # serving holds the re-ranking codes too: counted in the index's bytes
        assert report["index_bytes"] == sum(s.index.bytes for s in m.shards) + m.trained.bytes + len(x) * D
        recalls[name] = {r["nprobe"]: r["recall@10"] for r in report["evaluation"]["held_out"]["sweep"]}
        _shard_at_a_time_equals_the_loaded_reader(reader, x[::97])
    for nprobe, flat in recalls["flat"].items():
        if nprobe in recalls["hnsw32"]:
            assert recalls["hnsw32"][nprobe] >= flat - 0.0025, (nprobe, recalls)
    assert max(recalls["flat"].values()) >= 0.95    # re-ranking lifts the 16-byte PQ codes past the target


class _OneAtATime(ShardLoader):
    """A loader that fails if a shard it gave out is still alive when the next is read."""

    def load(self, entry):
        assert all(ref() is None for ref in getattr(self, "given", [])), "two shards in memory at once"
        index, idmap = super().load(entry)
        self.given = getattr(self, "given", []) + [weakref.ref(index)]
        return index, idmap


def _shard_at_a_time_equals_the_loaded_reader(reader: IndexReader, queries: np.ndarray) -> None:
    """The evaluation's search (shard_search) returns what the consolidated reader returns,
    re-ranking included, holding one shard at a time."""
    m = reader.manifest
    loader = _OneAtATime(reader.uri, m.params, m.trained)
    found = ShardSearch(loader, m.shards).search_ladder(queries, [11, 2], [1, 4])
    assert len(loader.given) == len(m.shards)                       # each shard read once for the ladder
    for (k, nprobe), (ids, seconds) in found.items():
        want = reader.search(queries, k, nprobe)[1]
        # equal but for the order of equal fast-scan distances at the k x k_factor cut
        assert ids.shape == want.shape and (ids == want).mean() >= 0.99 and seconds > 0, (k, nprobe)


def test_default_nprobe_never_pays_a_large_qps_loss_for_a_small_gain():
    def rows(recalls):
        return [{"nprobe": 2 ** i, "recall@10": r, "qps": 1000 / 2 ** i} for i, r in enumerate(recalls)]
    # real embeddings: the codes cap recall@10 near 0.52; nprobe 1024 of 2048 lists bought 0.01
    chosen, why = choose_nprobe(rows([0.30, 0.38, 0.44, 0.48, 0.50, 0.505, 0.51, 0.512, 0.514, 0.516, 0.52]),
                                2048, 0.95)
    assert chosen == 16 and "does not reach" in why
    assert choose_nprobe(rows([0.5, 0.8, 0.96, 0.99]), 64, 0.95)[0] == 4          # within nlist/16
    chosen, why = choose_nprobe(rows([0.2, 0.4, 0.6, 0.8, 0.96]), 64, 0.95)       # above nlist/16 = 4 ...
    assert chosen == 16 and "every doubling" in why                               # ... because each paid
    chosen, why = choose_nprobe(rows([0.5, 0.8, 0.9, 0.945, 0.948, 0.951]), 64, 0.95)
    assert chosen == 8 and "needs nprobe 32" in why                               # 0.006 more for 4x the time


def _first_seen(files: list[list[str | None]]) -> dict[tuple[int, int], str]:
    seen, out = {}, {}
    for f, ids in enumerate(files):
        for r, pid in enumerate(ids):
            if not pid:
                continue
            if pid in seen:
                out[(f, r)] = f"f{seen[pid][0]} row {seen[pid][1]}"
            else:
                seen[pid] = (f, r)
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.text("abcé", max_size=3)), max_size=30), min_size=1, max_size=4),
       st.integers(1, 7))
def test_duplicates_in_buckets_equal_the_in_memory_sort(files, per_bucket):
    uris = [f"f{i}" for i in range(len(files))]
    arrays = [pa.array(f, pa.string()) for f in files]
    total = sum(len(f) for f in files)
    bucketed = duplicates.find(uris, lambda i: arrays[i], total, rows_per_bucket=per_bucket)
    assert bucketed == _first_seen(files) == duplicates.find(uris, lambda i: arrays[i], total)


def test_budget_without_room_for_sq8_falls_back_to_8_bit_pq_and_says_so():
    p = choose(1_000_000, 256, max_memory=120 * 1_000_000)   # 108 bytes a vector after the ids and lists
    assert p.factory == "IVF4096,PQ64x8" and "too few for SQ8" in " ".join(p.reasons)
    assert p.train_size == 64 * 4096 and choose(20_000, 256, max_memory=2_000_000).train_size == 20_000
    assert choose(1_000_000, 256, max_memory=160 * 2 ** 20).factory == "IVF4096,PQ128x8"
    big = choose(10_000_000, 256)
    assert big.factory == "IVF16384_HNSW32,SQ8" and big.coarse == "hnsw32" and big.train_size == 64 * 16384
    refined = choose(1_000_000, 256, factory="IVF4096,PQ128x4fs,Refine(SQ8)")
    assert (refined.refine, refined.k_factor, refined.estimated_bytes) == ("SQ8", 10, 1_000_000 * (64 + 256 + 8)
                                                                           + 4096 * 256 * 4 + 16 * 256 * 4)


def test_8_bit_pq_trains_and_loads_without_polysemous_codes_or_precomputed_tables():
    x = clustered(6000, seed=3)
    index, _ = train_index(x, choose(len(x), D, factory="IVF16,PQ16x8"))
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    # index_factory turns polysemous training on; faiss would hold nlist x 16 x 256 floats of tables
    assert not ivf.do_polysemous_training and ivf.use_precomputed_table == -1 and ivf.precomputed_table.size() == 0
    index.add(x)
    from mimdex.infra.contracts import index_codec as codec

    loaded = codec.deserialize(codec.serialize(index))
    lv = faiss.downcast_index(faiss.extract_index_ivf(loaded))
    assert lv.use_precomputed_table == -1 and lv.precomputed_table.size() == 0
    ivf.nprobe = lv.nprobe = 4
    assert np.array_equal(index.search(x[:50], 5)[1], loaded.search(x[:50], 5)[1])


@pytest.mark.parametrize("n,nlist,code_size", [(1000, 64, 16), (50, 1024, 7), (0, 16, 8)])
def test_stored_lists_are_byte_for_byte_what_faiss_writes(n, nlist, code_size):
    import faiss

    from mimdex.infra.contracts import index_codec as codec
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 2 ** 62, n, dtype=np.int64)
    lists, codes = rng.integers(0, nlist, n), rng.integers(0, 256, (n, code_size), dtype=np.uint8)
    order = np.lexsort((ids, lists))
    flat = faiss.ArrayInvertedLists(nlist, code_size)   # faiss's own writer, full (n=1000) and sparse (n=50)
    bounds = np.searchsorted(lists[order], np.arange(nlist + 1))
    for lst in np.flatnonzero(np.diff(bounds)).tolist():
        rows = order[bounds[lst]:bounds[lst + 1]]
        flat.add_entries(lst, len(rows), faiss.swig_ptr(np.ascontiguousarray(ids[rows])),
                         faiss.swig_ptr(np.ascontiguousarray(codes[rows])))
    writer = faiss.VectorIOWriter()
    faiss.write_InvertedLists(flat, writer)
    ours = codec.encoded_lists(nlist, code_size, ids, lists, codes)
    assert bytes(ours) == faiss.vector_to_array(writer.data).tobytes()
    back = codec.decoded_lists(ours)
    assert np.array_equal(back[0], ids[order]) and np.array_equal(back[2], codes[order])


def test_two_level_kmeans_is_as_good_as_flat_on_clustered_vectors():
    """Two-level k-means (sqrt(k) coarse clusters, each split) gives k centroids, and 2 flat
    iterations from them (train.py's large-nlist path) an error within what flat k-means'
    own seeds spread over. Well-separated clusters are its hard case (a coarse boundary
    cuts a cluster): alone it is 33% worse here, 0.05% on the 1M benchmark vectors."""
    from mimdex.indexing.kmeans import kmeans, two_level

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((300, 32)).astype(np.float32)
    x = centres[rng.integers(0, 300, 30000)] + 0.3 * rng.standard_normal((30000, 32)).astype(np.float32)
    flat_errs = [kmeans(x, 256, seed=seed)[1] for seed in range(3)]   # 6.59, 7.38, 7.15
    start, two_err = two_level(x, 256, seed=0)
    refined, refined_err = kmeans(x, 256, niter=2, seed=0, init=start)
    assert start.shape == refined.shape == (256, 32)
    assert two_err <= 1.4 * min(flat_errs)
    assert refined_err <= 1.02 * max(flat_errs)
    with pytest.raises(ValueError, match="100 points for 256 centroids"):
        two_level(x[:100], 256)


def test_kmeans_runs_its_fp32_and_bf16_branches_whatever_this_cpu_has():
    """Which GEMM type k-means assigns in follows the CPU (fp32, or bf16 on AVX512-BF16/AMX
    and CUDA), so each branch is forced here: fp32 assigns each point exactly to its
    nearest final centroid, bf16 errs only on near-ties, and both reach the same error over
    seeds."""
    import torch

    from mimdex.indexing.kmeans import _assign, cpu_has_bf16, fast_dtype, kmeans

    cpu = torch.device("cpu")
    assert fast_dtype(cpu, "flags : fpu sse avx2 avx512f") is torch.float32
    assert fast_dtype(cpu, "flags : fpu avx512f avx512_bf16") is torch.bfloat16
    assert fast_dtype(cpu, "flags : fpu amx_bf16 amx_tile") is torch.bfloat16
    assert fast_dtype(torch.device("cuda"), "") is torch.bfloat16
    assert fast_dtype(cpu) is (torch.bfloat16 if cpu_has_bf16() else torch.float32)

    rng = np.random.default_rng(4)
    x = (rng.standard_normal((40, 16))[rng.integers(0, 40, 8000)]
         + 0.2 * rng.standard_normal((8000, 16))).astype(np.float32)
    out = {dt: kmeans(x, 64, niter=8, seed=1, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    for dt, (c, mse) in out.items():
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        xt, ct = torch.from_numpy(x), torch.from_numpy(c)
        labels = _assign(xt, xt.to(dt), ct, 512, dt)[0].numpy()
        gap = d2[np.arange(len(x)), labels] - d2.min(1)  # how much closer the best centroid was
        scale = np.linalg.norm(x, axis=1) * np.linalg.norm(c, axis=1).max()
        if dt is torch.float32:  # exact up to fp32 rounding of the scores
            assert (gap <= 1e-5 * scale).all() and (labels == d2.argmin(1)).mean() >= 0.999
        else:  # wrong picks, but only where two scores are within bf16's rounding (2 x 2^-8 |x||c| each)
            assert (gap > 1e-5 * scale).any() and (gap <= 2 ** -6 * scale).all()
    # the seed moves the error far more than the type does (0.61 to 1.68 here): over 4 seeds
    # both types reach the same mean error (1.013 fp32, 1.023 bf16)
    errs = {dt: np.mean([kmeans(x, 64, niter=8, seed=s, dtype=dt)[1] for s in range(4)])
            for dt in (torch.float32, torch.bfloat16)}
    assert abs(errs[torch.float32] - errs[torch.bfloat16]) <= 0.05 * errs[torch.float32]


def test_merge_streams_codes_partials_window_by_window_into_the_stored_lists(tmp_path):
    """AddPart's codes partials hold one record batch per list window, each sorted by
    (list, id); MergeShard streams them into exactly the bytes one in-memory encode of all
    rows gives (itself byte-for-byte faiss's format), and refuses partials whose codes and
    id maps disagree."""
    import faiss

    from mimdex.infra.contracts import index_codec as codec
    from mimdex.pipelines.build_index import graph
    from mimdex.pipelines.build_index.spec import BuildSpec

    rng = np.random.default_rng(5)
    index = faiss.index_factory(8, "IVF300,SQ8")   # 300 lists: 60 windows of 5
    index.train(rng.standard_normal((3000, 8)).astype(np.float32))
    vdir, partials = str(tmp_path / "v"), str(tmp_path / "p")
    storage.write_bytes(storage.join(vdir, "trained.index"), codec.serialize(index))
    spec = BuildSpec("", vdir, 1, "image", 0.5, None, "float16", partials=partials)
    rows, names = [], []
    for p in range(3):
        n = 500 + 100 * p
        ids = rng.permutation(10 ** 6)[:n] * 3 + p          # distinct across partials
        lists, codes = rng.integers(0, 300, n), rng.integers(0, 256, (n, 8), dtype=np.uint8)
        name = storage.join(partials, f"part-{p}-shard-00000")
        idmap = pa.table({"id": pa.array(ids, pa.int64()), "product_id": pa.array([f"q{i}" for i in ids])})
        graph._write_arrow(name + graph.IDS_FILE, idmap.to_batches(), idmap.schema)
        graph._write_codes(name + graph.CODES_FILE, 300, ids, lists, codes)
        with pa.ipc.open_file(storage.read_bytes(name + graph.CODES_FILE)) as f:
            starts = graph._window_starts(300)
            assert f.num_record_batches == len(starts) - 1 == 60
            for w in range(f.num_record_batches):
                got = f.get_batch(w).column(graph.LIST).to_numpy()
                assert np.all((got >= starts[w]) & (got < starts[w + 1])) and np.all(np.diff(got) >= 0)
        rows.append((ids, lists, codes))
        names.append(name)
    record = next(iter(graph.MergeShard(spec).process((0, names))))
    stored, idmap = iv.read_shard(vdir, record)
    ids, lists, codes = (np.concatenate(c) for c in zip(*rows))
    assert stored == codec.encoded_lists(300, 8, ids, lists, codes)
    assert sorted(idmap.column("id").to_pylist()) == sorted(ids.tolist()) and record.ntotal == len(ids)
    short = storage.join(partials, "short-shard-00000")    # an id map row without its code
    idmap = pa.table({"id": pa.array([1, 2], pa.int64()), "product_id": pa.array(["a", "b"])})
    graph._write_arrow(short + graph.IDS_FILE, idmap.to_batches(), idmap.schema)
    graph._write_codes(short + graph.CODES_FILE, 300, np.array([1]), np.array([7]), np.zeros((1, 8), np.uint8))
    with pytest.raises(DataError, match="shard-00000: 1 codes for 2 id map rows"):
        list(graph.MergeShard(spec).process((0, [short])))
