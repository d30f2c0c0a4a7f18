"""build-index at 1M and 10M vectors against raw faiss, side by side, with peak memory.

    .venv/bin/python tests/benchmarks/bench_scale.py --n 1000000 10000000 [--shards 4]

Vectors: clustered unit vectors (256-d, 1,000 centres, noise 0.6, seeded), written as
encode writes them (fp16 parts of 250,000 rows) under a temporary directory that is
removed at the end. Per n, each in its own process, one after the other:

  * ours: the whole `mimdex build-index` CLI with its own defaults (sample, train, Beam
    add/merge with the nearest neighbours found inside, evaluation, publish). Peak RSS is
    the peak of the summed RSS of the CLI and every process it started (Beam workers),
    sampled every 0.2 s; peak_split_gb: the CLI's and each worker's share at that moment;
    peak_by_stage_gb: the peak within each stage of the report's timings.
  * raw: faiss.index_factory(d, F) with ours' factory F, trained on a random sample of
    ours' training size, then add() block by block (the blocks read from the same parts,
    not timed; train + add are). recall@10 at ours' default nprobe on ours' held-out
    queries (excluded from their own results, as ours), k_factor as ours for Refine.
    Peak RSS: the process's VmHWM.
  * exact: the same queries by blockwise brute force (indexing/exact.py) over all
    vectors, on the same cores: the queries/s every ANN number is compared with.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

PART_ROWS = 250_000
D = 256


def vectors(n: int, seed: int = 0):
    """(part vectors, product ids) blocks of the clustered set, made one at a time."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, D)).astype(np.float32)
    for start in range(0, n, PART_ROWS):
        m = min(PART_ROWS, n - start)
        x = centers[rng.integers(0, 1000, m)] + 0.6 * rng.standard_normal((m, D)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x, [f"v{i:010d}" for i in range(start, start + m)], None


def write(root: str, model: str, n: int) -> None:
    from mimdex.encoders.bundle import save_untrained_bundle
    from mimdex.infra.contracts.embeddings import write_vector_parts
    from mimdex.infra.contracts.model import ModelRef

    sha = save_untrained_bundle(model, ["bench"], "3-tower")
    write_vector_parts(root, vectors(n), ModelRef(model, sha, "3-tower", D, False), "float16")


def tree_rss(proc: psutil.Process) -> list[int]:
    """RSS of the CLI (first) and of each process it started."""
    out = []
    for p in [proc] + proc.children(recursive=True):
        try:
            out.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return out


def ours(emb: str, out: str, shards: int, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "mimdex.pipelines.cli", "build-index", "--embeddings", emb, "--out", out,
           "--shards", str(shards), *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak, split, timeline = psutil.Process(proc.pid), 0, [], []
    while proc.poll() is None:
        rss = tree_rss(ps)
        timeline.append((time.perf_counter() - t0, sum(rss)))
        if sum(rss) > peak:
            peak, split = sum(rss), rss
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    log = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"build-index failed ({proc.returncode}):\n{log[-3000:]}")
    report_uri = log.strip().splitlines()[-1]
    with open(report_uri) as f:
        report = json.load(f)
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(peak / 2 ** 30, 2),
            "peak_split_gb": [round(r / 2 ** 30, 2) for r in split],
            "peak_by_stage_gb": stage_peaks(timeline, report["seconds"], wall), "report": report}


def ours_vectors(root: str, n: int, train_size: int):
    """Ours' sample and held-out queries drawn again, every vector with its id, and each
    query's exact nearest neighbour: what a side-by-side build is measured on."""
    import numpy as np

    from mimdex.indexing.exact import ExactTopK
    from mimdex.indexing.release import Source, blocks, sample_vectors
    from mimdex.infra.contracts import embeddings as emb

    src = Source(root, emb.read_manifest(root), "image", 0.5)
    s = sample_vectors(src, n, train_size, 1000, 0)
    xs, ids = [], []
    acc = ExactTopK(s.held, 1, s.held_ids)
    for _, v, i in blocks(src):
        xs.append(v)
        ids.append(i)
        acc.add(v, i)
    return s, np.concatenate(xs), np.concatenate(ids), acc.result()[1][:, 0]


def stage_peaks(timeline: list[tuple[float, int]], seconds: dict, wall: float) -> dict:
    """The summed RSS's peak in each of the report's stages. Stages run one after the other
    in STAGES order; the time before the first (imports) is wall minus their sum, so the
    bounds are approximate by the interpreter's exit time."""
    bounds, t = {}, wall - sum(seconds.values())
    for name in STAGES:
        if name in seconds:
            bounds[name] = (t, t + seconds[name])
            t += seconds[name]
    return {name: round(max((r for at, r in timeline if a <= at <= b), default=0) / 2 ** 30, 2)
            for name, (a, b) in bounds.items()}


STAGES = ("validate", "sample", "train", "beam", "collect", "evaluate", "publish")


RAW = r'''
import json, sys, time
import faiss, numpy as np
from mimdex.indexing.exact import ExactTopK
from mimdex.indexing.release import Source, blocks, sample_vectors
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts.recall import recall_at
root, factory, train_size, nprobe, k_factor, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
src = Source(root, emb.read_manifest(root), "image", 0.5)
s = sample_vectors(src, n, train_size, 1000, 0)       # ours' sample and held-out queries, drawn again
index = faiss.index_factory(s.train.shape[1], factory)
t0 = time.perf_counter(); index.train(s.train); t_train = time.perf_counter() - t0
t_add, t_exact, ids = 0.0, 0.0, []
acc = ExactTopK(s.held, 1, s.held_ids)
for _, v, i in blocks(src):
    t0 = time.perf_counter(); index.add(v); t_add += time.perf_counter() - t0
    t0 = time.perf_counter(); acc.add(v, i); t_exact += time.perf_counter() - t0
    ids.append(i)
ids = np.concatenate(ids)
truth = acc.result()[1][:, 0]
faiss.extract_index_ivf(index).nprobe = nprobe
params = faiss.IndexRefineSearchParameters(k_factor=k_factor) if isinstance(index, faiss.IndexRefine) else None
best = 0.0
for _ in range(2):
    t0 = time.perf_counter(); _, pos = index.search(s.held, 11, params=params); best = max(best, len(s.held) / (time.perf_counter() - t0))
found = np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)
found = np.array([[i for i in r if i != own][:10] for r, own in zip(found, s.held_ids)])
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"train_s": round(t_train, 1), "add_s": round(t_add, 1), "train_add_s": round(t_train + t_add, 1),
                  "recall@10": recall_at(found, truth)["recall@10"], "qps": round(best), "peak_rss_gb": round(hwm / 2 ** 30, 2),
                  "exact_qps": round(len(s.held) / t_exact, 1), "bytes_per_vector": round(len(faiss.serialize_index(index)) / index.ntotal, 1)}))
'''


def raw(emb: str, factory: str, train_size: int, nprobe: int, k_factor: int, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", RAW, emb, factory, str(train_size), str(nprobe), str(k_factor), str(n)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"raw faiss failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--out", default="bench-output/scale.json")
    args = ap.parse_args()
    results = []
    for n in args.n:
        work = tempfile.mkdtemp(prefix=f"mimdex-scale-{n}-")
        try:
            t0 = time.perf_counter()
            write(os.path.join(work, "emb"), os.path.join(work, "model"), n)
            print(f"n={n}: embeddings written in {time.perf_counter() - t0:.0f} s", flush=True)
            o = ours(os.path.join(work, "emb"), os.path.join(work, "index"), args.shards)
            rep = o.pop("report")
            p, nprobe = rep["params"], rep["default_nprobe"]
            at = next(r for r in rep["evaluation"]["held_out"]["sweep"] if r["nprobe"] == nprobe)
            o.update(factory=p["factory"], nprobe=nprobe, why=rep["evaluation"]["held_out"]["why"],
                     seconds=rep["seconds"], recall10=at["recall@10"], qps=at["qps"],
                     bytes_per_vector=rep["bytes_per_vector"], train_size=p["train_size"], beam_args=rep["beam_args"],
                     sweep=rep["evaluation"]["held_out"]["sweep"])
            print(f"n={n} ours: {json.dumps(o)}", flush=True)
            r = raw(os.path.join(work, "emb"), p["factory"], p["train_size"], nprobe, p["k_factor"], n)
            print(f"n={n} raw:  {json.dumps(r)}", flush=True)
            results.append({"n": n, "ours": o, "raw": r})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nbuild-index vs raw faiss, {os.cpu_count()} CPUs, {args.shards} shards, clustered 256-d")
    print(f"{'n':>10} {'factory':40} {'np':>3} {'wall ours/raw s':>18} {'ratio':>6} {'R@10 ours/raw':>15} "
          f"{'qps ours/raw/exact':>22} {'B/vec':>6} {'RSS ours/raw GB':>16}")
    for r in results:
        o, w = r["ours"], r["raw"]
        print(f"{r['n']:>10} {o['factory']:40} {o['nprobe']:>3} {o['wall_s']:>8.0f} /{w['train_add_s']:>7.0f} "
              f"{o['wall_s'] / w['train_add_s']:>6.2f} {o['recall10']:>7.3f} /{w['recall@10']:>6.3f} "
              f"{o['qps']:>8.0f} /{w['qps']:>6.0f} /{w['exact_qps']:>5.0f} {o['bytes_per_vector']:>6.0f} "
              f"{o['peak_rss_gb']:>7.2f} /{w['peak_rss_gb']:>6.2f}")
    for r in results:
        print(f"{r['n']:>10} ours' peak RSS GB by stage: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["ours"]["peak_by_stage_gb"].items() if v))
    if len(results) > 1:
        print(f"peak RSS growth {results[0]['n']} -> {results[-1]['n']}: "
              f"{results[-1]['ours']['peak_rss_gb'] / results[0]['ours']['peak_rss_gb']:.2f}x (goal <= 1.3x, <= 4 GB)")
    print("goals: wall ours/raw <= 1.0 (stretch 0.5); R@10 ours >= raw at the same nprobe; "
          "default R@10 >= 0.95 at >= 10x exact queries/s")
    print(args.out)


if __name__ == "__main__":
    main()
