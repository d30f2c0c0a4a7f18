"""build-index on a distributed Beam runner against the multi-process DirectRunner, in one run.

    .venv/bin/python tests/benchmarks/bench_distributed.py [--n 1000000] [--d 256] [--parts 20] [--shards 8]

The same embeddings (seeded clustered unit vectors, float32, --parts parts, written once
under a temporary directory and deleted at the end) are built by:
  * the DirectRunner in multi-process mode, 2 and 4 worker processes;
  * Beam's DaskRunner on a dask.distributed cluster on 127.0.0.1 (tests/dask_cluster.py),
    2 and 4 worker processes of one thread each, each with a private /tmp; and once more
    at 2 workers with Beam's own partitioning (128 elements per Dask task), the "before";
  * Beam's FlinkRunner on a Flink session cluster on 127.0.0.1 (tests/flink_cluster.py:
    a JobManager, 2 TaskManagers of one slot, a worker pool beside each, Beam's job
    server), with infra/beam/flink.options (--no-flink skips it; it needs
    `make system-deps` and root).
Every process of a run is sampled every 0.2 s: peak resident memory (driver and each
worker; for Flink, the SDK workers, and the JVMs as "cluster") and CPU time (user +
system). A worker's share is its CPU time during the run over
the mean of all workers'; the goal is no worker above 1.5x the mean. Every run must publish
the same shard bytes (sha256) as the first.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from bench_index import clustered, write_embeddings  # noqa: E402
from dask_cluster import dask_cluster  # noqa: E402
from flink_cluster import available as flink_available, flink_cluster  # noqa: E402
from mimdex.encoders.bundle import save_untrained_bundle  # noqa: E402
from mimdex.indexing.evaluate import held_out_at  # noqa: E402
from mimdex.infra.contracts import index_version as iv  # noqa: E402
from mimdex.pipelines.build_index import BuildConfig, run  # noqa: E402

GOAL = 1.5


@dataclass
class Sampler:
    """CPU seconds and peak RSS of the driver and of the worker processes ``find`` names,
    sampled in a thread (workers of a multi-process DirectRunner live only during the run)."""
    find: object
    cluster: object = None                          # the runner's own processes (Flink's JVMs): peak RSS only
    cluster_peak: dict = field(default_factory=dict)   # name -> peak RSS bytes
    cpu: dict = field(default_factory=dict)        # pid -> (first seen, last seen) CPU seconds
    peak: dict = field(default_factory=dict)       # pid -> peak RSS bytes
    driver_peak: int = 0

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            for name, proc in (self.cluster() if self.cluster else {}).items():
                try:
                    self.cluster_peak[name] = max(self.cluster_peak.get(name, 0), proc.memory_info().rss)
                except psutil.Error:
                    pass
            for proc in self.find():
                try:
                    with proc.oneshot():
                        t = proc.cpu_times()
                        used, rss = t.user + t.system, proc.memory_info().rss
                except psutil.Error:
                    continue
                first = self.cpu.get(proc.pid, (used, used))[0]
                self.cpu[proc.pid] = (first, used)
                self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)
            self._stop.wait(0.2)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {pid: last - first for pid, (first, last) in self.cpu.items()}


def _beam_children() -> list[psutil.Process]:
    """The DirectRunner's SDK worker processes (not the shells that launch them)."""
    found = [p for p in psutil.Process().children(recursive=True) if "apache_beam.runners.worker" in _cmd(p)]
    parents = {_parent(p) for p in found}
    return [p for p in found if p.pid not in parents]


def _parent(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.Error:
        return None


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def build(name: str, emb: str, out: str, shards: int, beam_args: list[str], find, cluster=None):
    sampler = Sampler(find, cluster)
    t0 = time.perf_counter()
    report = run(BuildConfig(embeddings=emb, out=out, shards=shards, eval_queries=200), beam_args).report
    wall = time.perf_counter() - t0
    # a process seen only as its launcher (a shell, 2 MB, no CPU) is not a worker
    cpu = {pid: c for pid, c in sampler.stop().items() if sampler.peak.get(pid, 0) > 50 * 2**20}
    mean = sum(cpu.values()) / max(1, len(cpu))
    shares = sorted((round(c / mean, 2) for c in cpu.values()), reverse=True) if mean else []
    manifest = iv.read_manifest(out, iv.latest_version(out))
    return {"runner": name, "wall_s": round(wall, 1), "beam_s": report["seconds"]["beam"],
            "driver_peak_mb": round(sampler.driver_peak / 2**20), "worker_peak_mb": sorted(
                (round(sampler.peak[pid] / 2**20) for pid in cpu), reverse=True),
            "worker_cpu_s": sorted((round(c, 1) for c in cpu.values()), reverse=True), "shares": shares,
            "max_share": max(shares) if shares else None, "recall@10": held_out_at(report["evaluation"], report["default_nprobe"])["recall@10"],
            "cluster_peak_mb": {k: round(v / 2**20) for k, v in sampler.cluster_peak.items()},
            "shards_sha256": [s.index.sha256 for s in manifest.shards]}


def _flink_processes(cluster) -> dict[str, psutil.Process]:
    found = {}
    for name in ("jobmanager", "taskmanager1", "taskmanager2", "jobserver"):
        try:
            found[name] = psutil.Process(cluster.jvm_pid(name))
        except psutil.Error:
            pass
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--parts", type=int, default=20)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--no-beam-default", dest="beam_default", action="store_false",
                    help="skip the Dask run with Beam's own partitioning (128 elements per task)")
    ap.add_argument("--no-flink", dest="flink", action="store_false", help="skip the Flink run")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory (deleted at the end)")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    # not under /tmp: the Dask workers' /tmp is their own, the rest of the disk stands in for the object store
    work = args.workdir or tempfile.mkdtemp(prefix="mimdex-bench-distributed-", dir=os.getcwd())
    results = []
    try:
        model = os.path.join(work, "model")
        sha = save_untrained_bundle(model, ["bench"], "3-tower")
        t0 = time.perf_counter()
        emb = os.path.join(work, "emb")
        write_embeddings(emb, clustered(args.n, args.d), model, sha, parts=args.parts)
        print(f"{args.n} x {args.d} in {args.parts} parts written in {time.perf_counter() - t0:.0f} s", flush=True)
        for w in counts:
            direct = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={w}"]
            results.append(build(f"DirectRunner multi-process, {w} workers", emb, os.path.join(work, f"direct{w}"),
                                 args.shards, direct, _beam_children))
            print(results[-1], flush=True)
        for w in counts:
            with dask_cluster(w) as cluster:
                procs = [psutil.Process(p) for p in cluster.worker_pids()]
                results.append(build(f"DaskRunner, {w} workers", emb, os.path.join(work, f"dask{w}"), args.shards,
                                     cluster.beam_args(), lambda: procs))
                print(results[-1], flush=True)
                if w == counts[0] and args.beam_default:   # what mimdex's one-task-per-part default fixes
                    results.append(build(f"DaskRunner, {w} workers, Beam's 128/partition", emb,
                                         os.path.join(work, f"dask{w}-beam-default"), args.shards,
                                         cluster.beam_args() + ["--dask_partition_size=128"], lambda: procs))
                    print(results[-1], flush=True)
        if args.flink:
            why = flink_available()
            if why:
                raise SystemExit(f"Flink: {why} (or --no-flink)")
            with flink_cluster() as cluster:
                results.append(build("FlinkRunner, 2 TaskManagers x 1 slot", emb, os.path.join(work, "flink2"),
                                     args.shards, cluster.beam_args(),
                                     lambda: cluster.sdk_workers(1) + cluster.sdk_workers(2),
                                     lambda: _flink_processes(cluster)))
                print(results[-1], flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    same = all(r["shards_sha256"] == results[0]["shards_sha256"] for r in results)
    print(f"\nbuild-index, {args.n} x {args.d}, {args.parts} parts, {args.shards} shards, {os.cpu_count()} CPUs "
          f"({psutil.cpu_count(logical=False)} cores)")
    print(f"{'runner':38}{'wall s':>8}{'beam s':>8}{'driver MB':>10}{'worker peak MB':>22}{'worker CPU s':>26}"
          f"{'share max (goal <= 1.5)':>25}{'R@10':>7}")
    for r in results:
        print(f"{r['runner']:38}{r['wall_s']:>8.1f}{r['beam_s']:>8.1f}{r['driver_peak_mb']:>10}"
              f"{str(r['worker_peak_mb']):>22}{str(r['worker_cpu_s']):>26}{r['max_share']:>25}"
              f"{r['recall@10']:>7.3f}")
    for r in results:
        if r["cluster_peak_mb"]:
            print(f"{r['runner']}: the runner's own processes, peak MB: {r['cluster_peak_mb']}")
    print(f"same shard bytes on every runner: {same}")
    ours = [r for r in results if "Beam's" not in r["runner"]]
    print(f"goal met (every worker <= {GOAL}x the mean, mimdex's settings): "
          f"{all(r['max_share'] <= GOAL for r in ours)}")


if __name__ == "__main__":
    main()
