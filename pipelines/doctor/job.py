"""Run the checks (and the bench), print the table, write the JSON report, choose the exit:
2 naming each missing required piece, 75 when only the store did not answer, else 0."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from mimdex.infra.errors import TransientError, UsageError
from mimdex.pipelines.doctor.bench import BenchConfig, run_bench
from mimdex.pipelines.doctor.checks import all_checks
from mimdex.pipelines.report import StageTimer, write_report


@dataclass(frozen=True)
class DoctorConfig:
    out: str = "doctor-output"
    store: str | None = None
    gpu: bool | None = None          # None: a GPU node when CUDA is present
    bench: BenchConfig | None = None  # None: checks only


def _table(rows: list[tuple[str, str, str]], head: tuple[str, str, str]) -> str:
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def run(cfg: DoctorConfig) -> tuple[dict, str]:
    """Returns the report and its URI; raises UsageError / TransientError after writing it
    when a required check failed."""
    timer = StageTimer()
    with timer.stage("checks"):
        checks, gpu = all_checks(cfg.gpu, cfg.store)
    print(_table([(c.name, "ok" if c.ok else ("MISSING" if c.required else "-"), c.detail) for c in checks],
                 ("check", "status", "detail")))
    missing = [c for c in checks if c.required and not c.ok]
    report = {"node": "gpu" if gpu else "cpu", "checks": [c.to_json() for c in checks],
              "missing": [c.name for c in missing]}
    if cfg.bench and not missing:
        with timer.stage("bench"):
            measures = run_bench(cfg.bench)
        print()
        print(_table([(m.name, f"{m.value:,.1f} {m.unit}" if m.value >= 10 else f"{m.value:g} {m.unit}", m.detail)
                      for m in measures], ("measure", "value", "detail")))
        report["bench"] = [m.to_json() for m in measures]
        report["bench_config"] = {"preset": cfg.bench.preset, "batch_size": cfg.bench.batch_size,
                                  "batches": cfg.bench.batches}
    report["seconds"] = timer.seconds
    uri = write_report(cfg.out, "doctor", report)
    print(f"report: {uri}", file=sys.stderr)
    pieces = [c for c in missing if c.name != "store"]
    if pieces:
        raise UsageError("this node lacks " + "; ".join(f"{c.name}: {c.detail}" for c in pieces)
                         + (" (--bench skipped)" if cfg.bench else ""))
    if missing:
        raise TransientError(f"the object store did not answer: {missing[0].detail}")
    return report, uri
