"""Which codes? recall@10, bytes per vector and queries/s of the code options build-index
chooses among, on the same vectors, coarse centroids and held-out queries.

    .venv/bin/python tests/benchmarks/bench_codes.py [--n 1000000] [--d 256] [--per-list 64]

Vectors: clustered unit vectors as bench_index.py makes them (1,000 centres, noise 0.6),
1,000 held-out queries from the same distribution; recall@10 = the exact nearest
neighbour is among the first 10 results. Every IVF option shares one set of coarse
centroids (the GEMM k-means build-index trains, ``--per-list`` points per list), so the
rows differ only in their codes (OPQ trains its own, as it must: it rotates the space).
"Refine(X)" re-ranks k x k_factor PQ candidates with X codes, which build-index's reader
does the same way (indexing/rerank.py). Exact: faiss IndexFlatL2 on the same cores.
The sweep stops at the first nprobe whose recall@10 reaches 0.999 or stops rising.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np

from mimdex.indexing.kmeans import kmeans


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 1 << 20):  # in blocks: 10M x 256 would need 3 temporaries of 10 GB
        m = min(1 << 20, n - i)
        x = centers[rng.integers(0, 1000, m)] + 0.6 * rng.standard_normal((m, d)).astype(np.float32)
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_qps(fn, q: np.ndarray) -> tuple[float, object]:
    best, out = 0.0, None
    for _ in range(2):
        t0 = time.perf_counter()
        out = fn(q)
        best = max(best, len(q) / (time.perf_counter() - t0))
    return best, out


def sweep(index, xq, gt, nlist: int, k_factor: int | None = None) -> list[dict]:
    rows, prev = [], -1.0
    ivf = faiss.extract_index_ivf(index)
    nprobe = 1
    while nprobe <= min(nlist, 512):
        ivf.nprobe = nprobe
        params = None
        if k_factor:
            params = faiss.IndexRefineSearchParameters(k_factor=k_factor)
        qps, (_, ids) = timed_qps(lambda q: index.search(q, 10, params=params), xq)
        r = float((ids == gt[:, None]).any(1).mean())
        rows.append({"nprobe": nprobe, "recall@10": round(r, 4), "qps": round(qps)})
        if r >= 0.999 or (nprobe >= 16 and r - prev < 0.002):
            break
        prev, nprobe = r, nprobe * 2
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--per-list", type=int, default=64)
    ap.add_argument("--nlist", type=int, help="default: the power of two nearest 4 sqrt(n); fewer lists emulate "
                    "the list lengths of a larger n (10M / 16384 lists = 610 per list ~ 1M / 1024 lists)")
    ap.add_argument("--only", nargs="*", help="factory strings (with {nlist}) to run instead of the default set")
    ap.add_argument("--out", default="bench-output/codes.json")
    args = ap.parse_args()
    n, d = args.n, args.d
    x = clustered(n + 1000, d)
    xb, xq = x[:n], x[n:]
    flat = faiss.IndexFlatL2(d)
    flat.add(xb)
    exact_qps, (_, gt) = timed_qps(lambda q: flat.search(q, 1), xq)
    gt = gt[:, 0]
    flat = None  # 1 GB at 1M: freed before the options are built
    nlist = args.nlist or 2 ** round(np.log2(4 * np.sqrt(n)))
    sample = xb[np.random.default_rng(1).choice(n, min(n, args.per_list * nlist), replace=False)]
    t0 = time.perf_counter()
    centroids, _ = kmeans(sample, nlist, seed=0)
    t_kmeans = time.perf_counter() - t0
    m = d // 2
    options = [
        (f"IVF{nlist},PQ{m}x4fs", None),
        (f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)", 4),
        (f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)", 10),
        (f"IVF{nlist},PQ{m // 2}x4fs,Refine(SQ8)", 10),
        (f"IVF{nlist},PQ{m}x4fs,Refine(SQfp16)", 10),
        (f"IVF{nlist},PQ{d // 4}x8", None),
        (f"OPQ{d // 4}_{d},IVF{nlist},PQ{d // 4}x8", None),
        (f"IVF{nlist},SQ8", None),
        (f"IVF{nlist}_HNSW32,PQ{m}x4fs,Refine(SQ8)", 10),
    ]
    if args.only:
        options = [(f.format(nlist=nlist), 10 if "Refine" in f else None) for f in args.only]
    results = {"n": n, "d": d, "nlist": nlist, "sample": len(sample), "kmeans_s": round(t_kmeans, 1),
               "exact_qps": round(exact_qps), "cpus": os.cpu_count(), "options": []}
    print(f"n={n} d={d} nlist={nlist} sample={len(sample)} kmeans {t_kmeans:.1f}s exact flat {exact_qps:.0f} q/s",
          flush=True)
    for factory, k_factor in options:
        index = faiss.index_factory(d, factory)
        t0 = time.perf_counter()
        if not factory.startswith("OPQ"):
            faiss.extract_index_ivf(index).quantizer.add(centroids)
        index.train(sample)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.add(xb)
        t_add = time.perf_counter() - t0
        nbytes = len(faiss.serialize_index(index)) / n
        rows = sweep(index, xq, gt, nlist, k_factor)
        row = {"factory": factory, "k_factor": k_factor, "train_s": round(t_train, 1), "add_s": round(t_add, 1),
               "bytes_per_vector": round(nbytes, 1), "sweep": rows}
        results["options"].append(row)
        best = next((r for r in rows if r["recall@10"] >= 0.95), rows[-1])
        print(f"{factory:44} kf={k_factor or '-':>3} train {t_train:6.1f}s add {t_add:6.1f}s {nbytes:7.1f} B/vec  "
              + "  ".join(f"np{r['nprobe']}:{r['recall@10']:.3f}@{r['qps']}" for r in rows)
              + f"   -> first >=0.95: nprobe {best['nprobe']} R@10 {best['recall@10']} "
              f"{best['qps']} q/s = {best['qps'] / exact_qps:.0f}x exact", flush=True)
        del index
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(args.out)


if __name__ == "__main__":
    main()
