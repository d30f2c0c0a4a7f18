"""The nightly refresh at the cost of the change (issue: distributed diff, delta segments):
an unchanged image_uri catalog reads no image, a refresh writes a delta segment that
searches exactly like a rebuild, compaction changes no result, retention keeps what kept
versions reference. A real local Ray encodes, Beam's DirectRunner diffs and compacts."""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import random_bundle
from mimdex.indexing import versions
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.vectors import shard_of, usable_rows
from mimdex.pipelines import compact
from mimdex.pipelines import synth as synth_job
from mimdex.pipelines.refresh import RefreshConfig, run
from mimdex.pipelines.synth import SynthConfig

N = 300


def _write(root: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, pa.schema([("product_id", pa.string()), ("title", pa.string()),
                                                  ("image_uri", pa.string())]))
    with storage.open_write(root + "/catalog.parquet") as f:
        pq.write_table(table, f, row_group_size=64)


@pytest.fixture(scope="module")
def uri_world(tmp_path_factory, local_ray):
    """An image_uri catalog of N products on disk, a model, and a first refresh."""
    tmp = tmp_path_factory.mktemp("uri")
    synth_job.run(SynthConfig(products=N, queries=2, seed=4), str(tmp / "synth"), workers=1, progress=False)
    table = storage.parquet_dataset(str(tmp / "synth" / "catalog")).to_table(columns=["product_id", "title", "image"])
    cat = tmp / "cat"
    (cat / "img").mkdir(parents=True)
    rows = []
    for pid, title, image in zip(*(table.column(c).to_pylist() for c in ("product_id", "title", "image"))):
        (cat / "img" / f"{pid}.jpg").write_bytes(image)
        rows.append({"product_id": pid, "title": title, "image_uri": f"img/{pid}.jpg"})
    _write(str(cat), rows)
    random_bundle(str(tmp / "model"), [r["title"] for r in rows], "3-tower")
    cfg = RefreshConfig(catalog=str(cat / "catalog.parquet"), model=str(tmp / "model"), embeddings=str(tmp / "emb"),
                        index=str(tmp / "index"), shards=2, unit_rows=64, eval_queries=60, progress=False,
                        grace_hours=0.0, keep=10)
    first = run(cfg)
    assert first["decision"].startswith("first run")
    return cfg, rows, cat


def test_an_unchanged_image_uri_refresh_reads_no_image_and_a_quiet_change_only_its_images(uri_world):
    cfg, rows, cat = uri_world
    with storage.trace_reads() as reads:
        report = run(cfg)
    assert report["nothing_to_do"] and report["diff"]["unchanged"] == N
    images = [(u, n) for u, n in reads if "/img/" in u]
    assert images == [] and report["read"]["image_bytes"] == 0
    # the images' directory is listed once (LIST_MIN of them or more), not HEADed one by one
    assert report["read"]["image_lists"] == 1 and report["read"]["image_heads"] == 0
    assert any(u.endswith("catalog.parquet") for u, _ in reads)
    assert report["read"]["embeddings_rows"] == N and report["io"]["written_bytes"] < 50_000

    # one image rewritten: its fingerprint (size, mtime) moves, and only it is encoded again
    path = cat / "img" / f"{rows[0]['product_id']}.jpg"
    path.write_bytes((cat / "img" / f"{rows[1]['product_id']}.jpg").read_bytes())
    report = run(replace(cfg, max_drift=10.0, max_code_drift=100.0))
    assert report["diff"]["changed"] == 1 and report["encode"]["rows"] == report["encode"]["encoded"] == 1
    assert report["decision"].startswith("incremental")


def test_a_refresh_writes_a_delta_that_searches_like_a_rebuild_and_compaction_changes_nothing(uri_world):
    cfg, rows, cat = uri_world
    before = iv.read_manifest(cfg.index, iv.latest_version(cfg.index))
    changed = [dict(r) for r in rows]
    for r in changed[10:16]:
        r["title"] += " (2027 edition)"
    for r in changed[20:26]:  # a new photo: another product's image bytes
        (cat / "img" / f"{r['product_id']}-v2.jpg").write_bytes((cat / "img" / f"{changed[200]['product_id']}.jpg")
                                                                 .read_bytes())
        r["image_uri"] = f"img/{r['product_id']}-v2.jpg"
    deleted = {r["product_id"] for r in changed[30:36]}
    changed = [r for r in changed if r["product_id"] not in deleted]
    changed += [{**changed[k], "product_id": f"NEW-{k}", "title": "relisted " + changed[k]["title"]}
                for k in range(40, 46)]
    _write(str(cat), changed)
    # (an untrained model's vectors drift: this test is about the delta, not the retrain rule)
    report = run(replace(cfg, max_drift=10.0, max_code_drift=100.0))
    assert {k: report["diff"][k] for k in ("new", "changed", "deleted")} == {"new": 6, "changed": 12, "deleted": 6}
    assert report["encode"]["rows"] == 18 and report["decision"].startswith("incremental")
    m = iv.read_manifest(cfg.index, report["version"])
    assert len(m.deltas) == len(before.deltas) + 1 and m.deltas[-1].removed_products == 18
    # nothing of the previous version was rewritten: its shards and codebooks are referenced
    assert all(s.index.file.startswith("../") for s in m.shards) and m.trained.file.startswith("../")
    assert report["io"]["index_written_bytes"] < 0.25 * report["io"]["index_files_bytes"]

    # base + delta == a rebuild of the final embeddings with the same codebooks
    reader = IndexReader.open(cfg.index)
    assert sorted(reader.idmap.column("product_id").to_pylist()) == sorted(r["product_id"] for r in changed)
    rebuilt = _rebuild_same_codebooks(cfg, m, str(cat.parent / "rebuilt"))
    x = _all_vectors(cfg)
    for nprobe in (1, 4, 16):
        s1, i1 = reader.search(x, 10, nprobe)
        s2, i2 = rebuilt.search(x, 10, nprobe)
        assert np.array_equal(i1, i2) and np.array_equal(s1, s2)

    # compaction: new base shards, no deltas, the same results; retention keeps referenced files
    result = compact.run(compact.CompactConfig(cfg.index))
    assert result["published"] and iv.latest_version(cfg.index) == result["version"]
    compacted = IndexReader.open(cfg.index)
    assert compacted.manifest.deltas == () and compacted.ntotal == reader.ntotal
    for nprobe in (1, 4, 16):
        s1, i1 = reader.search(x, 10, nprobe)
        s3, i3 = compacted.search(x, 10, nprobe)
        assert np.array_equal(i1, i3) and np.array_equal(s1, s3)
    assert compact.run(compact.CompactConfig(cfg.index)).get("nothing_to_do")


def test_retention_never_deletes_a_file_a_kept_version_uses(uri_world):
    cfg, rows, cat = uri_world
    latest = iv.latest_version(cfg.index)
    used = {}
    for v in iv.list_versions(cfg.index):
        if iv.is_complete(cfg.index, v):
            used[v] = versions.index_delta.files_of(iv.read_manifest(cfg.index, v))
    pruned = versions.prune(cfg.index, keep=1, grace_hours=0.0, now=dt.datetime.now(dt.timezone.utc)
                            + dt.timedelta(hours=1))
    # LATEST and the version before it (a reader may still be on it) are kept
    assert latest in pruned["kept"] and pruned["deleted"] and len(pruned["kept"]) == 2
    needed = set().union(*(used[v] for v in pruned["kept"]))
    # every file a kept version uses is still there (some in versions whose manifests are gone)...
    for home, name in needed:
        assert storage.exists(storage.join(iv.version_uri(cfg.index, home), name)), (home, name)
    assert any(h in pruned["deleted"] for h, _ in needed)   # the case this test is about
    # ... and nothing else of a deleted version is
    for v in pruned["deleted"]:
        vdir = iv.version_uri(cfg.index, v)
        left = set()
        if storage.exists(vdir):
            left = {os.path.relpath(os.path.join(d, f), vdir) for d, _, fs in os.walk(vdir) for f in fs}
        assert left == {n for h, n in needed if h == v}
    for v in pruned["kept"]:
        assert IndexReader.open(cfg.index, v).ntotal == iv.read_manifest(cfg.index, v).ntotal


def _all_vectors(cfg) -> np.ndarray:
    m = emb.read_manifest(cfg.embeddings)
    return np.concatenate([usable_rows(cfg.embeddings, e, m.model, m.dtype, "image", 0.5, idmap=False).vectors
                           for e in m.parts])


def _rebuild_same_codebooks(cfg, m: iv.IndexManifest, out: str) -> IndexReader:
    """Every current vector encoded afresh with the version's trained index, written as plain
    shards: independent of the delta machinery."""
    vdir = iv.version_uri(cfg.index, m.version)
    trained = iv.read_trained(vdir, m.trained)
    index = codec.deserialize(trained)
    nlist, code_size = codec.lists_shape(trained)
    manifest = emb.read_manifest(cfg.embeddings)
    rows = [usable_rows(cfg.embeddings, e, manifest.model, manifest.dtype, "image", 0.5) for e in manifest.parts]
    x = np.concatenate([r.vectors for r in rows])
    ids = np.concatenate([r.ids for r in rows])
    idmap = pa.concat_tables([r.idmap for r in rows], promote_options="permissive")
    lists, codes, refine = codec.encode(index, x)
    idmap = iv.with_refine(idmap, refine)
    shards = shard_of(ids, len(m.shards))
    storage.write_bytes(storage.join(out, "trained.index"), trained)
    entries = []
    for s in range(len(m.shards)):
        sel = np.flatnonzero(shards == s)
        blob = codec.encoded_lists(nlist, code_size, ids[sel], lists[sel], codes[sel])
        entries.append(iv.write_shard(out, s, blob, len(sel), idmap.take(pa.array(sel))))
    ref = iv.FileRef("trained.index", __import__("hashlib").sha256(trained).hexdigest(), len(trained))
    return IndexReader(out, m.params, tuple(entries), ref, m.default_nprobe)


def test_a_fingerprint_is_the_same_from_a_head_and_a_listing_and_moves_with_the_object(s3_bucket, monkeypatch):
    from mimdex.infra.contracts import catalog, fingerprint

    uris = [f"{s3_bucket}/img/{i}.jpg" for i in range(5)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, b"jpeg" * (i + 1))
    heads = {u: fingerprint.of_object(u) for u in uris}
    monkeypatch.setattr(fingerprint, "LIST_MIN", 1)
    before = storage.IO.snapshot()
    listed = fingerprint.of_objects(uris + [f"{s3_bucket}/img/missing.jpg"])
    assert storage.io_since(before)["heads"] == 0 and storage.io_since(before)["reads"] == 0
    assert {u: listed[u] for u in uris} == heads and all(h.startswith("object:etag=") for h in heads.values())
    assert isinstance(listed[f"{s3_bucket}/img/missing.jpg"], catalog.Problem)
    storage.write_bytes(uris[0], b"another image")
    assert fingerprint.of_object(uris[0]) != heads[uris[0]]
    # a catalog column, when given, is the fingerprint: no request at all
    assert fingerprint.of_row(uris[1], "v7", "image_version") == "image_version:v7"


def test_the_kept_ground_truth_equals_a_full_recomputation_night_after_night(uri_world):
    """Issue #31: the gate's truth updated from each change (adds, title and image changes,
    deletes) equals one computed from every current vector; a night reads no vector twice."""
    from mimdex.indexing import truth as gt
    from mimdex.infra.contracts import ground_truth

    cfg, rows, cat = uri_world
    current = [dict(r) for r in IndexReader.open(cfg.index).idmap.select(["product_id", "title", "image_uri"])
               .to_pylist()]
    current.sort(key=lambda r: r["product_id"])
    for night in range(2):
        grid = _grid(iv.read_manifest(cfg.index, iv.latest_version(cfg.index)))   # the parent's sweep
        for r in current[50 + 7 * night:53 + 7 * night]:
            r["title"] += f" (night {night})"
        for r in current[53 + 7 * night:54 + 7 * night]:  # a new photo: another product's bytes
            (cat / "img" / f"{r['product_id']}-n{night}.jpg").write_bytes(
                (cat / "img" / os.path.basename(current[100 + night]["image_uri"])).read_bytes())
            r["image_uri"] = f"img/{r['product_id']}-n{night}.jpg"
        gone = {r["product_id"] for r in current[54 + 7 * night:56 + 7 * night]}
        current = [r for r in current if r["product_id"] not in gone]
        current += [{**current[k], "product_id": f"N{night}-{k}", "title": "new " + current[k]["title"]}
                    for k in range(120, 123)]
        _write(str(cat), current)
        report = run(replace(cfg, max_drift=10.0, max_code_drift=100.0))
        assert report["decision"].startswith("incremental"), report["decision"]
        truth = report["ground_truth"]
        assert truth["kept"] == ["held_out"] and truth["recomputed_because"] is None
        assert truth["full_passes"] == 0 and truth["redrawn"] == [] and truth["left_held_out"] <= 6
        m = iv.read_manifest(cfg.index, report["version"])
        (kept,) = ground_truth.read(iv.version_uri(cfg.index, m.version), m.ground_truth)
        manifest = emb.read_manifest(cfg.embeddings)
        blocks = [(r.vectors, r.ids, r.product_keys) for r in (
            usable_rows(cfg.embeddings, e, manifest.model, manifest.dtype, "image", 0.5, idmap=False)
            for e in manifest.parts)]
        fresh = gt.full("held_out", kept.vectors, kept.own, None, blocks)
        assert np.array_equal(fresh.own_keys, kept.own_keys)
        assert np.array_equal(kept.nearest, fresh.nearest)
        known = kept.dists < kept.bound[:, None]
        assert known.sum() >= len(kept.vectors) and np.array_equal(kept.ids[known], fresh.ids[known])
        # the gate's figures are those of that truth
        assert m.evaluation["held_out"]["queries"] == len(kept.vectors)
        # ... and of the search lists carried through the change: every kept search answers
        # as the published version's loaded index does (night 1 searches none again)
        assert night == 0 or report["search_lists"]["searched_again"] == 0, report["search_lists"]
        # the encode input came from the diff's own read of the catalog (the rows that moved)
        assert report["encode_input"] == {"rows_from_the_diff": report["encode"]["rows"],
                                          "rows_read_from_the_catalog": 0}
        _lists_answer_as_the_index(cfg.index, m, kept, grid)
    # --full-evaluation: the kept truth is ignored, the held-out set redrawn from every vector
    current[60]["title"] += " (full)"
    _write(str(cat), current)
    full = run(replace(cfg, max_drift=10.0, max_code_drift=100.0, full_evaluation=True))
    truth = full["ground_truth"]
    assert truth["recomputed_because"] == "--full-evaluation" and truth["kept"] == []
    assert truth["redrawn"] == ["held_out"] and truth["full_passes"] == 2



def test_a_refresh_whose_parent_retention_removed_exits_75_and_the_next_run_publishes(uri_world, monkeypatch):
    """Operators side by side on one index: while a refresh runs, LATEST moves twice (an
    engineer's build-index publishes, then a rollback) and retention removes the version
    the refresh started from, its kept truth with it. The refresh could never have
    published (LATEST is not its parent): exit 75 saying so, not 65 as if the index were
    damaged, and LATEST as the rollback left it. The next run publishes the change. (The
    race is placed by wrapping the kept-truth read; everything in it is the real build,
    rollback and retention on the real files.)"""
    from mimdex.infra.errors import TransientError
    from mimdex.pipelines import build_index
    from mimdex.pipelines.refresh import evaluation

    cfg, rows, cat = uri_world
    cfg = replace(cfg, max_drift=10.0, max_code_drift=100.0)
    parent = iv.latest_version(cfg.index)
    assert iv.read_manifest(cfg.index, parent).ground_truth is not None
    older = [v for v in iv.list_versions(cfg.index) if v < parent and iv.is_complete(cfg.index, v)][-1]
    current = pq.read_table(str(cat / "catalog.parquet")).to_pylist()
    for r in current[40:43]:
        r["title"] += " (raced)"
    _write(str(cat), current)
    read_kept = evaluation.kept_truth

    def raced(index, manifest):
        build_index.run(build_index.BuildConfig(embeddings=cfg.embeddings, out=index, shards=2, eval_queries=60))
        versions.rollback(index, older)
        versions.prune(index, keep=1, grace_hours=0)
        assert not iv.is_complete(index, parent)
        return read_kept(index, manifest)

    monkeypatch.setattr(evaluation, "kept_truth", raced)
    with pytest.raises(TransientError, match=f"LATEST moved from {parent} to {older} while this job ran") as e:
        run(cfg)
    assert e.value.exit_code == 75 and "truth" in str(e.value)
    assert iv.read_latest(cfg.index)[0].version == older
    monkeypatch.setattr(evaluation, "kept_truth", read_kept)
    report = run(cfg)
    titles = dict(zip(*(IndexReader.open(cfg.index).idmap.column(c).to_pylist() for c in ("product_id", "title"))))
    assert report["published"] and all(titles[r["product_id"]] == r["title"] for r in current[40:43])


def test_a_re_ranking_index_carries_its_lists_through_refreshes(uri_world):
    """The same with re-ranking codes (fast-scan PQ re-ranked with SQ8, k x k_factor
    candidates): the lists answer recall@1 and @10 (candidates.kept_k) as the loaded index
    does, and the second night searches none again. (The module's last test: it moves
    the embeddings on under another index.)"""
    from mimdex.infra.contracts import ground_truth
    from mimdex.pipelines import build_index

    cfg, rows, cat = uri_world
    cfg = replace(cfg, index=cfg.index + "-refine", max_drift=10.0, max_code_drift=100.0)
    built = build_index.run(build_index.BuildConfig(embeddings=cfg.embeddings, out=cfg.index, shards=2,
                                                    factory="IVF8,PQ16x4fs,Refine(SQ8)", eval_queries=60))
    assert built.report["params"]["k_factor"] > 1
    current = [dict(r) for r in IndexReader.open(cfg.index).idmap.select(["product_id", "title", "image_uri"])
               .to_pylist()]
    for night in range(2):
        grid = _grid(iv.read_manifest(cfg.index, iv.latest_version(cfg.index)))
        for r in current[10 + 5 * night:14 + 5 * night]:
            r["title"] += f" (refine night {night})"
        _write(str(cat), current)
        report = run(cfg)
        assert report["decision"].startswith("incremental"), report["decision"]
        assert night == 0 or report["search_lists"]["searched_again"] == 0
        m = iv.read_manifest(cfg.index, report["version"])
        (kept,) = ground_truth.read(iv.version_uri(cfg.index, m.version), m.ground_truth)
        assert m.evaluation["held_out"]["sweep"][0]["recall@100"] is None   # past what the lists hold
        _lists_answer_as_the_index(cfg.index, m, kept, grid)

def _lists_answer_as_the_index(index: str, m: iv.IndexManifest, kept, grid: list[int]) -> None:
    """Every search a version's kept lists answer (indexing.candidates) is the search of
    the version's loaded index, but among exact ties (catalogs repeat images: the tied
    order of the reader's heap is not by id): every id in the list, the same distances; with
    re-ranking, a top k of the finer distances over some k x k_factor candidates the code
    distance ranks first, ties at the last one either way (_a_refined_top_k)."""
    from mimdex.indexing import candidates
    from mimdex.infra.contracts import search_lists

    lists = search_lists.read(iv.version_uri(index, m.version), m.search_lists)["held_out"]
    reader = IndexReader.open(index, m.version)
    assert sorted(set(lists.nprobe.tolist())) == grid
    for p in grid:
        mine = lists.take(np.flatnonzero(lists.nprobe == p))
        mine = mine.take(np.argsort(mine.query)[np.searchsorted(np.sort(mine.query), kept.own)])
        for k in (2, 11, candidates.kept_k(reader.k_factor) + 1):
            ids, known = candidates.answer(mine, k, reader.k_factor)
            want = reader.search(kept.vectors, k, p)[1]
            assert known.all()
            for r in np.flatnonzero((ids != want).any(1)):
                coarse = dict(zip(mine.ids[r].tolist(), mine.dists[r].tolist()))
                assert all(i in coarse for i in want[r]), (p, k)
                if mine.refined is None:
                    np.testing.assert_allclose(sorted(coarse[i] for i in want[r]), sorted(coarse[i] for i in ids[r]))
                    continue
                finer = dict(zip(mine.ids[r].tolist(), mine.refined[r].tolist()))
                for got in (want[r], ids[r]):
                    _a_refined_top_k(mine.dists[r], coarse, finer, got.tolist(), k * reader.k_factor)


def _a_refined_top_k(row: np.ndarray, coarse: dict, finer: dict, got: list[int], m: int) -> None:
    """``got`` is the top k by the finer distance of *some* m candidates nearest by code
    distance. Fast-scan distances are quantised, so several candidates can tie at the m-th
    code distance, and faiss's heap keeps whichever it met first (the order its threads
    scanned the lists in), where candidates.answer keeps the lowest ids: the two answers
    may then differ, each right. Every candidate strictly nearer than the m-th is in
    both candidate sets, so none of them left out of ``got`` may be finer-nearer."""
    cut = np.sort(row)[m - 1] if len(row) >= m else np.inf
    assert all(coarse[i] <= cut for i in got), (got, cut)
    worst = max(finer[i] for i in got)
    missed = [finer[i] for i, d in coarse.items() if d < cut and i not in got and finer[i] < worst]
    np.testing.assert_allclose(missed, [worst] * len(missed), rtol=1e-6)


def _grid(m: iv.IndexManifest) -> list[int]:
    sweep = [r["nprobe"] for r in m.evaluation["held_out"]["sweep"]]
    return [p for p in sweep + [2 * sweep[-1]] if p <= m.params["nlist"]]
