"""Is ours' recall@10 at 1M lower than raw faiss's, or inside raw's own k-means spread?

    .venv/bin/python tests/benchmarks/bench_raw_seeds.py [--n 1000000] [--seeds 1234 0 1 2 3]

bench_scale.py's vectors (under a temporary directory, removed at the end). Ours: the
`mimdex build-index` CLI with its defaults. Raw: faiss.index_factory with ours' factory,
trained on ours' training sample (the same draw) with each k-means seed (faiss's
default is 1234), then add; recall@10 of both at ours' default nprobe on ours' 1,000
held-out queries, each excluded from its own results, as bench_scale.py measures it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_scale import ours, ours_vectors, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 0, 1, 2, 3])
    args = ap.parse_args()
    import faiss

    from mimdex.infra.contracts.recall import recall_at

    work = tempfile.mkdtemp(prefix="mimdex-raw-seeds-")
    try:
        root = os.path.join(work, "emb")
        write(root, os.path.join(work, "model"), args.n)
        rep = ours(root, os.path.join(work, "index"), 4)["report"]
        p, nprobe = rep["params"], rep["default_nprobe"]
        mine = next(r for r in rep["evaluation"]["held_out"]["sweep"] if r["nprobe"] == nprobe)["recall@10"]
        s, x, ids, truth = ours_vectors(root, args.n, p["train_size"])   # ours' held-out queries
        raw = {}
        for seed in args.seeds:
            index = faiss.index_factory(x.shape[1], p["factory"])
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = seed
            index.train(s.train)
            index.add(x)
            ivf.nprobe = nprobe
            _, pos = index.search(s.held, 11)
            found = np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)
            found = np.array([[i for i in r if i != own][:10] for r, own in zip(found, s.held_ids)])
            raw[seed] = recall_at(found, truth)["recall@10"]
            print(f"raw seed {seed}: recall@10 {raw[seed]}", flush=True)
        print(f"\n{args.n} vectors, {p['factory']}, nprobe {nprobe}: ours {mine}; raw by k-means seed "
              + ", ".join(f"{k}: {v}" for k, v in raw.items())
              + f" (min {min(raw.values())}, median {float(np.median(list(raw.values())))}, max {max(raw.values())})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
