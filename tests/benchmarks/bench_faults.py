"""A sustained S3 fault rate, heavier than the test suite's: the encode -> build-index ->
search -> refresh lifecycle through the fault proxy at 30% (503 SlowDown, 500, dropped
connections, latency, in equal shares), against the same lifecycle without faults.

    .venv/bin/python tests/benchmarks/bench_faults.py [--rate 0.3] [--products 400]

Prints the faults injected, the retries each job reported, and what differed (nothing
may: same embeddings, same index codes and id maps, same search results).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import random_bundle  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402
from test_faults import lifecycle  # noqa: E402

from mimdex.infra.local_s3 import create_bucket, local_s3_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=0.3)
    ap.add_argument("--products", type=int, default=400)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_s3_server() as endpoint:
        model = os.path.join(tmp, "model")
        random_bundle(model, ["product title"], "3-tower")
        t0 = time.perf_counter()
        clean = lifecycle(create_bucket(endpoint, "bench-clean"), model, dict(os.environ), args.products)
        t_clean = time.perf_counter() - t0
        host, port = endpoint.rsplit("//", 1)[1].split(":")
        proxy = FaultProxy((host, int(port)), rate=args.rate, seed=args.seed)
        t0 = time.perf_counter()
        with proxy as via:
            faulty = lifecycle(create_bucket(endpoint, "bench-faulty"), model,
                               {**os.environ, "AWS_ENDPOINT_URL_S3": via}, args.products)
        t_faulty = time.perf_counter() - t0
    lost = sorted(set(clean["vectors"]) - set(faulty["vectors"]))
    extra = sorted(set(faulty["vectors"]) - set(clean["vectors"]))
    changed = [p for p in clean["vectors"] if p in faulty["vectors"]
               and not np.array_equal(clean["vectors"][p], faulty["vectors"][p])]
    print(f"lifecycle of {args.products} products (encode, build-index, search, refresh of 3 retitled) "
          f"through a {args.rate:.0%} fault rate")
    print(f"requests through the proxy: {proxy.requests}; faults injected: {sum(proxy.injected.values())} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(proxy.injected.items()))})")
    for job, report in faulty["reports"].items():
        print(f"  {job:<12} storage retries reported: {report['storage_retries']}")
    print(f"products lost: {len(lost)}, duplicated or extra: {len(extra)}, vectors changed: {len(changed)}")
    print(f"index codes identical: {faulty['shards'] == clean['shards'] and faulty['trained'] == clean['trained']}; "
          f"id maps' ids identical: {faulty['ids'] == clean['ids']}; "
          f"search results identical: {faulty['searched'] == clean['searched']}")
    print(f"wall time: {t_clean:.0f} s without faults, {t_faulty:.0f} s with them")


if __name__ == "__main__":
    main()
