"""Stop an embedded Ray cluster whose driver was killed.

Ray fate-shares gcs_server and the raylet with the driver that started them, but its
dashboard and runtime-env agents can hang on the way out (publishing "raylet died" to a
GCS that is already gone) and live on as orphans. A driver that starts an embedded Ray
also starts this small watcher in its own session: it records the driver's descendants
while the cluster is up (polling, every 0.5 s) and, if the driver disappears without
saying "done" on the pipe, kills the ones still running. A clean ray.shutdown() says
"done" first.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil

DONE = b"done\n"


class Reaper:
    """The driver's handle on the watcher process."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "mimdex.infra.reaper", str(psutil.Process().pid)],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)

    def done(self) -> None:
        """The cluster was shut down cleanly: let the watcher exit without killing."""
        try:
            self._proc.stdin.write(DONE)
            self._proc.stdin.close()
        except OSError:
            pass
        self._proc.wait(timeout=10)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def main(argv: list[str]) -> int:
    try:
        driver = psutil.Process(int(argv[0]))
    except psutil.Error:
        return 0
    done = threading.Event()
    # readline, not read: processes the driver forked may hold the pipe open after it dies
    threading.Thread(target=lambda: sys.stdin.buffer.readline() == DONE and done.set(), daemon=True).start()
    seen: dict[int, float] = {}
    me = psutil.Process().pid  # the driver's child too: never on the list
    while not done.is_set() and _alive(driver):
        try:
            children = driver.children(recursive=True)
        except psutil.Error:
            break
        for child in children:
            if child.pid == me:
                continue
            try:
                seen.setdefault(child.pid, child.create_time())
            except psutil.Error:  # a short-lived worker that already exited
                pass
        done.wait(0.5)
    if done.is_set():
        return 0
    time.sleep(2.0)  # let Ray's own fate-sharing go first
    for pid, created in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:  # not a recycled pid
                proc.kill()
        except psutil.Error:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
