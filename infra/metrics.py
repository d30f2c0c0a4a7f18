"""Job metrics pushed to a Prometheus Pushgateway (`--pushgateway-url`).

Batch jobs do not live long enough to be scraped, so they push once at the end. The push
uses POST ("pushadd"): it replaces only the metric names sent in this push, inside the
group (job, target). A failed run therefore sends no `last_success` sample and the one
from the last good run stays, which is what a freshness alert needs
(`time() - mimdex_job_last_success_timestamp_seconds > 26 * 3600`).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

from mimdex.infra.errors import EXIT_NOTHING_TO_DO, EXIT_OK

SUCCESS_CODES = (EXIT_OK, EXIT_NOTHING_TO_DO)  # "nothing changed" is a healthy night


def numeric_counts(report: dict | None) -> dict[str, float]:
    """The report's counters as flat name -> value (``counts`` and a refresh's ``diff``)."""
    out: dict[str, float] = {}
    for section in ("counts", "diff"):
        for key, value in ((report or {}).get(section) or {}).items():
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                out[f"{section}_{key}" if section != "counts" else key] = float(value)
    return out


def job_registry(job: str, exit_code: int, seconds: float, counts: dict[str, float],
                 now: float | None = None) -> CollectorRegistry:
    """The samples of one run (pure: no I/O)."""
    now = time.time() if now is None else now
    reg = CollectorRegistry()
    Gauge("mimdex_job_duration_seconds", "wall time of the last run", registry=reg).set(seconds)
    Gauge("mimdex_job_exit_code", "exit code of the last run (0 ok, 99 nothing to do, 75 retry, 65 bad data)",
          registry=reg).set(exit_code)
    Gauge("mimdex_job_last_run_timestamp_seconds", "when the last run ended", registry=reg).set(now)
    if counts:
        g = Gauge("mimdex_job_count", "counters from the last run's report", ["what"], registry=reg)
        for name, value in sorted(counts.items()):
            g.labels(what=name).set(value)
    if exit_code in SUCCESS_CODES:
        Gauge("mimdex_job_last_success_timestamp_seconds", "when the last successful run ended",
              registry=reg).set(now)
    return reg


def push(url: str, job: str, target: str, exit_code: int, seconds: float, report: dict | None) -> None:
    """Push one run's metrics to the gateway at ``url`` (group: job=mimdex_<job>, target)."""
    pushadd_to_gateway(url, job=f"mimdex_{job.replace('-', '_')}", grouping_key={"target": target},
                       registry=job_registry(job, exit_code, seconds, numeric_counts(report)), timeout=10)
