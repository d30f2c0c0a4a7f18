"""A dask.distributed cluster on 127.0.0.1 whose workers share no disk with the driver.

The scheduler and each worker are separate processes (`dask scheduler`, `dask worker`, one
thread each, no dashboard). As root, each worker runs in its own mount namespace with a
private tmpfs on /tmp (`unshare --mount`), as a remote machine would: a local path the
driver writes never reaches it, so a job passes only if it hands its workers object-store
URIs. Workers get the driver's environment at start (the local S3 server's endpoint and
dummy credentials), as pods get theirs from their spec.

Everything stops with the context, and on its own if the test process is killed: the
scheduler exits after --idle-timeout without work, and the workers follow it
(--death-timeout).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

import psutil

from isolated import in_private_tmp, private_tmp, stop

DASK = os.path.join(os.path.dirname(sys.executable), "dask")


@dataclass(frozen=True)
class DaskCluster:
    address: str
    scheduler: subprocess.Popen
    workers: tuple[subprocess.Popen, ...]   # each a nanny's launcher (unshare or the nanny itself)

    def worker_pids(self) -> list[int]:
        """The worker processes themselves (the nannies' children): what does the work."""
        pids = []
        for launcher in self.workers:
            try:
                procs = psutil.Process(launcher.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            pids += [p.pid for p in procs if _is_worker(p)]
        return pids

    def beam_args(self) -> list[str]:
        return ["--runner=DaskRunner", f"--dask_client_address={self.address}"]


def _is_worker(proc: psutil.Process) -> bool:
    """A nanny's worker: the process it spawned (not its resource tracker)."""
    try:
        return "spawn_main" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _worker_command(address: str, hold: str) -> list[str]:
    """``dask worker`` in its own mount namespace with a fresh tmpfs on /tmp."""
    dask = [DASK, "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1",
            "--death-timeout", "30", "--local-directory", "/tmp/dask-worker", "--memory-limit", "0"]
    return in_private_tmp(dask, hold)


@contextlib.contextmanager
def dask_cluster(workers: int = 2, idle_timeout: int = 600) -> Iterator[DaskCluster]:
    """Start a scheduler and ``workers`` workers; yield when all have joined."""
    if not private_tmp():
        raise RuntimeError("a Dask cluster whose workers share no /tmp with the driver needs root and unshare")
    from distributed import Client

    state = tempfile.mkdtemp(prefix="mimdex-dask-", dir="/var/tmp")   # outside /tmp: also the workers' hold
    file = os.path.join(state, "scheduler.json")
    log = open(os.path.join(state, "cluster.log"), "ab")
    scheduler = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", file, "--idle-timeout", str(idle_timeout)],
                                 stdout=log, stderr=log, start_new_session=True)
    procs: list[subprocess.Popen] = [scheduler]
    try:
        address = _wait_for_address(file, scheduler)
        hold = os.path.join(state, "hold")
        os.mkdir(hold)
        started = [subprocess.Popen(_worker_command(address, hold), stdout=log, stderr=log, start_new_session=True)
                   for _ in range(workers)]
        procs += started
        with Client(address, timeout=60) as client:
            try:
                client.wait_for_workers(workers, timeout=120)
            except Exception as exc:  # what the workers said is in the log: show it
                log.flush()
                with open(os.path.join(state, "cluster.log"), errors="replace") as f:
                    raise RuntimeError(f"Dask workers did not join: {exc}\n{f.read()[-3000:]}") from exc
        yield DaskCluster(address, scheduler, tuple(started))
    finally:
        for proc in reversed(procs):
            stop(proc)
        log.close()
        shutil.rmtree(state, ignore_errors=True)


def _wait_for_address(file: str, scheduler: subprocess.Popen, timeout: float = 60) -> str:
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if scheduler.poll() is not None:
            raise RuntimeError(f"the Dask scheduler exited with {scheduler.returncode}")
        try:
            with open(file) as f:
                return json.load(f)["address"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise RuntimeError(f"the Dask scheduler wrote no {file} in {timeout:g} s")
