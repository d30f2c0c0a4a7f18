"""The nightly catalog refresh as an Airflow DAG (Airflow 2.7+; TaskFlow API).

    refresh  ->  announce(report_uri)

`refresh` runs `mimdex refresh` on the worker (the mimdex CPU image) and turns its exit
code into Airflow's outcomes:

    0   success: the report URI (the last line mimdex prints) goes to XCom for `announce`
    99  nothing changed: AirflowSkipException, so `announce` is skipped too
    75  transient: AirflowException, retried (`retries`, exponential back-off)
    65  bad input data, 2 bad configuration, anything else: AirflowFailException, no
        retry; `on_failure_callback` pages the on-call through the `mimdex_pager` HTTP
        connection (an alerting webhook)

Airflow is not a dependency of mimdex: this file imports nothing from it, and the tests
check it by parsing (the exit-code table against mimdex's own, the command against the
mimdex CLI parser).
"""
from __future__ import annotations

import json
import subprocess
from datetime import datetime, timedelta

from airflow.decorators import dag, task
from airflow.exceptions import AirflowException, AirflowFailException, AirflowSkipException

# exit code -> what the scheduler does (mirrors mimdex.infra.errors)
OUTCOMES = {0: "success", 99: "skip", 75: "retry", 65: "page", 2: "page"}

REFRESH_ARGV = [
    "mimdex", "refresh",
    "--catalog", "s3://mimdex-catalog/current/",
    "--model", "s3://mimdex-models/3-tower/current",
    "--embeddings", "s3://mimdex-emb/3-tower",
    "--index", "s3://mimdex-index/3-tower",
    "--ray-address", "ray://mimdex-encode-head.mimdex.svc:10001",
    "--runtime-env", "/opt/mimdex/src/infra/ray/runtime_env.yaml",
    "--beam-options-file", "/opt/mimdex/src/infra/beam/flink.options",
    "--min-recall", "0.9",
    "--pushgateway-url", "http://pushgateway.monitoring.svc:9091",
    "--no-progress",
]


def page_oncall(context) -> None:
    """Post the failure to the alerting webhook of the `mimdex_pager` connection."""
    from airflow.providers.http.hooks.http import HttpHook

    ti = context["task_instance"]
    HttpHook(method="POST", http_conn_id="mimdex_pager").run(
        endpoint="", data=json.dumps({"summary": f"mimdex nightly refresh failed: {ti.task_id}",
                                      "log_url": ti.log_url, "severity": "error"}),
        headers={"Content-Type": "application/json"})


@dag(
    dag_id="mimdex_nightly_refresh",
    schedule="30 2 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "search-infra"},
    tags=["mimdex"],
)
def mimdex_nightly_refresh():
    @task(retries=3, retry_delay=timedelta(minutes=10), retry_exponential_backoff=True,
          execution_timeout=timedelta(hours=6), on_failure_callback=page_oncall)
    def refresh() -> str:
        proc = subprocess.run(REFRESH_ARGV, capture_output=True, text=True)
        print(proc.stdout[-20000:])
        print(proc.stderr[-20000:])
        lines = proc.stdout.strip().splitlines()
        outcome = OUTCOMES.get(proc.returncode, "page")
        if outcome == "success":
            return lines[-1]  # the JSON report's URI
        if outcome == "skip":
            raise AirflowSkipException("mimdex refresh: nothing changed since the current index version")
        message = f"mimdex refresh exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
        if outcome == "retry":
            raise AirflowException(message)
        raise AirflowFailException(message)

    @task
    def announce(report_uri: str) -> str:
        """Read the refresh report and hand the new version to the serving side."""
        import fsspec

        with fsspec.open(report_uri, "r") as f:
            report = json.load(f)
        print(f"published {report['version']} ({report['decision']}); report {report_uri}")
        return report["version"]

    announce(refresh())


mimdex_nightly_refresh()
