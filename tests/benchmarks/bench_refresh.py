"""The nightly refresh against a full re-encode + rebuild, side by side (docs/benchmarks.md,
"Nightly refresh").

    .venv/bin/python tests/benchmarks/bench_refresh.py [--n 1000000] [--rss 1000000 10000000]

Part 1, at --n products of an ``image_uri`` catalog on local disk (one file per product,
hard links into a pool of 4,000 real synth JPEGs, so a HEAD is a real stat of a real file):
  * precomputed embeddings for every product, as encode writes them (the pool images
    encoded by the untrained tiny 3-tower, plus noise so no two products share a vector),
    with the fingerprint state encode records; not timed;
  * a full build of the index (timed: the measured full rebuild);
  * the full re-encode: estimated from the encode rate measured on a 20,000-product
    catalog of the same kind (stated as an estimate);
  * on each of --nights nights, --change (1%) of the catalog changed in equal shares (new,
    retitled, re-imaged, deleted), then `refresh` (timed whole: diff on Beam, the changed
    products really encoded on a local Ray, the delta segment, the ground truth,
    evaluation, publishing) and its report: rows and bytes read and written, per stage
    (the first night after the build recomputes the gate's ground truth; later ones
    update the one the previous version kept);
  * the version with its delta against the same version compacted: identical results and
    QPS at the default nprobe (goal >= 0.9x).
Part 2, peak RSS of the diff stage (a fresh process per size, catalogs with an
``image_version`` fingerprint column, embeddings parts that hold only states at d=8: the
diff reads states, not vectors) and of writing the delta segment, at each --rss size with
1% changed (goal: no growth from 1M to 10M).
Goals (issue #14): refresh <= 10% of full re-encode + rebuild; bytes written <= 5% of a
full index version; QPS with the delta >= 0.9x compacted; RSS flat in catalog size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.infra.contracts import catalog as cat
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts import fingerprint
from mimdex.infra.contracts.model import ModelRef

UNIT = 2048
SCHEMA = pa.schema([("product_id", pa.string()), ("title", pa.string()), ("image_uri", pa.string())])


def _rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it starts afresh at exec, not at
    the parent's size when it forked)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pool(tmp: str, k: int) -> tuple[list[bytes], list[str]]:
    from mimdex.pipelines import synth
    from mimdex.pipelines.synth import SynthConfig

    synth.run(SynthConfig(products=k, queries=2, seed=1, image_size=128), tmp + "/synth", workers=2, progress=False)
    t = storage.parquet_dataset(tmp + "/synth/catalog").to_table(columns=["title", "image"]).slice(0, k)
    return t.column("image").to_pylist(), t.column("title").to_pylist()


def _write_catalog(path: str, rows: dict, version: list[str] | None = None) -> None:
    table = pa.table(rows, SCHEMA)
    if version is not None:
        table = table.append_column("image_version", pa.array(version, pa.string()))
    pq.write_table(table, path, row_group_size=UNIT, compression="zstd")


def _link(pool_dir: str, root: str, rel: str, j: int) -> None:
    dst = os.path.join(root, rel)
    if os.path.lexists(dst):
        os.unlink(dst)
    os.link(os.path.join(pool_dir, f"{j}.jpg"), dst)


def _night(report: dict, seconds: float, d: int, change: float) -> dict:
    """One refresh's wall and bytes per stage, and the changed products' vector bytes (what
    the issue's goal compares the reads outside the diff against): the reads outside the
    diff's own, over those bytes; the refresh over the diff alone; the diff's scratch (the
    runs it wrote) per catalog row."""
    c = report["diff"]
    changed = c["new"] + c["changed"] + c["deleted"]
    vector_bytes = (c["new"] + c["changed"]) * d * 2   # float16 image vectors of the products encoded
    io = report.get("stage_io", {})
    outside = sum(v["read_bytes"] for k, v in io.items() if k not in ("diff",))
    read = report["read"]
    diff_s = report["seconds"]["diff"]
    return {"change": change, "refresh_s": round(seconds, 1), "diff_s": diff_s,
            "refresh_over_diff": round(seconds / max(diff_s, 1e-9), 2), "changed_products": changed,
            "changed_vector_bytes": vector_bytes, "stage_s": report["seconds"], "stage_io": io,
            "read_outside_diff": outside,
            "read_outside_diff_over_vector_bytes": round(outside / max(vector_bytes, 1), 2),
            "scratch_bytes": read["runs_written_bytes"],
            "scratch_bytes_per_row": round(read["runs_written_bytes"] / max(read["catalog_rows"], 1), 2),
            "runs_kept": read["runs_kept"], "payload_rows": read["payload_rows"],
            "encode_input": report.get("encode_input"), "search_lists": report.get("search_lists"),
            "ground_truth": report.get("ground_truth"), "decision": report["decision"]}


def part1(n: int, tmp: str, changes: list[float], versions: bool = False) -> dict:
    """``changes``: each night's changed share (0: a quiet night). ``versions``: the catalog
    has an image_version column (no HEAD or LIST; only the images a night encodes exist on
    disk: how a 10M catalog fits this machine)."""
    from mimdex.encoders.bundle import load_bundle, save_untrained_bundle
    from mimdex.indexing.reader import IndexReader
    from mimdex.pipelines import build_index, compact, encode
    from mimdex.pipelines.refresh import RefreshConfig, run as refresh

    k = 4000  # pool images: each night encodes 3% of n exactly (no noise); few copies of each keep the search honest
    images, titles = _pool(tmp, k)
    pool_dir, root = tmp + "/pool", tmp + "/cat"
    os.makedirs(pool_dir)
    sizes = []
    for j, data in enumerate(images):
        open(f"{pool_dir}/{j}.jpg", "wb").write(data)
        sizes.append(len(data))
    model_uri = tmp + "/model"
    sha = save_untrained_bundle(model_uri, titles, "3-tower", "tiny")
    enc = load_bundle(model_uri)
    pool_img, pool_txt = enc.encode_images(images), enc.encode_texts(titles)
    ref = ModelRef(model_uri, sha, enc.cfg.variant, enc.cfg.embed_dim, enc.model.has_text)

    t0 = time.perf_counter()
    pids = [f"P{i:08d}" for i in range(n)]
    rels = [f"img/{i // 10000:03d}/P{i:08d}.jpg" for i in range(n)]
    ptitle = [f"{titles[i % k]} #{i}" for i in range(n)]
    for d in range(n // 10000 + 1):
        os.makedirs(f"{root}/img/{d:03d}", exist_ok=True)
    version = ["v0"] * n if versions else None
    for i in range(0 if versions else n):
        _link(pool_dir, root, rels[i], i % k)
    _write_catalog(root + "/catalog.parquet", {"product_id": pids, "title": ptitle, "image_uri": rels}, version)
    rng = np.random.default_rng(0)
    entries = []
    for u, a in enumerate(range(0, n, UNIT)):
        b = min(n, a + UNIT)
        j = np.arange(a, b) % k
        x = pool_img[j] + 0.05 * rng.standard_normal((b - a, ref.d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        fps = [fingerprint.of_row(f"{root}/{rels[i]}", version[i], "image_version") if versions
               else fingerprint.of_object(f"{root}/{rels[i]}") for i in range(a, b)]
        states = [fingerprint.source_state(fp, ptitle[i], sha) for fp, i in zip(fps, range(a, b))]
        hashes = [cat.content_hash(images[i % k], ptitle[i], sha) for i in range(a, b)]
        name = f"part-{u:05d}"
        table = emb.part_table(ref, "float16", name, "-", pids[a:b], hashes, x, pool_txt[j], sources=(fps, states))
        part, _, _ = emb.write_part(tmp + "/emb", name, table, [])
        entries.append(emb.PartEntry(name=name, part=part, unit=u, source=root + "/catalog.parquet",
                                     row_groups=(u,), input_rows=b - a))
    emb.write_manifest(tmp + "/emb", emb.build_manifest(entries, ref, "float16", root + "/catalog.parquet", UNIT))
    setup = time.perf_counter() - t0
    print(f"[setup] {n} products, embeddings written in {setup:.0f} s (not timed)", flush=True)

    t0 = time.perf_counter()
    full = build_index.run(build_index.BuildConfig(embeddings=tmp + "/emb", out=tmp + "/index", shards=4))
    build_s = time.perf_counter() - t0
    print(f"[full build] {build_s:.1f} s, {full.report['files_bytes']} bytes", flush=True)

    # the encode rate, on 20k products of the same catalog
    sub = 20_000
    for i in range(sub if versions else 0):
        _link(pool_dir, root, rels[i], i % k)
    _write_catalog(tmp + "/sub.parquet", {"product_id": pids[:sub], "title": ptitle[:sub],
                                          "image_uri": [f"{root}/{r}" for r in rels[:sub]]})
    t0 = time.perf_counter()
    encode.run(encode.EncodeConfig(model=model_uri, catalog=tmp + "/sub.parquet", out=tmp + "/emb-rate",
                                   progress=False))
    rate = sub / (time.perf_counter() - t0)
    print(f"[encode rate] {rate:.0f} products/s (20k, Ray start-up included)", flush=True)

    # each night, its --changes share of the catalog changed in equal parts (new, retitled,
    # re-imaged, deleted): the first after the build recomputes the gate's ground truth and
    # searches its lists (build-index keeps neither), later ones update them (the steady state)
    alive = list(range(n))
    os.makedirs(f"{root}/img/new", exist_ok=True)
    cfg = RefreshConfig(catalog=root + "/catalog.parquet", model=model_uri, embeddings=tmp + "/emb",
                        index=tmp + "/index", unit_rows=UNIT, progress=False, keep=10)
    per_night = []
    for night, change in enumerate(changes):
        q = int(n * change / 4)
        perm = np.random.default_rng([1, night]).permutation(alive)
        retitle, reimage, delete = perm[:q], perm[q:2 * q], set(perm[2 * q:3 * q].tolist())
        for i in retitle:
            ptitle[i] += f" (edition {night})"
            if versions:   # re-encoded: its image is read
                _link(pool_dir, root, rels[i], i % k)
        for i in reimage:  # a pool image of another size: a new ETag-like fingerprint
            j = next(j for j in range(i % k + 1, i % k + k) if sizes[j % k] != sizes[i % k]) % k
            _link(pool_dir, root, rels[i], j)
            if versions:
                version[i] = f"v{night + 1}"
        alive = [i for i in alive if i not in delete]
        for m in range(q):  # new products join the catalog (and later nights' changes)
            pids.append(f"N{night}-{m:08d}")
            ptitle.append(f"relisted {titles[m % k]}")
            rels.append(f"img/new/N{night}-{m:08d}.jpg")
            version.append("v0") if versions else None
            _link(pool_dir, root, rels[-1], (m + night * q) % k)
            alive.append(len(pids) - 1)
        _write_catalog(root + "/catalog.parquet", {"product_id": [pids[i] for i in alive],
                                                   "title": [ptitle[i] for i in alive],
                                                   "image_uri": [rels[i] for i in alive]},
                       [version[i] for i in alive] if versions else None)
        t0 = time.perf_counter()
        report = refresh(cfg)
        refresh_s = time.perf_counter() - t0
        per_night.append(_night(report, refresh_s, ref.d, change))
        print(f"[refresh night {night + 1}, {change:.1%} changed] {refresh_s:.1f} s: {report['decision']}", flush=True)
        print(json.dumps(per_night[-1]), flush=True)
        if not report.get("nothing_to_do"):
            last, last_s = report, refresh_s
    report, refresh_s = last, last_s

    reader = IndexReader.open(tmp + "/index")
    x = np.concatenate([pool_img[np.arange(2000) % k] + 0.05 * rng.standard_normal((2000, ref.d))]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nprobe = reader.default_nprobe
    comp = compact.run(compact.CompactConfig(tmp + "/index"))
    compacted = IndexReader.open(tmp + "/index")
    same = all(np.array_equal(reader.search(x, 10, p)[1], compacted.search(x, 10, p)[1]) for p in (nprobe, 4 * nprobe))
    qd = _qps(lambda: reader.search(x, 10, nprobe), len(x))
    qc = _qps(lambda: compacted.search(x, 10, nprobe), len(x))
    qd = max(qd, _qps(lambda: reader.search(x, 10, nprobe), len(x)))  # alternated, best of each
    qc = max(qc, _qps(lambda: compacted.search(x, 10, nprobe), len(x)))

    full_encode_est = n / rate
    written = report["io"]["index_written_bytes"] + report["io"]["encode_written_bytes"]
    return {"n": n, "changes": changes, "image_version": versions, "nights": per_night, "changed": report["diff"], "refresh_s": round(refresh_s, 1),
            "refresh_stages_s": report["seconds"], "full_build_s": round(build_s, 1),
            "encode_rate_per_s": round(rate, 1), "full_encode_estimated_s": round(full_encode_est, 1),
            "refresh_over_full": round(refresh_s / (full_encode_est + build_s), 4),
            "read": report["read"], "io": report["io"], "encoded": report["encode"]["encoded"],
            "full_version_bytes": full.report["files_bytes"],
            "index_written_over_full": round(report["io"]["index_written_bytes"] / full.report["files_bytes"], 4),
            "all_written_over_full": round(written / full.report["files_bytes"], 4),
            "compaction_s": comp.get("seconds"), "same_results_after_compaction": same,
            "qps_with_delta": round(qd), "qps_compacted": round(qc), "qps_ratio": round(qd / qc, 3),
            "decision": report["decision"], "rss_mb": round(_rss_mb())}


def _qps(fn, nq: int) -> float:
    t0 = time.perf_counter()
    fn()
    return nq / (time.perf_counter() - t0)


def make_rss_data(n: int, tmp: str) -> None:
    """A catalog with an image_version column and an embeddings root of states (d=8)."""
    sha = "cd" * 32
    ref = ModelRef("model", sha, "3-tower", 8, False)
    pids = [f"P{i:09d}" for i in range(n)]
    titles = [f"product {i}" for i in range(n)]
    version = [f"v{i % 7}" for i in range(n)]
    rows = 65_536
    os.makedirs(tmp + "/cat")
    with pq.ParquetWriter(tmp + "/cat/catalog.parquet", pa.schema(list(SCHEMA) + [("image_version", pa.string())]),
                          compression="zstd") as w:
        for a in range(0, n, rows):
            b = min(n, a + rows)
            changed = set(range(a, b, 100))  # 1% of the catalog has a new image version
            w.write_table(pa.table({"product_id": pids[a:b], "title": titles[a:b],
                                    "image_uri": [f"img/{p}.jpg" for p in pids[a:b]],
                                    "image_version": [version[i] + ("x" if i in changed else "")
                                                      for i in range(a, b)]}), row_group_size=UNIT * 8)
    entries = []
    zeros = np.ones((rows, 8), np.float32)
    for u, a in enumerate(range(0, n, rows)):
        b = min(n, a + rows)
        fps = [f"image_version:{version[i]}" for i in range(a, b)]
        states = [fingerprint.source_state(fp, titles[i], sha) for fp, i in zip(fps, range(a, b))]
        name = f"part-{u:05d}"
        table = emb.part_table(ref, "float16", name, "-", pids[a:b], ["-"] * (b - a), zeros[: b - a], None,
                               sources=(fps, states))
        part, _, _ = emb.write_part(tmp + "/emb", name, table, [])
        entries.append(emb.PartEntry(name=name, part=part, unit=u, input_rows=b - a))
    emb.write_manifest(tmp + "/emb", emb.build_manifest(entries, ref, "float16", tmp + "/cat", rows))


def rss_child(tmp: str) -> None:
    """In a fresh process: the diff, the encode input, and the delta segment; peak RSS after each."""
    import faiss

    from mimdex.infra.contracts import index_codec as codec
    from mimdex.pipelines.refresh import diff as diffs
    from mimdex.pipelines.refresh.diff_graph import run_diff
    from mimdex.pipelines.refresh.update import Delta, write_delta

    out = {"rss_start_mb": round(_rss_mb())}
    t0 = time.perf_counter()
    d, read = run_diff(tmp + "/cat/catalog.parquet", "cd" * 32, tmp + "/emb", emb.read_manifest(tmp + "/emb"),
                       tmp + "/diff")
    out.update(diff_s=round(time.perf_counter() - t0, 1), diff=d.summary(), buckets=read["buckets"],
               rss_after_diff_mb=round(_rss_mb()))
    t0 = time.perf_counter()
    wanted = d.ids(*diffs.TO_ENCODE)
    cat.write_subset(tmp + "/cat/catalog.parquet", wanted, tmp + "/subset.parquet")
    out.update(subset_s=round(time.perf_counter() - t0, 1), rss_after_subset_mb=round(_rss_mb()))
    index = faiss.index_factory(8, "IVF64,PQ4x4fs")
    index.train(np.random.default_rng(0).standard_normal((5000, 8)).astype(np.float32))
    ids = wanted.to_pylist()
    from mimdex.infra.contracts.vectors import ids_for
    keys = ids_for(ids)
    delta = Delta(np.random.default_rng(1).standard_normal((len(ids), 8)).astype(np.float32), keys,
                  pa.table({"id": pa.array(keys, pa.int64()), "product_id": pa.array(ids, pa.string())}), {}, keys)
    t0 = time.perf_counter()
    write_delta(tmp + "/index/v", "v", codec.serialize(index), 4, ids, delta)
    out.update(update_s=round(time.perf_counter() - t0, 1), rss_after_update_mb=round(_rss_mb()))
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--rss", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--changes", type=float, nargs="+", default=[0.01, 0.01, 0.0, 0.001],
                    help="each night's changed share, in order (0: a quiet night; the first night after the "
                         "build searches and recomputes what the build keeps none of)")
    ap.add_argument("--image-version", action="store_true",
                    help="a catalog with an image_version column, images on disk only where a night encodes them")
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument("--rss-child")
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child)
    results = {}
    if not args.skip_part1:
        tmp = tempfile.mkdtemp(prefix="bench-refresh-")
        try:
            results["refresh"] = part1(args.n, tmp, args.changes, args.image_version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        r = results["refresh"]
        print(json.dumps(r, indent=1), flush=True)
        print("\n| night | changed | refresh s | diff s | refresh / diff | read outside the diff | / changed "
              "vector bytes | diff scratch per row | encode input from the diff / the catalog | lists searched again |")
        for i, nt in enumerate(r["nights"], 1):
            ei, sl = nt["encode_input"] or {}, nt["search_lists"] or {}
            print(f"| {i} | {nt['change']:.1%} ({nt['changed_products']:,}) | {nt['refresh_s']} | {nt['diff_s']} | "
                  f"{nt['refresh_over_diff']} | {nt['read_outside_diff']:,} B | "
                  f"{nt['read_outside_diff_over_vector_bytes']}x | {nt['scratch_bytes_per_row']} B | "
                  f"{ei.get('rows_from_the_diff', '-')} / {ei.get('rows_read_from_the_catalog', '-')} | "
                  f"{sl.get('searched_again', '-')} of {sl.get('lists', '-')} |")
            print("|   | stages: " + ", ".join(f"{k} {v} s / {nt['stage_io'].get(k, {}).get('read_bytes', 0):,} B read"
                                             for k, v in nt["stage_s"].items()) + " |")
        print("\n| n | refresh | full re-encode (est.) + rebuild | ratio (goal <= 0.10) | index bytes written / full "
              "version (goal <= 0.05) | all bytes written / full | QPS delta / compacted (goal >= 0.9) |")
        print(f"| {r['n']:,} | {r['refresh_s']} s | {r['full_encode_estimated_s']} + {r['full_build_s']} s | "
              f"{r['refresh_over_full']} | {r['index_written_over_full']} | {r['all_written_over_full']} | "
              f"{r['qps_with_delta']} / {r['qps_compacted']} = {r['qps_ratio']} |", flush=True)
    rows = []
    for n in args.rss:
        tmp = tempfile.mkdtemp(prefix="bench-refresh-rss-")
        try:
            t0 = time.perf_counter()
            make_rss_data(n, tmp)
            print(f"[rss data] {n} rows in {time.perf_counter() - t0:.0f} s", flush=True)
            child = subprocess.run([sys.executable, __file__, "--rss-child", tmp], capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(child.stderr[-3000:])
            rows.append({"n": n, **json.loads(child.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        print("\n| catalog rows | diff s | changed | peak RSS after diff | after encode input | after delta write |")
        for r in rows:
            print(f"| {r['n']:,} | {r['diff_s']} | {r['diff']['changed']:,} | {r['rss_after_diff_mb']} MB | "
                  f"{r['rss_after_subset_mb']} MB | {r['rss_after_update_mb']} MB |")
        if len(rows) > 1:
            print(f"RSS growth {rows[0]['n']:,} -> {rows[-1]['n']:,}: "
                  f"{rows[-1]['rss_after_update_mb'] / rows[0]['rss_after_update_mb']:.2f}x (goal: no growth)")


if __name__ == "__main__":
    main()
