"""Kill soak: `mimdex encode`, `build-index` and `refresh` SIGKILLed at random moments, N
times each, and re-run to completion; after every trial the invariants are checked.

    .venv/bin/python tests/benchmarks/bench_kill_soak.py [--trials 5] [--products 600]

Checks after each trial: every catalog product is encoded exactly once or rejected with a
reason (live parts and rejects of the current manifest, checksums verified); the index's
ids equal the embedded ids; LATEST names a complete version; every process the killed job
started (Ray's GCS, raylet, workers, agents) is gone within 30 s; a lock the killed refresh
left behind is taken over by the next run (its holder is gone; on another host, after the
lease's TTL). Everything runs under a temp dir that is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dirty_catalog as dc  # noqa: E402
from conftest import random_bundle  # noqa: E402

from mimdex.indexing.reader import IndexReader  # noqa: E402
from mimdex.infra import storage  # noqa: E402
from mimdex.infra.contracts import embeddings as emb  # noqa: E402
from mimdex.infra.contracts import index_version as iv  # noqa: E402

MIMDEX = [sys.executable, "-m", "mimdex.pipelines.cli"]


def make_catalog(root: str, products: int) -> dict[str, str | None]:
    kinds = ["plain"] * products + list(dc.BAD)
    dc.write_kinds(root, kinds, row_group_size=50)
    return {f"P{i:04d}": dc.BAD.get(kind) for i, kind in enumerate(kinds)}


def run(argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(MIMDEX + argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode not in (0, 99):  # the set-up runs must succeed: say why one did not
        print(f"mimdex {argv[0]} exited {done.returncode}: {done.stderr.strip()[-6000:]}", file=sys.stderr)
    return done


LEFT: list[str] = []  # command lines of processes that outlived a killed job by 30 s


def killed(argv: list[str], after: float) -> tuple[bool, int]:
    """Start the command, SIGKILL it ``after`` seconds in (if still running); returns
    (was it killed, how many of its processes were still alive 30 s later)."""
    proc = subprocess.Popen(MIMDEX + argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: set[int] = set()
    deadline = time.time() + after
    while time.time() < deadline and proc.poll() is None:
        try:
            family |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        return False, 0
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    end = time.time() + 30
    alive = family
    while time.time() < end:
        alive = {p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        if not alive:
            break
        time.sleep(0.5)
    for pid in alive:
        try:
            LEFT.append(" ".join(psutil.Process(pid).cmdline())[:120])
        except psutil.Error:
            pass
    return True, len(alive)


def check(expect: dict, emb_root: str, index: str | None) -> list[str]:
    problems = []
    manifest = emb.read_manifest(emb_root)
    encoded = emb.read_all(emb_root, manifest).column("product_id").to_pylist()
    rejects = emb.read_all(emb_root, manifest, "rejects")
    rejected = dict(zip(rejects.column("product_id").to_pylist(), rejects.column("reason").to_pylist()))
    if sorted(encoded) != sorted(p for p, r in expect.items() if r is None):
        problems.append(f"encoded products differ ({len(encoded)} vs {sum(r is None for r in expect.values())})")
    if rejected != {p: r for p, r in expect.items() if r is not None}:
        problems.append("rejects differ")
    if index:
        iv.read_manifest(index, iv.latest_version(index))  # a complete version, or this raises
        # its products as a reader sees them: base shards + delta segments - deletions
        ids = sorted(IndexReader.open(index).idmap.column("product_id").to_pylist())
        if ids != sorted(encoded):
            problems.append("index ids differ from the embedded ids")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--products", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", default="encode,build-index,refresh")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cat = os.path.join(tmp, "cat")
        expect = make_catalog(cat, args.products)
        model = os.path.join(tmp, "model")
        random_bundle(model, ["product title"], "3-tower")
        catalog = cat + "/catalog.parquet"
        enc_args = lambda out: ["encode", "--model", model, "--catalog", catalog, "--out", out,  # noqa: E731
                                "--unit-rows", "50", "--no-progress"]
        t0 = time.time()
        assert run(enc_args(os.path.join(tmp, "base-emb"))).returncode == 0
        t_encode = time.time() - t0
        build_args = lambda e, i: ["build-index", "--embeddings", e, "--out", i, "--shards", "2",  # noqa: E731
                                   "--eval-queries", "50"]
        t0 = time.time()
        assert run(build_args(os.path.join(tmp, "base-emb"), os.path.join(tmp, "base-index"))).returncode == 0
        t_build = time.time() - t0

        def trial_encode(i):
            out = os.path.join(tmp, f"enc-{i}")
            was, left = killed(enc_args(out), rng.uniform(0.5, 0.9 * t_encode))
            done = run(enc_args(out))
            return was, left, done.returncode, check(expect, out, None)

        def trial_build(i):
            out = os.path.join(tmp, f"idx-{i}")
            if i % 2:  # half the trials kill a build over an existing, published version
                shutil.copytree(os.path.join(tmp, "base-index"), out)
            was, left = killed(build_args(os.path.join(tmp, "base-emb"), out), rng.uniform(0.5, 0.9 * t_build))
            done = run(build_args(os.path.join(tmp, "base-emb"), out))
            return was, left, done.returncode, check(expect, os.path.join(tmp, "base-emb"), out)

        def trial_refresh(i, kill=True):
            world = os.path.join(tmp, f"ref-{i}")
            shutil.copytree(cat, world + "/cat")
            shutil.copytree(os.path.join(tmp, "base-emb"), world + "/emb")
            shutil.copytree(os.path.join(tmp, "base-index"), world + "/index")
            table = storage.parquet_dataset(world + "/cat/catalog.parquet").to_table().to_pylist()
            for r in table[i * 7: i * 7 + 5]:  # five retitled products each trial
                r["title"] = r["title"] + b" (2027)"
            dc.write(world + "/cat", table, {}, row_group_size=50)
            argv = ["refresh", "--catalog", world + "/cat/catalog.parquet", "--model", model, "--embeddings",
                    world + "/emb", "--index", world + "/index", "--unit-rows", "50", "--eval-queries", "50",
                    "--no-progress"]
            if not kill:  # the measuring run
                t0 = time.time()
                assert run(argv).returncode == 0
                return time.time() - t0
            was, left = killed(argv, rng.uniform(0.5, 0.9 * t_refresh))
            lock_left = os.path.exists(world + "/index/_locks/refresh.json")
            done = run(argv)
            report = json.loads(storage.read_bytes(done.stdout.strip().splitlines()[-1])) if done.stdout else {}
            problems = check(expect, world + "/emb", world + "/index")
            if lock_left and not report.get("broken_stale_lock"):
                problems.append("the killed run's lock was not taken over")
            return was, left, done.returncode, problems

        t_refresh = trial_refresh(-1, kill=False)
        for job, trial in (("encode", trial_encode), ("build-index", trial_build), ("refresh", trial_refresh)):
            if job not in args.jobs.split(","):
                continue
            rows = [trial(i) for i in range(args.trials)]
            results[job] = rows
            killed_n = sum(r[0] for r in rows)
            print(f"{job:<12} trials {len(rows)}, killed mid-run {killed_n}, re-run exit codes "
                  f"{sorted(set(r[2] for r in rows))}, processes left behind {sum(r[1] for r in rows)}, "
                  f"invariant failures {sum(len(r[3]) for r in rows)} {[p for r in rows for p in r[3]][:3]}")
    print(f"(full encode {t_encode:.1f} s, build {t_build:.1f} s, refresh {t_refresh:.1f} s; kill moments uniform "
          "over 0.5 s .. 90% of those)")
    for cmd in LEFT:
        print("left behind:", cmd)
    # a broken invariant or a re-run that did not finish fails the run (the slow tier of
    # `.ci/run` runs the short form); a refresh whose killed run had already published
    # finds nothing to do (99). Processes left behind are reported above, not failed on:
    # runs 1 and 4 in docs/benchmarks.md saw Ray's leftovers go only after 30 s.
    bad = [f"{job}: re-run exit {r[2]}, {r[3]}" for job, rows in results.items() for r in rows
           if r[2] not in (0, 99) or r[3]]
    if bad:
        sys.exit("kill soak failed: " + "; ".join(bad[:5]))


if __name__ == "__main__":
    main()
