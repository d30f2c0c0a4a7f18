"""--pushgateway-url against a real Prometheus Pushgateway on 127.0.0.1."""
from __future__ import annotations

import io
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import random_bundle
from mimdex.infra.metrics import job_registry, numeric_counts
from mimdex.pipelines import cli


def _gateway_samples(url: str, job: str) -> dict:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("job") == job:
                out[(s.name, s.labels.get("what"))] = (s.value, s.labels)
    return out


def _catalog(path, rows: int, with_title: bool = True) -> str:
    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 7 % 255, 80, 160)).save(buf, "PNG")
        return buf.getvalue()

    cols = {"product_id": [f"p{i}" for i in range(rows)], "image": [png(i) for i in range(rows)]}
    if with_title:
        cols["title"] = [f"blue mug {i}" for i in range(rows)]
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_success_then_failure_keeps_the_last_success_time(tmp_path, pushgateway, capsys):
    model = str(tmp_path / "model")
    random_bundle(model, [f"blue mug {i}" for i in range(20)])
    out = str(tmp_path / "emb")
    argv = ["encode", "--model", model, "--out", out, "--pushgateway-url", pushgateway, "--no-progress"]
    assert cli.main([*argv, "--catalog", _catalog(tmp_path / "good.parquet", 20)]) == 0
    first = _gateway_samples(pushgateway, "mimdex_encode")
    assert first[("mimdex_job_exit_code", None)][0] == 0
    assert first[("mimdex_job_count", "encoded")][0] == 20 and first[("mimdex_job_count", "rejected")][0] == 0
    assert first[("mimdex_job_duration_seconds", None)][0] > 0
    assert first[("mimdex_job_exit_code", None)][1]["target"] == out
    success_at = first[("mimdex_job_last_success_timestamp_seconds", None)][0]

    time.sleep(1.1)  # timestamps are seconds
    bad = _catalog(tmp_path / "bad.parquet", 5, with_title=False)
    assert cli.main([*argv, "--catalog", bad]) == 65
    second = _gateway_samples(pushgateway, "mimdex_encode")
    assert second[("mimdex_job_exit_code", None)][0] == 65
    assert second[("mimdex_job_last_success_timestamp_seconds", None)][0] == success_at
    assert second[("mimdex_job_last_run_timestamp_seconds", None)][0] > success_at
    # the failed run had no report: the counters of the last good run are left as they were
    assert second[("mimdex_job_count", "encoded")][0] == 20
    assert "title" in capsys.readouterr().err


def test_an_unreachable_gateway_is_a_warning_not_a_new_exit_code(tmp_path, capsys):
    code = cli.main(["build-index", "--embeddings", str(tmp_path / "none"), "--out", str(tmp_path / "idx"),
                     "--pushgateway-url", "http://127.0.0.1:9"])
    assert code == 65
    err = capsys.readouterr().err
    assert "warning: metrics push to http://127.0.0.1:9 failed" in err and "manifest" in err


def test_nothing_to_do_counts_as_success_and_refresh_diff_counts_are_pushed():
    report = {"counts": {"encoded": 3, "complete": True}, "diff": {"new": 2, "deleted": 1}}
    assert numeric_counts(report) == {"encoded": 3.0, "diff_new": 2.0, "diff_deleted": 1.0}
    names = lambda reg: {m.name for m in reg.collect()}  # noqa: E731
    assert "mimdex_job_last_success_timestamp_seconds" in names(job_registry("refresh", 99, 1.0, {}))
    assert "mimdex_job_last_success_timestamp_seconds" not in names(job_registry("refresh", 75, 1.0, {}))
