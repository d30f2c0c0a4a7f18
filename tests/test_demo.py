"""`mimdex demo` end to end on a small catalog (local directory, then re-run reuses)."""
from __future__ import annotations

import json

from mimdex.infra import storage
from mimdex.pipelines import cli


def test_demo_runs_end_to_end_and_reuses_complete_work(tmp_path, capsys):
    argv = ["demo", "--workdir", str(tmp_path / "demo"), "--no-s3", "--products", "160",
            "--queries", "30", "--epochs", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = storage.read_json(out[-1])
    assert report["job"] == "demo" and report["dataset"]["products"] == 160
    assert set(report["models"]) == {"image-only", "3-tower"}
    for m in [report["baseline_histogram_nn"], *report["models"].values()]:
        assert 0.0 <= m["recall@1"] <= m["recall@10"] <= 1.0
    sha = json.loads((tmp_path / "demo" / "models" / "3-tower" / "config.json").read_text())["sha256"]
    # Second run: dataset and bundles are complete, so nothing is regenerated or retrained.
    assert cli.main(argv) == 0
    again = storage.read_json(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["models"]["3-tower"]["recall@10"] == report["models"]["3-tower"]["recall@10"]
    assert json.loads((tmp_path / "demo" / "models" / "3-tower" / "config.json").read_text())["sha256"] == sha
    assert again["timings_s"]["synth-catalog"] < report["timings_s"]["synth-catalog"]
