"""Products with several photos: index every photo, the main photo only, or one pooled
vector per product, with the same model, queries and index parameters, side by side.

    .venv/bin/python tests/benchmarks/bench_photos.py [--products 3000] [--epochs 20] [--preset tiny]
                                                      [--large 200000]

One synth-catalog with --views 4 (1 to 4 photos per product: main, pose, crop,
background, lighting); one 3-tower model trained on it (positives drawn from any
photo); one encode; then build-index --photos every / main / pooled. Street queries of
held-out products are searched through each published index at its default nprobe,
collapsed to distinct products (a product is found when any of its photos is).

Goals (issue "Products with several photos"):
  * every photo vs main photo only: street recall@10 higher; bytes per product reported;
  * search with collapse: QPS >= 0.8x that of a one-photo index holding the same number
    of vectors (the same photo vectors, each its own product; same factory and nprobe),
    and every query gets k distinct products. Measured on the trained model's index, and
    (--large) on synthetic photo vectors of that many products, where search costs what
    it costs at scale rather than being dominated by per-call overheads.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from mimdex.encoders.queries import vectors_for
from mimdex.encoders.training import TrainConfig, recipe_for
from mimdex.indexing.query_recall import query_recall
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts.vectors import column_matrix
from mimdex.pipelines import train as train_job
from mimdex.pipelines.build_index import BuildConfig
from mimdex.pipelines.build_index import run as build
from mimdex.pipelines.encode import EncodeConfig
from mimdex.pipelines.encode import run as encode
from mimdex.pipelines.synth import SynthConfig
from mimdex.pipelines.synth import job as synth

from bench_index import qps  # noqa: E402 - a sibling benchmark script (this directory is on sys.path)

K = 10


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="keep the data here (default: a temp dir, removed at the end)")
    ap.add_argument("--products", type=int, default=3000)
    ap.add_argument("--queries", type=int, default=600)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--large", type=int, default=200_000,
                    help="also compare QPS at this many products of synthetic vectors (0: skip)")
    args = ap.parse_args()
    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="bench-photos-")
    try:
        _run(work, args)
        if args.large:
            _large(work, args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _compare_qps(work: str, root: str, multi_out: str, name: str, shards: int, seed: int, queries: np.ndarray):
    """QPS of search_distinct over a multi-photo index vs plain search over a one-photo
    index of the same vectors (each photo its own product), same factory and nprobe."""
    multi = IndexReader.open(multi_out)
    table = emb.read_all(root, emb.read_manifest(root), "part")
    labels = [f"{p}#{ph}" for p, ph in zip(table.column("product_id").to_pylist(), table.column("photo").to_pylist())]
    single_root, single_out = storage.join(work, f"emb-single-{name}"), storage.join(work, f"index-single-{name}")
    emb.write_vectors(single_root, column_matrix(table, "image_emb"), labels, emb.read_manifest(root).model,
                      emb.read_manifest(root).dtype, parts=8)
    build(BuildConfig(embeddings=single_root, out=single_out, shards=shards, factory=multi.params["factory"],
                      eval_queries=500, seed=seed))
    single, nprobe = IndexReader.open(single_out), multi.default_nprobe
    bench_q = np.ascontiguousarray(np.tile(queries, (max(1, 4096 // len(queries)), 1)))
    qps_single = qps_multi = 0.0
    for _ in range(7):  # alternated, best of each: this machine's speed drifts by ±10% over a minute
        qps_single = max(qps_single, qps(lambda x: single.search(x, K, nprobe), bench_q, repeat=1))
        qps_multi = max(qps_multi, qps(lambda x: multi.search_distinct(x, K, nprobe), bench_q, repeat=1))
    _, _, keys = multi.search_distinct(bench_q, K, nprobe)
    distinct = all(len(set(r.tolist()) - {-1}) == K for r in keys)
    ratio = qps_multi / qps_single
    print(f"QPS ({name}) at nprobe {nprobe}, {multi.params['factory']}, {len(bench_q)} queries, k={K}: collapse over "
          f"{multi.ntotal} vectors of {multi.products} products {qps_multi:,.0f} vs one-photo index of "
          f"{single.ntotal} vectors {qps_single:,.0f} = {ratio:.2f}x (goal >= 0.8x): {_verdict(ratio >= 0.8)}; "
          f"k distinct products for every query: {_verdict(distinct)}")


def _large(work: str, args) -> None:
    """Synthetic photo vectors at scale: 1 to 4 photos per product around a clustered
    product vector (no model), written in the multi-photo part layout."""
    from mimdex.infra.contracts.model import ModelRef

    rng = np.random.default_rng(args.seed)
    n, d = args.large, 256
    centers = rng.standard_normal((1000, d)).astype(np.float32)
    base = centers[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    counts = rng.integers(1, 5, n)
    owner = np.repeat(np.arange(n), counts)
    x = base[owner] + 0.35 * rng.standard_normal((len(owner), d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    positions = np.concatenate([np.arange(c) for c in counts])
    model = ModelRef("synthetic", "0" * 64, "image-only", d, False)
    root = storage.join(work, "emb-large")
    entries = []
    for i, sl in enumerate(np.array_split(np.arange(n), 16)):
        rows = np.flatnonzero((owner >= sl[0]) & (owner <= sl[-1]))
        name = f"part-{i:05d}"
        table = emb.part_table(model, "float16", name, "-", [f"P{o:08d}" for o in owner[rows]], ["-"] * len(rows),
                               x[rows], None, positions[rows].tolist(), ["-"] * len(rows))
        part, _, _ = emb.write_part(root, name, table, [])
        entries.append(emb.PartEntry(name=name, part=part, unit=i, input_rows=len(sl)))
    emb.write_manifest(root, emb.build_manifest(entries, model, "float16", "-", 0))
    out = storage.join(work, "index-large")
    t0 = time.perf_counter()
    build(BuildConfig(embeddings=root, out=out, shards=args.shards, eval_queries=500, seed=args.seed))
    print(f"\nsynthetic: {n} products, {len(x)} photo vectors, build-index {time.perf_counter() - t0:.0f} s",
          flush=True)
    picks = rng.integers(0, len(x), 1024)
    queries = x[picks] + 0.2 * rng.standard_normal((1024, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _compare_qps(work, root, out, "synthetic", args.shards, args.seed, queries)


def _run(work: str, args) -> None:
    data = storage.join(work, "dataset")
    t0 = time.perf_counter()
    synth.run(SynthConfig(products=args.products, queries=args.queries, seed=13, views=4), data, progress=False)
    print(f"synth-catalog --views 4: {time.perf_counter() - t0:.0f} s", flush=True)
    model = storage.join(work, f"model-{args.preset}-3-tower-e{args.epochs}")
    t0 = time.perf_counter()
    train_job.train_unless_complete(
        train_job.TrainJob(data=data, catalog=storage.join(data, "catalog"), out=model, variant="3-tower",
                           preset=args.preset),
        TrainConfig(epochs=args.epochs, batch_size=128, seed=args.seed, **recipe_for(args.preset)), progress=False)
    print(f"train {args.preset} 3-tower, {args.epochs} epochs: {time.perf_counter() - t0:.0f} s", flush=True)
    root = storage.join(work, "emb")
    enc_report = encode(EncodeConfig(model=model, catalog=storage.join(data, "catalog"), out=root,
                                     progress=False)).report
    photos = emb.read_manifest(root).counts["encoded"]
    print(f"encode: {photos} photos of {args.products} products, {enc_report['seconds'].get('encode', 0):.0f} s "
          "(0: encoded by an earlier run)", flush=True)

    queries_uri = storage.join(data, "queries")
    qv = vectors_for(emb.read_manifest(root).model, f"embeddings {root}", queries_uri, "image")
    q = qv.street
    rows = {}
    for mode in ("every", "main", "pooled"):
        out = storage.join(work, f"index-{mode}")
        released = build(BuildConfig(embeddings=root, out=out, shards=args.shards, photos=mode, eval_queries=500,
                                     seed=args.seed, queries=queries_uri))
        reader = IndexReader.open(out)
        gate = released.evaluation["queries"]   # the street recall the version recorded (indexing.query_recall)
        _, _, found = reader.search_distinct(q, K, reader.default_nprobe)
        short = int((np.sum(found >= 0, axis=1) < K).sum())
        every_list = query_recall(reader, qv, reader.nlist)   # all lists probed: the codes' own recall
        rows[mode] = {**{k: gate[k] for k in ("recall@1", "recall@10", "recall@100")}, "vectors": reader.ntotal,
                      "products": reader.products, "nprobe": reader.default_nprobe,
                      "factory": released.report["params"]["factory"],
                      "bytes_per_product": released.report["index_bytes"] / reader.products,
                      "build_s": released.report["seconds"], "short_of_k": short,
                      "all_lists@10": every_list[f"recall@{K}"]}

    every = rows["every"]
    print(f"\n{args.products} products, {photos} photos (synth-catalog --views 4, seed 13); {len(q)} street queries "
          f"of held-out products; model {args.preset} 3-tower, {args.epochs} epochs; recall of the product "
          "(any photo) in k distinct products")
    print("| index | vectors | factory | nprobe | recall@1 | recall@10 | recall@100 | recall@10, all lists | "
          "bytes/product | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| --photos {mode} | {r['vectors']} | {r['factory']} | {r['nprobe']} | {r['recall@1']:.3f} | "
              f"{r['recall@10']:.3f} | {r['recall@100']:.3f} | {r['all_lists@10']:.3f} | "
              f"{r['bytes_per_product']:.0f} | "
              f"{sum(r['build_s'].values()):.0f} |")
    gain = every["recall@10"] - rows["main"]["recall@10"]
    print(f"\nevery photo vs main only: recall@10 {every['recall@10']:.3f} vs {rows['main']['recall@10']:.3f} "
          f"({gain:+.3f}), {every['bytes_per_product']:.0f} vs {rows['main']['bytes_per_product']:.0f} bytes per "
          f"product (goal: higher recall@10): {_verdict(gain > 0)}")
    _compare_qps(work, root, storage.join(work, "index-every"), "trained model", args.shards, args.seed, q)


if __name__ == "__main__":
    main()
