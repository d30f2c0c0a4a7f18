"""The paper's claim on synthetic street-to-shop data: image-only vs 3-tower vs 4-tower.

Trains the three tiny variants with equal budgets (same data, seed, epochs, batch size,
learning rate) and evaluates them on the held-out street and reformulation queries.

    .venv/bin/python tests/benchmarks/bench_towers.py [--workdir DIR] [--epochs 40]

Goals (issue: "The MIM towers"):
  * 3-tower cuts the wrong-category top-1 rate by >= 25% relative to image-only and
    does not lower recall@10;
  * 4-tower image + text reaches >= 2x the target-sibling recall@1 of the image alone.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from mimdex.encoders.bundle import load_bundle
from mimdex.encoders.training import TrainConfig
from mimdex.infra import storage
from mimdex.pipelines import train_job
from mimdex.pipelines.model_eval import evaluate_bundle
from mimdex.pipelines.synth import job as synth
from mimdex.pipelines.synth import SynthConfig

VARIANTS = ("image-only", "3-tower", "4-tower")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-output/towers")
    ap.add_argument("--products", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = os.path.abspath(args.workdir)
    data = storage.join(work, "dataset")
    synth.run(SynthConfig(products=args.products, queries=args.queries, seed=11), data, progress=False)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    results = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        out = train_job.train_unless_complete(
            train_job.TrainJob(data=data, catalog=storage.join(data, "catalog"),
                               out=storage.join(work, f"model-{variant}-e{args.epochs}"), variant=variant),
            cfg, progress=False)
        train_s = time.perf_counter() - t0
        results[variant] = {**evaluate_bundle(load_bundle(out), data), "train_s": round(train_s, 1)}
        print(f"{variant:>10}: " + json.dumps(results[variant]), flush=True)

    io_, three, four = (results[v] for v in VARIANTS)
    cut = 1 - three["wrong_category@1"] / max(io_["wrong_category@1"], 1e-9)
    reform_ratio = four["reform_recall@1_image_text"] / max(four["reform_recall@1_image_only"], 1e-9)
    reform_vs_io = four["reform_recall@1_image_text"] / max(io_["reform_recall@1_image_only"], 1e-9)
    print()
    print(f"equal budgets: {args.epochs} epochs x batch {args.batch_size}, seed {args.seed}; "
          f"{io_['street_queries']} street + {io_['reformulation_queries']} reformulation queries; "
          f"gallery = whole catalog ({args.products})")
    print(f"| {'model':<10} | recall@1 | recall@10 | wrong-category@1 | reform r@1 image | reform r@1 image+text | train s |")
    print("|" + "---|" * 7)
    for v in VARIANTS:
        r = results[v]
        print(f"| {v:<10} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['wrong_category@1']:.3f} | "
              f"{r['reform_recall@1_image_only']:.3f} | {r.get('reform_recall@1_image_text', float('nan')):.3f} | "
              f"{r['train_s']:.0f} |")
    print()
    print(f"3-tower vs image-only: wrong-category@1 cut by {cut:.1%} (goal >= 25%): "
          f"{'MET' if cut >= 0.25 else 'MISSED'}; recall@10 {three['recall@10']:.3f} vs {io_['recall@10']:.3f} "
          f"(goal: not lower): {'MET' if three['recall@10'] >= io_['recall@10'] else 'MISSED'}")
    print(f"4-tower reformulations: image+text recall@1 {four['reform_recall@1_image_text']:.3f} = "
          f"{reform_ratio:.1f}x its image alone, {reform_vs_io:.1f}x image-only's image search "
          f"(goal >= 2x): {'MET' if min(reform_ratio, reform_vs_io) >= 2 else 'MISSED'}")
    storage.write_json(storage.join(work, f"results-e{args.epochs}.json"),
                       {"config": vars(args), "results": results})


if __name__ == "__main__":
    main()
