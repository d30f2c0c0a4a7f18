"""A sustained S3 fault rate, heavier than the test suite's: the encode -> build-index ->
search -> refresh -> compact lifecycle through the fault proxy at a 30% *failure* rate
(503 SlowDown, 500, dropped connections, and writes that commit and then lose their answer,
in equal shares) plus 5% delayed answers (not counted as failures), against the same
lifecycle without faults, once per seed.

    .venv/bin/python tests/benchmarks/bench_faults.py [--rate 0.3] [--latency-rate 0.05]
                                                      [--products 400] [--seeds 3 4 5] [--json FILE]

Prints, per seed: the requests, the failures injected by kind and the measured failure
rate, the delayed answers apart, the writes the server made whose answer was lost, the
retries each job reported, and what differed (nothing may: same embeddings, same index
codes and id maps, same search results; every job exits 0, or the run stops there).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import random_bundle  # noqa: E402
from fault_proxy import FAILURES, FaultProxy  # noqa: E402
from test_faults import lifecycle  # noqa: E402

from mimdex.infra.local_s3 import create_bucket, local_s3_server  # noqa: E402


def compare(clean: dict, faulty: dict) -> dict:
    changed = [p for p in clean["vectors"] if p in faulty["vectors"]
               and not np.array_equal(clean["vectors"][p], faulty["vectors"][p])]
    return {"lost": len(set(clean["vectors"]) - set(faulty["vectors"])),
            "extra": len(set(faulty["vectors"]) - set(clean["vectors"])), "vectors_changed": len(changed),
            "codes_identical": faulty["shards"] == clean["shards"] and faulty["trained"] == clean["trained"],
            "ids_identical": faulty["ids"] == clean["ids"], "search_identical": faulty["searched"] == clean["searched"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=0.3, help="share of requests that fail")
    ap.add_argument("--latency-rate", type=float, default=0.05, help="share of answers delayed (not failures)")
    ap.add_argument("--products", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, local_s3_server() as endpoint:
        model = os.path.join(tmp, "model")
        random_bundle(model, ["product title"], "3-tower")
        t0 = time.perf_counter()
        clean = lifecycle(create_bucket(endpoint, "bench-clean"), model, dict(os.environ), args.products)
        t_clean = time.perf_counter() - t0
        print(f"lifecycle of {args.products} products (encode, build-index, search, refresh of 3 retitled, "
              f"compact): {t_clean:.0f} s without faults")
        host, port = endpoint.rsplit("//", 1)[1].split(":")
        for seed in args.seeds:
            proxy = FaultProxy((host, int(port)), rate=args.rate, latency_rate=args.latency_rate, seed=seed)
            t0 = time.perf_counter()
            with proxy as via:
                faulty = lifecycle(create_bucket(endpoint, f"bench-faulty-{seed}"), model,
                                   {**os.environ, "AWS_ENDPOINT_URL_S3": via}, args.products)
            seconds = time.perf_counter() - t0
            diff = compare(clean, faulty)
            row = {"seed": seed, "requests": proxy.requests, "failures": proxy.failures,
                   "failure_rate": round(proxy.failure_rate, 4),
                   "by_kind": {k: proxy.injected[k] for k in FAILURES}, "delayed": proxy.injected["latency"],
                   "ambiguous_writes": len(proxy.committed_then_dropped),
                   "retries": {job: r.get("storage_retries") for job, r in faulty["reports"].items()},
                   "seconds": round(seconds, 1), **diff}
            results.append(row)
            print(f"seed {seed}: {proxy.requests} requests, {proxy.failures} failed ({proxy.failure_rate:.1%}: "
                  + ", ".join(f"{k} {proxy.injected[k]}" for k in FAILURES)
                  + f"), {row['delayed']} delayed, {row['ambiguous_writes']} writes committed with their answer lost; "
                  f"lost {diff['lost']}, extra {diff['extra']}, vectors changed {diff['vectors_changed']}, codes "
                  f"identical {diff['codes_identical']}, id maps {diff['ids_identical']}, search "
                  f"{diff['search_identical']}; every job exit 0; {seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rate": args.rate, "latency_rate": args.latency_rate, "products": args.products,
                       "clean_seconds": round(t_clean, 1), "runs": results}, f, indent=2)
    bad = [r["seed"] for r in results if r["lost"] or r["extra"] or r["vectors_changed"]
           or not (r["codes_identical"] and r["ids_identical"] and r["search_identical"])]
    if bad:
        sys.exit(f"seeds {bad}: the faulty lifecycle differs from the clean one")


if __name__ == "__main__":
    main()
