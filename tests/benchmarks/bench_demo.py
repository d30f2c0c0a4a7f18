"""`mimdex demo` against its goals: the whole run's wall time and the numbers it opens with.

    .venv/bin/python tests/benchmarks/bench_demo.py [--workdir DIR] [--preset P --products N --queries M
                                                    --epochs E --shards S --seed S]

Runs the demo as a user does (its own process, defaults unless flags are given; a fresh
--workdir under a temporary directory, removed at the end, unless one is named), then
prints each stage's time from the demo's JSON report and each goal beside its value:
the wall time against 12 minutes, the 3-tower's recall@10 against 0.85, its top-1
wrong-category rate against 20% (and image-only's), and the 4-tower's reformulation
recall@1 from photo + text against the photo alone. Exit 0 either way: it measures.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

GOAL_S = 12 * 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="the demo's --workdir (default: a temporary one, removed at the end)")
    ap.add_argument("--out", help="write the result as JSON here")
    # the demo's own flags, passed on when given (default: the demo's defaults)
    ap.add_argument("--preset")
    ap.add_argument("--products")
    ap.add_argument("--queries")
    ap.add_argument("--epochs")
    ap.add_argument("--shards")
    ap.add_argument("--seed")
    args = ap.parse_args()
    demo_flags = [x for flag in ("preset", "products", "queries", "epochs", "shards", "seed")
                  if getattr(args, flag) is not None for x in (f"--{flag}", getattr(args, flag))]
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="mimdex-bench-demo-")
    workdir = args.workdir or os.path.join(tmp, "demo")
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mimdex.pipelines.cli", "demo", "--workdir", workdir,
                               *demo_flags], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"bench_demo: the demo exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        report = json.load(open(sorted(glob.glob(os.path.join(workdir, "_reports", "demo-*.json")))[-1]))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = {r["model"]: r for r in report["results"]}
    print(f"demo, preset {report['preset']}, {report['epochs']} epochs: stage seconds")
    for stage, s in report["timings_s"].items():
        print(f"  {stage:28} {s:7.1f}")
    goals = [("wall time, s", round(wall, 1), f"<= {GOAL_S}", wall <= GOAL_S)]
    three, image, four = rows.get("3-tower"), rows.get("image-only"), rows.get("4-tower")
    if three:
        goals.append(("3-tower recall@10", three["recall@10"], ">= 0.85", three["recall@10"] >= 0.85))
        goals.append(("3-tower wrong category @1", three["wrong_category@1"], "<= 0.20"
                      + (f" (image-only {image['wrong_category@1']})" if image else ""),
                      three["wrong_category@1"] <= 0.20))
    if four and "reform_recall@1_image_text" in four:
        goals.append(("4-tower reformulation r@1, photo + text", four["reform_recall@1_image_text"],
                      f"> photo alone {four['reform_recall@1_image']}",
                      four["reform_recall@1_image_text"] > four["reform_recall@1_image"]))
    print(f"{'goal':42} {'value':>8}  reference")
    for name, value, ref, met in goals:
        print(f"{name:42} {value:>8}  {ref}  {'met' if met else 'MISSED'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"wall_s": round(wall, 1), "timings_s": report["timings_s"], "results": report["results"],
                       "goals": [{"goal": g, "value": v, "reference": r, "met": m} for g, v, r, m in goals]}, f,
                      indent=1)


if __name__ == "__main__":
    main()
