"""Processes that stand for remote machines in the test clusters (Dask, Flink): each in its
own mount namespace with a private tmpfs on /tmp (`unshare --mount`, as root), so a local
path the driver writes never reaches them; and their stop, whatever they do.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys


def private_tmp() -> bool:
    """Whether a process can get its own /tmp: root and unshare present."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def _kept_under_tmp() -> list[str]:
    """The code a worker runs (this checkout, its virtualenv) where it lies under /tmp (a
    clone in /tmp): bound back into the worker's private /tmp, as a worker's image has it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = {os.path.realpath(p) for p in (here, sys.prefix)}
    return sorted(p for p in paths if p.startswith("/tmp/") and not any(
        p.startswith(q + "/") for q in paths if q != p))


def in_private_tmp(argv: list[str], hold: str, binds: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """``argv`` in its own mount namespace with a fresh tmpfs on /tmp, and each (file,
    target) of ``binds`` mounted over its target (a pod's own /etc/hosts); ``hold``, a
    directory outside /tmp, briefly holds the old /tmp so the kept code can be bound back."""
    steps = [f"mount --bind /tmp {shlex.quote(hold)}", "mount -t tmpfs -o size=2g tmpfs /tmp"]
    for path in _kept_under_tmp():
        old = shlex.quote(os.path.join(hold, os.path.relpath(path, "/tmp")))
        steps += [f"mkdir -p {shlex.quote(path)}", f"mount --bind {old} {shlex.quote(path)}"]
    steps += [f"mount --bind {shlex.quote(src)} {shlex.quote(dst)}" for src, dst in binds]
    steps += [f"umount -l {shlex.quote(hold)}", "exec " + " ".join(shlex.quote(a) for a in argv)]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", " && ".join(steps)]


def stop(proc: subprocess.Popen) -> None:
    """The process's whole session: SIGTERM, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)   # anything of its session still there
