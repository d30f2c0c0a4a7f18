"""`mimdex demo`: the whole job on embedded defaults.

Today it generates the synthetic street-to-shop dataset (into a local S3 server it
starts on 127.0.0.1, or a local directory with --no-s3), measures the naive histogram
baseline, trains the tiny image-only and 3-tower models with equal budgets and
evaluates them on the held-out street queries. Later stages (encode, build-index,
the HTML report) join it as they are built.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os

from mimdex.infra import storage
from mimdex.infra.errors import MimdexError
from mimdex.pipelines.report import StageTimer, write_report

BUCKET = "mimdex-demo"


class StageFailed(MimdexError):
    """Wraps a failure with the demo stage it happened in (keeps the exit code)."""

    def __init__(self, stage: str, cause: MimdexError):
        super().__init__(f"demo stage '{stage}' failed: {cause} (partial output kept for inspection)")
        self.exit_code = cause.exit_code


def _train_and_eval(root: str, dataset: str, variant: str, args: argparse.Namespace) -> dict:
    """Train a tiny model (reused if its bundle is already complete) and evaluate it."""
    from mimdex.encoders.bundle import load_bundle
    from mimdex.encoders.training import TrainConfig
    from mimdex.pipelines import train_job
    from mimdex.pipelines.model_eval import evaluate_bundle

    out = train_job.train_unless_complete(
        train_job.TrainJob(data=dataset, catalog=storage.join(dataset, "catalog"),
                           out=storage.join(root, "models", variant), variant=variant),
        TrainConfig(epochs=args.epochs, batch_size=min(128, args.products // 4), seed=args.seed))
    return {"bundle": out, **evaluate_bundle(load_bundle(out), dataset)}


def main(args: argparse.Namespace) -> int:
    from mimdex.infra.local_s3 import create_bucket, local_s3_server
    from mimdex.pipelines.baseline import evaluate_histogram_nn
    from mimdex.pipelines.synth import job as synth
    from mimdex.pipelines.synth.plan import SynthConfig

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    timer = StageTimer()
    with contextlib.ExitStack() as stack:
        if args.no_s3:
            root = workdir
        else:
            endpoint = stack.enter_context(local_s3_server())
            root = create_bucket(endpoint, BUCKET)
            print(f"[demo] local S3 server on {endpoint} (stops when the demo ends)")
        dataset = storage.join(root, "dataset")

        def stage(name, fn):
            print(f"[demo] stage {name} ...", flush=True)
            try:
                with timer.stage(name):
                    return fn()
            except MimdexError as exc:
                raise StageFailed(name, exc) from exc

        cfg = SynthConfig(products=args.products, queries=args.queries, seed=args.seed)
        synth_report = stage("synth-catalog", lambda: synth.run(cfg, dataset))
        baseline = stage("baseline-histogram-nn", lambda: evaluate_histogram_nn(dataset))
        models = {}
        for variant in ("image-only", "3-tower"):
            models[variant] = stage(f"train-{variant}", lambda v=variant: _train_and_eval(root, dataset, v, args))

    summary = {"dataset": synth_report["counts"], "baseline_histogram_nn": baseline, "models": models,
               "storage": "local directory" if args.no_s3 else "local S3 server (ephemeral)",
               "timings_s": timer.seconds}
    print(json.dumps(summary, indent=2))
    print(f"[demo] naive histogram NN: top-1 is a wrong-category product "
          f"{baseline['wrong_category@1']:.0%} of the time; its top-1 shares the background "
          f"distractor's look {baseline['top1_has_distractor_look']:.0%} vs the query product's own "
          f"{baseline['top1_has_own_look']:.0%}")
    print(f"[demo] {'model':<16} recall@1  recall@10  wrong-category@1")
    rows = [("histogram NN", baseline)] + list(models.items())
    for name, m in rows:
        print(f"[demo] {name:<16} {m['recall@1']:>8.3f}  {m['recall@10']:>9.3f}  {m['wrong_category@1']:>16.3f}")
    print(write_report(workdir, "demo", summary))
    return 0
