"""build-index against autofaiss on the same 1M vectors and the same memory budget.

    pip install --target /tmp/afpkgs --no-deps autofaiss embedding-reader fire termcolor \
        pandas python-dateutil pytz tzdata          # beside, not into, the project's venv
    PYTHONPATH=/tmp/afpkgs .venv/bin/python tests/benchmarks/bench_autofaiss.py [--n 1000000]

The vectors are bench_scale.py's (clustered, 256-d, fp16 parts). Ours: the whole
`mimdex build-index` CLI with its defaults. autofaiss: `build_index` on the same vectors
(read back from the parts as float32, not timed) with max_index_memory_usage = the bytes
of our index, so both spend the same memory; it tunes its own search parameters. With
``--budget 160M`` both get that budget (ours as --max-index-memory). Both
are then measured the same way on ours' 1,000 held-out queries (each excluded from its
own results): recall@10 of a top-10 search at the parameters each chose, queries/s of
that batch search, bytes per vector of the index in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_scale import ours, ours_vectors, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--budget", help="both builds' memory budget, e.g. 160M (default: our index's bytes)")
    ap.add_argument("--out", default="bench-output/autofaiss.json")
    args = ap.parse_args()
    import faiss
    from autofaiss import build_index

    from mimdex.indexing.params import parse_memory
    from mimdex.infra.contracts.recall import recall_at

    work = tempfile.mkdtemp(prefix="mimdex-autofaiss-")
    try:
        root = os.path.join(work, "emb")
        write(root, os.path.join(work, "model"), args.n)
        o = ours(root, os.path.join(work, "index"), 4, ("--max-index-memory", args.budget) if args.budget else ())
        rep = o.pop("report")
        nprobe = rep["default_nprobe"]
        at = next(r for r in rep["evaluation"]["held_out"]["sweep"] if r["nprobe"] == nprobe)
        s, x, ids, truth = ours_vectors(root, args.n, rep["params"]["train_size"])   # ours' held-out queries
        budget = parse_memory(args.budget) if args.budget else int(rep["index_bytes"])
        t0 = time.perf_counter()
        index, info = build_index(x, save_on_disk=False, max_index_memory_usage=f"{budget}B",
                                  current_memory_available="16G", metric_type="l2", verbose=30)
        t_af = time.perf_counter() - t0
        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            _, pos = index.search(s.held, 11)
            best = max(best, len(s.held) / (time.perf_counter() - t0))
        found = np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)
        found = np.array([[i for i in r if i != own][:10] for r, own in zip(found, s.held_ids)])
        af = {"build_s": round(t_af, 1), "index_key": info["index_key"], "index_param": info["index_param"],
              "recall@10": recall_at(found, truth)["recall@10"], "qps": round(best),
              "bytes_per_vector": round(len(faiss.serialize_index(index)) / args.n, 1)}
        mine = {"build_s": o["wall_s"], "factory": rep["params"]["factory"], "nprobe": nprobe,
                "recall@10": at["recall@10"], "qps": at["qps"], "bytes_per_vector": rep["bytes_per_vector"],
                "peak_rss_gb": o["peak_rss_gb"]}
        result = {"n": args.n, "budget_bytes": budget, "ours": mine, "autofaiss": af}
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\n{args.n} x 256 clustered, budget {budget / 2 ** 20:.0f} MiB "
              f"({'--budget' if args.budget else 'our index'}), {os.cpu_count()} CPUs")
        print(f"{'':10}{'build s':>9}{'index':>44}{'params':>22}{'R@10':>7}{'qps':>8}{'B/vec':>7}")
        print(f"{'mimdex':10}{mine['build_s']:>9.0f}{mine['factory']:>44}{'nprobe=%d' % nprobe:>22}"
              f"{mine['recall@10']:>7.3f}{mine['qps']:>8.0f}{mine['bytes_per_vector']:>7.0f}")
        print(f"{'autofaiss':10}{af['build_s']:>9.0f}{af['index_key']:>44}{af['index_param']:>22}"
              f"{af['recall@10']:>7.3f}{af['qps']:>8.0f}{af['bytes_per_vector']:>7.0f}")
        print(f"autofaiss / mimdex build time: {af['build_s'] / mine['build_s']:.2f}x (goal >= 2x at equal or "
              "better recall@10 and bytes per vector)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
