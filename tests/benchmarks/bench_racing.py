"""Operators racing on one index root, more trials than `make test` runs, with a process
SIGKILLed mid-race in each trial (tests/racing.py has the operations, the schedule and the
invariants): refresh, compact, rollback, retention, backfill and two readers per trial.

    .venv/bin/python tests/benchmarks/bench_racing.py [--trials 8] [--seed 100] [--no-kill]

Prints each trial's exit codes, who was killed, what LATEST names after it and any
invariant it broke; then a serial re-run must converge to the catalog. Exits non-zero on
any violation. Everything runs in a local S3 server under a temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import random_bundle  # noqa: E402
from racing import converge, make_world, run_trial  # noqa: E402

from mimdex.infra.local_s3 import create_bucket, local_s3_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--no-kill", action="store_true")
    ap.add_argument("--json", help="write the trials here too")
    args = ap.parse_args()
    rows, outcomes = [], Counter()
    with tempfile.TemporaryDirectory() as tmp, local_s3_server() as endpoint:
        random_bundle(os.path.join(tmp, "model"), ["product title"], "3-tower")
        t0 = time.perf_counter()
        world = make_world(create_bucket(endpoint, "bench-race"), os.path.join(tmp, "model"), tmp)
        print(f"world: 120 products, a first version and a delta segment ({time.perf_counter() - t0:.0f} s)")
        for i in range(args.trials):
            trial = run_trial(world, args.seed + i, kill=not args.no_kill)
            for name, code in trial.codes.items():
                outcomes[(name.split("#")[0], "killed" if code is None else code)] += 1
            rows.append({"seed": trial.seed, "codes": trial.codes, "killed": trial.killed, "latest": trial.latest,
                         "violations": trial.violations, "seconds": round(trial.seconds, 1)})
            codes = " ".join(f"{n.split('#')[0]}={'KILLED' if c is None else c}" for n, c in trial.codes.items())
            print(f"trial {i + 1} (seed {trial.seed}, {trial.seconds:.0f} s): {codes}; LATEST {trial.latest}; "
                  f"violations {len(trial.violations)} {trial.violations[:2]}")
        problems = converge(world)
        print(f"serial re-run converges to the catalog: {not problems} {problems}")
    lost = sum(len(r["violations"]) for r in rows)
    print(f"{args.trials} trials, {sum(len(r['killed']) for r in rows)} processes killed; lost or half-written: {lost}")
    print("outcomes (operation, exit code: count): "
          + ", ".join(f"{op} {code}: {n}" for (op, code), n in sorted(outcomes.items(), key=str)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trials": rows, "converged": not problems}, f, indent=2)
    if lost or problems:
        sys.exit("racing: invariants broken")


if __name__ == "__main__":
    main()
