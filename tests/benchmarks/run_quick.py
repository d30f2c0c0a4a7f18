"""`make bench`: every benchmark script under tests/benchmarks/ in a quick mode, one after
another, each result written as JSON to bench-output/<script>.json.

    .venv/bin/python tests/benchmarks/run_quick.py [--only bench_index bench_codes] [--out bench-output]

A quick run checks that each benchmark still runs against the code as it is, on small
data, in minutes in all; its numbers are not the documented ones (docs/benchmarks.md
names the full command of each table). Each JSON holds the script, its arguments, the
commit, the exit code, the wall time, the script's own JSON result where it writes one
(--out) and the tail of what it printed. Exit 1 when a script failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from registry import pip_beside  # noqa: E402
REPO = os.path.dirname(os.path.dirname(HERE))

# Each script's quick arguments: small data, every code path its full run takes. A script
# added under tests/benchmarks/ needs a row (tests/test_bench_quick.py checks).
QUICK: dict[str, list[str]] = {
    "bench_autofaiss.py": ["--n", "10000"],
    "bench_codes.py": ["--n", "10000", "--d", "32"],
    "bench_demo.py": ["--preset", "tiny", "--products", "200", "--queries", "40", "--epochs", "1", "--shards", "2"],
    "bench_decode_sizes.py": ["--seconds", "0.3", "--sizes", "160,1000"],
    "bench_decode_text.py": ["--seconds", "0.3", "--titles", "128"],
    "bench_distributed.py": ["--n", "20000", "--parts", "4", "--shards", "2", "--workers", "2"],
    "bench_encode.py": ["--products", "300"],
    "bench_faults.py": ["--rate", "0.3", "--latency-rate", "0.05", "--products", "80", "--seeds", "1"],
    "bench_filters.py": ["--queries", "100"],
    "bench_icons.py": ["--limit", "400", "--epochs", "1", "--batch-size", "32", "--seeds", "0,1"],
    "bench_index.py": ["--n", "20000", "--shards", "2"],
    "bench_kill_soak.py": ["--trials", "1", "--products", "200"],
    "bench_mmap.py": ["--n", "50000", "--deltas", "1"],
    "bench_photos.py": ["--products", "300", "--queries", "60", "--epochs", "1", "--large", "20000"],
    "bench_racing.py": ["--trials", "1"],
    "bench_raw_seeds.py": ["--n", "20000", "--seeds", "1234"],
    "bench_real.py": ["--shards", "2"],
    "bench_refresh.py": ["--n", "2000", "--rss", "20000"],
    "bench_retag.py": ["--products", "500"],
    "bench_scale.py": ["--n", "20000"],
    "bench_train_step.py": ["--batch", "32", "--repeats", "1"],
    "bench_towers.py": ["--preset", "tiny", "--reference", "none", "--products", "200", "--queries", "40",
                        "--epochs", "1"],
}
# Scripts whose result is a JSON file they write with --out.
WRITES_OUT = {"bench_autofaiss.py", "bench_codes.py", "bench_demo.py", "bench_filters.py", "bench_icons.py",
              "bench_mmap.py", "bench_real.py",
              "bench_retag.py", "bench_scale.py", "bench_train_step.py"}
# Reference libraries a script compares against, installed from PyPI beside (not into) the
# project's environment, once, under <out>/.deps/<script>, and put on its PYTHONPATH.
BESIDE = {"bench_autofaiss.py": ["autofaiss", "embedding-reader", "fire", "termcolor", "pandas",
                                 "python-dateutil", "pytz", "tzdata"]}
# Scripts that are not benchmarks (helpers other scripts import or run).
HELPERS = {"run_quick.py", "check_same_bytes.py", "icon_dataset.py", "registry.py"}


def scripts() -> list[str]:
    return sorted(f for f in os.listdir(HERE) if f.endswith(".py") and f not in HELPERS)


def _commit() -> str:
    out = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _beside(name: str, out_dir: str) -> dict[str, str]:
    """The environment a script runs with: its reference libraries on PYTHONPATH."""
    env = dict(os.environ)
    if name not in BESIDE:
        return env
    target = pip_beside(os.path.join(out_dir, ".deps", name.removesuffix(".py")), BESIDE[name])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (target, env.get("PYTHONPATH")) if p)
    return env


def run_one(name: str, out_dir: str, timeout: float) -> dict:
    argv = list(QUICK[name])
    own = os.path.join(out_dir, name.removesuffix(".py") + ".result.json")
    if name in WRITES_OUT:
        argv += ["--out", own]
    cmd = [sys.executable, os.path.join(HERE, name), *argv]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env=_beside(name, out_dir))
        code, printed = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, printed = 124, f"{exc.stdout or ''}{exc.stderr or ''}\n[run_quick] stopped after {timeout:.0f} s"
        printed = printed if isinstance(printed, str) else printed.decode(errors="replace")
    result = None
    if name in WRITES_OUT and os.path.exists(own):
        with open(own) as f:
            result = json.load(f)
        os.remove(own)
    return {"script": f"tests/benchmarks/{name}", "argv": argv, "commit": _commit(), "exit_code": code,
            "seconds": round(time.perf_counter() - t0, 1), "result": result, "output_tail": printed[-6000:]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="script names (with or without .py) to run instead of all")
    ap.add_argument("--out", default="bench-output", help="where the JSON results go")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds one script may run")
    args = ap.parse_args()
    names = scripts()
    missing = [n for n in names if n not in QUICK]
    if missing:
        print(f"run_quick: no quick mode for {', '.join(missing)} (add it to QUICK)", file=sys.stderr)
        return 2
    if args.only:
        wanted = {n if n.endswith(".py") else n + ".py" for n in args.only}
        unknown = sorted(wanted - set(names))
        if unknown:
            print(f"run_quick: --only: no such benchmark {', '.join(unknown)}", file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for name in names:
        print(f"[bench] {name} {' '.join(QUICK[name])} ...", flush=True)
        record = run_one(name, args.out, args.timeout)
        path = os.path.join(args.out, name.removesuffix(".py") + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)   # whole or not at all
        print(f"[bench] {name}: exit {record['exit_code']} in {record['seconds']} s -> {path}", flush=True)
        if record["exit_code"]:
            failed.append(name)
            print(record["output_tail"][-1500:], flush=True)
    print(f"[bench] {len(names) - len(failed)} of {len(names)} ran"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
