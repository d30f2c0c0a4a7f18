"""Running a Beam graph from a job's driver: the pipeline options (the same for every
mimdex Beam job: build-index, the refresh diff, compaction), a watch for a stalled runner,
and errors mapped back to mimdex's exit codes.

A graph's DoFns write their outputs whole through the contracts layer plus a small JSON
record each under a progress directory; the driver counts those records to see progress.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import psutil

from mimdex.infra import storage
from mimdex.infra.errors import DataError, MimdexError, TransientError, UsageError

STALL_POLL_SECONDS = 2.0


def beam_pipeline(beam_args: list[str]):
    """A Beam pipeline for these options (DirectRunner when none). Runners that check
    their options when the pipeline is made (Dataflow: project, gs:// temp/staging)
    fail here, before any work, as a usage error."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        return beam.Pipeline(options=PipelineOptions(beam_args or ["--runner=DirectRunner"]))
    except (ValueError, SystemExit) as exc:  # argparse inside Beam exits on a bad value
        why = "rejected by Beam's option parser (its message is above)" if isinstance(exc, SystemExit) else exc
        raise UsageError(f"Beam pipeline options {' '.join(beam_args)}: {why}") from exc


def runs_here(beam_args: list[str]) -> bool:
    """Whether the options pick a DirectRunner (all workers on this machine): none given,
    or --runner naming one of Beam's direct runners."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    runner = PipelineOptions(beam_args or []).view_as(StandardOptions).runner
    return runner is None or "direct" in str(runner).lower()


def local_processes(beam_args: list[str]) -> int:
    """How many worker processes the DirectRunner starts on this machine (0: none, the
    DoFns run in this process, or on a remote runner's machines)."""
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

    opts = PipelineOptions(beam_args or []).view_as(DirectOptions)
    if not runs_here(beam_args) or opts.direct_running_mode != "multi_processing":
        return 0
    return max(1, opts.direct_num_workers or 1)


def run(build: Callable, beam_args: list[str], progress_dir: str, expected: int, stall_timeout: float,
        unfinished: str) -> None:
    """Build the graph with ``build(pipeline)`` and run it; if no new record appears under
    ``progress_dir`` for ``stall_timeout`` seconds (a lost worker of a multi-process or
    remote runner can leave it waiting forever), stop with exit 75, saying ``unfinished``."""
    pipeline = beam_pipeline(beam_args)
    outcome: dict = {}

    def work() -> None:
        try:
            with pipeline as p:
                build(p)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread below
            outcome["error"] = exc

    # a daemon thread: a stalled runner cannot keep the process alive after we give up on it
    thread = threading.Thread(target=work, name="beam-job", daemon=True)
    thread.start()
    outputs, last = -1, time.monotonic()
    while thread.is_alive():
        thread.join(STALL_POLL_SECONDS)
        done = len(storage.list_files(progress_dir, ".json")) if storage.exists(progress_dir) else 0
        if done != outputs:
            outputs, last = done, time.monotonic()
        elif thread.is_alive() and time.monotonic() - last > stall_timeout:
            _stop_beam_workers()
            raise TransientError(
                f"the Beam job wrote nothing for {stall_timeout:g} s (--stall-timeout): {outputs} of "
                f"{expected} outputs are done (a worker may have died); {unfinished}")
    exc = outcome.get("error")
    if exc is None:
        return
    if isinstance(exc, MimdexError):
        raise exc
    cause = exc  # a DoFn's error comes back wrapped by the runner
    while cause is not None and not isinstance(cause, MimdexError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        raise type(cause)(str(cause)) from exc
    for marker, cls in (("DataError", DataError), ("ObjectNotFound", DataError),
                        ("StorageFailure", TransientError)):
        if marker in str(exc):
            raise cls(f"Beam job failed: {str(exc).strip().splitlines()[-1]}") from exc
    raise exc


def _stop_beam_workers() -> None:
    """The SDK worker processes a multi-process DirectRunner started for this job."""
    for child in psutil.Process().children(recursive=True):
        try:
            if "apache_beam.runners.worker" in " ".join(child.cmdline()):
                child.kill()
        except psutil.Error:
            pass
