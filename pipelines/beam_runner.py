"""Running a Beam graph from a job's driver: the pipeline options (the same for every
mimdex Beam job: build-index, the refresh diff, compaction), a watch for a stalled runner,
and errors mapped back to mimdex's exit codes.

A graph's DoFns write their outputs whole through the contracts layer plus a small JSON
record each under a progress directory; the driver counts those records to see progress.

Runners Beam does not know by a short name (Dask) are mapped here to their class, and
their option module is imported before any flag is parsed, so that ``--runner=DaskRunner
--dask_client_address=...`` works on the command line and in a --beam-options-file alike.
A FlinkRunner must name its job server (or a jar on disk and a JobManager): Beam's
fallbacks download a jar over HTTP or run Flink inside the driver.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil

from mimdex.infra import storage
from mimdex.infra.errors import DataError, MimdexError, TransientError, UsageError

STALL_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class ExtraRunner:
    """A runner that ships with Beam but that Beam's --runner does not know by name."""
    cls: str              # what --runner becomes
    module: str           # imported before flags are parsed: it registers the runner's options
    extra: str            # mimdex's setup.py extra that installs what it needs
    needs: str            # a module of that extra (the runner's own module imports it lazily)
    prefix: str           # its options' prefix: a flag with it needs the module even before --runner is seen
    required: tuple[str, ...]   # one of these flags must be given (no silent local cluster)
    defaults: tuple[tuple[tuple[str, ...], str], ...]   # (flags that replace it, flag added when none is given)


EXTRA_RUNNERS = {
    # One Dask task per element: Beam's DaskRunner packs 128 elements of a Create into one bag
    # partition, so a build of < 128 parts ran on one worker; our elements (parts, shards,
    # catalog units) are each seconds to minutes of work, so one per task spreads them.
    "daskrunner": ExtraRunner("apache_beam.runners.dask.dask_runner.DaskRunner", "apache_beam.runners.dask.dask_runner",
                              "dask", "distributed", "--dask_", ("--dask_client_address", "--dask_scheduler_file"),
                              ((("--dask_npartitions", "--dask_partition_size"), "--dask_partition_size=1"),)),
}


FLINK_RUNNERS = ("flinkrunner", "apache_beam.runners.portability.flink_runner.flinkrunner")


def _check_flink(beam_args: list[str]) -> None:
    """Beam's FlinkRunner without a job endpoint starts a job server from
    --flink_job_server_jar, downloading one over HTTP when none is given, and without
    --flink_master it runs Flink inside the driver. A mimdex job does neither: it submits to
    a running job server (--job_endpoint), or starts one from a jar on disk for a named
    JobManager."""
    if (_flag_value(beam_args, "--runner") or "").lower() not in FLINK_RUNNERS or _flag_value(beam_args, "--job_endpoint"):
        return
    master, jar = _flag_value(beam_args, "--flink_master"), _flag_value(beam_args, "--flink_job_server_jar")
    if not master or master.strip() in ("[local]", "[auto]") or not jar:
        raise UsageError("--runner=FlinkRunner needs --job_endpoint (a running Beam job server), or --flink_master "
                         "(the JobManager's REST address) and --flink_job_server_jar (a job server jar on disk, as "
                         "`make system-deps` builds under .tools/); without them Beam downloads a job server jar "
                         "over HTTP, or runs Flink inside the driver")
    if "://" in jar:
        raise UsageError(f"--flink_job_server_jar {jar}: a path on this machine, not a URL (nothing is downloaded "
                         "at run time)")
    if not os.path.isfile(jar):
        raise UsageError(f"--flink_job_server_jar {jar}: no such file")


def _flag_value(beam_args: list[str], name: str) -> str | None:
    """The last value given for ``--name=value`` or ``--name value`` (Beam's last one wins)."""
    value = None
    for i, arg in enumerate(beam_args):
        if arg == name and i + 1 < len(beam_args):
            value = beam_args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _extra_runner(beam_args: list[str]) -> ExtraRunner | None:
    runner = (_flag_value(beam_args, "--runner") or "").lower()
    return next((r for name, r in EXTRA_RUNNERS.items() if runner in (name, r.cls.lower())), None)


def register_runner_options(beam_args: list[str]) -> None:
    """Import the option module of each runner the flags name or give options to, so that
    Beam's parser knows its flags; a missing extra is a usage error naming the pip line
    (exit 2). The runner may be named in an options file and its address on the command
    line: each half is checked alone."""
    named = _extra_runner(beam_args)
    for runner in EXTRA_RUNNERS.values():
        if runner is not named and not any(a.startswith(runner.prefix) for a in beam_args):
            continue
        try:
            importlib.import_module(runner.needs)   # first: Beam's Dask module fails oddly without it
            importlib.import_module(runner.module)
        except ImportError as exc:
            what = f"--runner={_flag_value(beam_args, '--runner')}" if runner is named else f"{runner.prefix}* options"
            raise UsageError(f"{what}: the '{runner.extra}' extra is not installed ({exc}): "
                             f"pip install 'mimdex[{runner.extra}]'") from exc


def resolve(beam_args: list[str]) -> list[str]:
    """The options as Beam is given them: an extra runner's short name replaced by its
    class, its defaults added where the flags leave them open."""
    _check_flink(beam_args)
    runner = _extra_runner(beam_args)
    if runner is None:
        return list(beam_args)
    register_runner_options(beam_args)
    if not any(_flag_value(beam_args, f) for f in runner.required):
        raise UsageError(f"--runner={_flag_value(beam_args, '--runner')} needs {' or '.join(runner.required)} "
                         "(the cluster to submit to)")
    # defaults first, the runner replaced where it stands: the order of what was given holds
    args = [flag for replaced_by, flag in runner.defaults if not any(_flag_value(beam_args, f) for f in replaced_by)]
    for i, arg in enumerate(beam_args):
        if arg == "--runner" or arg.startswith("--runner="):
            args.append(f"--runner={runner.cls}")
        elif not (i and beam_args[i - 1] == "--runner"):
            args.append(arg)
    return args


def beam_pipeline(beam_args: list[str]):
    """A Beam pipeline for these options (DirectRunner when none). Runners that check
    their options when the pipeline is made (Dataflow: project, gs:// temp/staging)
    fail here, before any work, as a usage error."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    beam_args = resolve(beam_args)
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
            build(pipeline)
            try:
                outcome["result"] = pipeline.run()   # the DirectRunner returns when done; others on submission
            except OSError as exc:
                if runs_here(beam_args):
                    raise
                raise TransientError(f"the Beam job could not be submitted (is the cluster up and reachable?): "
                                     f"{exc}") from exc
            outcome["result"].wait_until_finish()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread below
            outcome["error"] = exc
        finally:
            _close_client(outcome.get("result"))

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
            _stop_beam_workers(outcome.get("result"))
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
    for marker, cls in (("ObjectNotFound", storage.ObjectNotFound), ("DataError", DataError),
                        ("StorageFailure", TransientError)):
        if marker in str(exc):
            raise cls(f"Beam job failed: {str(exc).strip().splitlines()[-1]}") from exc
    raise exc


def _close_client(result) -> None:
    """A cluster runner's client (Dask's) holds connections to the scheduler: close it
    with the job, so that a driver running several jobs does not collect them."""
    client = getattr(result, "client", None)
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - the job's outcome is decided; a failed close is not news
            logging.getLogger(__name__).debug("closing the runner's client failed", exc_info=True)


def _stop_beam_workers(result) -> None:
    """Cancel what a cluster runner still runs for this job, and kill the SDK worker
    processes a multi-process DirectRunner started for it."""
    try:
        if result is not None:
            result.cancel()
    except Exception:  # noqa: BLE001 - a runner without cancel (or a lost cluster) cannot be helped
        logging.getLogger(__name__).debug("cancelling the Beam job failed", exc_info=True)
    for child in psutil.Process().children(recursive=True):
        try:
            if "apache_beam.runners.worker" in " ".join(child.cmdline()):
                child.kill()
        except psutil.Error:
            pass
