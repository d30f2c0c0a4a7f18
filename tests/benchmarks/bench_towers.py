"""The paper's claim on synthetic street-to-shop data: image-only vs 3-tower vs 4-tower,
for a preset and a reference preset side by side, with equal budgets.

Trains the three variants of ``--preset`` and of ``--reference`` with the same data,
seed, epochs and batch size (each preset with its own recipe: encoders.training.
recipe_for), adds a row for the preset's pretrained features with no fine-tuning, and
evaluates every model on the held-out street and reformulation queries against the whole
catalog (exact search).

    .venv/bin/python tests/benchmarks/bench_towers.py --preset efficientnet-lite0-minilm --epochs 10
    .venv/bin/python tests/benchmarks/bench_towers.py --preset tiny --reference none --epochs 80

Goals (issues "The MIM towers" and "Pretrained towers from packaged weights"):
  * the preset's 3-tower recall@10 >= 2x the reference's 3-tower (pretrained vs tiny);
  * 3-tower wrong-category top-1 <= 0.8x image-only's, with recall@10 not lower;
  * 4-tower photo + reformulation text recall@1 >= 2x the photo alone, and >= 0.2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from mimdex.encoders.bundle import load_bundle
from mimdex.encoders.config import PRESETS, PRETRAINED_PRESETS
from mimdex.encoders.training import TrainConfig, recipe_for
from mimdex.infra import storage
from mimdex.pipelines import train as train_job
from mimdex.pipelines.train import evaluate_bundle
from mimdex.pipelines.synth import SynthConfig
from mimdex.pipelines.synth import job as synth

VARIANTS = ("image-only", "3-tower", "4-tower")


def _train(work: str, data: str, preset: str, variant: str, args) -> dict:
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, **recipe_for(preset))
    out = storage.join(work, f"model-{preset}-{variant}-e{args.epochs}")
    t0 = time.perf_counter()
    train_job.train_unless_complete(train_job.TrainJob(data=data, catalog=storage.join(data, "catalog"), out=out,
                                                       variant=variant, preset=preset), cfg, progress=False)
    train_s = time.perf_counter() - t0  # 0 when the bundle was already complete
    return {**evaluate_bundle(load_bundle(out), data), "train_s": round(train_s, 1),
            "recipe": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "weights"}}


def _untuned(work: str, data: str, preset: str, args) -> dict:
    out = storage.join(work, f"model-{preset}-pretrained-features")
    if not storage.exists(storage.join(out, "config.json")):
        train_job.save_pretrained_bundle(preset, "image-only", out, args.seed)
    return {**evaluate_bundle(load_bundle(out), data), "train_s": 0.0}


def _row(name: str, r: dict) -> str:
    text = r.get("reform_recall@1_image_text")
    return (f"| {name:<40} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | {r['wrong_category@1']:.3f} | "
            f"{r['reform_recall@1_image']:.3f} | {'—' if text is None else f'{text:.3f}'} | "
            f"{r['train_s']:.0f} |")


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-output/towers")
    ap.add_argument("--preset", default="efficientnet-lite0-minilm", choices=PRESETS)
    ap.add_argument("--reference", default="tiny", choices=PRESETS + ("none",))
    ap.add_argument("--products", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = os.path.abspath(args.workdir)
    data = storage.join(work, "dataset")
    synth.run(SynthConfig(products=args.products, queries=args.queries, seed=11), data, progress=False)
    presets = [args.preset] + ([args.reference] if args.reference not in ("none", args.preset) else [])
    results: dict[str, dict] = {}
    for preset in presets:
        if preset in PRETRAINED_PRESETS:
            results[f"{preset} pretrained features, no fine-tuning"] = _untuned(work, data, preset, args)
        for variant in VARIANTS:
            results[f"{preset} {variant}"] = r = _train(work, data, preset, variant, args)
            print(f"{preset} {variant}: " + json.dumps({k: v for k, v in r.items() if k != "recipe"}), flush=True)

    print(f"\nequal budgets: {args.epochs} epochs x batch {args.batch_size}, seed {args.seed}, each preset with its "
          f"own recipe; {args.products} products (gallery = whole catalog), held-out street + reformulation queries")
    print(f"| {'model':<40} | recall@1 | recall@10 | wrong-category@1 | reform r@1 photo | reform r@1 photo + text "
          "| train s |")
    print("|" + "---|" * 7)
    for name, r in results.items():
        print(_row(name, r))
    print()
    p = {v: results[f"{args.preset} {v}"] for v in VARIANTS}
    if len(presets) > 1:
        ref = results[f"{args.reference} 3-tower"]
        ratio = p["3-tower"]["recall@10"] / max(ref["recall@10"], 1e-9)
        print(f"{args.preset} 3-tower recall@10 {p['3-tower']['recall@10']:.3f} vs {args.reference} 3-tower "
              f"{ref['recall@10']:.3f}: {ratio:.2f}x (goal >= 2x): {_verdict(ratio >= 2)}")
    cut = p["3-tower"]["wrong_category@1"] / max(p["image-only"]["wrong_category@1"], 1e-9)
    print(f"3-tower wrong-category@1 {p['3-tower']['wrong_category@1']:.3f} = {cut:.2f}x image-only's "
          f"{p['image-only']['wrong_category@1']:.3f} (goal <= 0.8x): {_verdict(cut <= 0.8)}; recall@10 "
          f"{p['3-tower']['recall@10']:.3f} vs {p['image-only']['recall@10']:.3f} (goal: not lower): "
          f"{_verdict(p['3-tower']['recall@10'] >= p['image-only']['recall@10'])}")
    four = p["4-tower"]
    fused, alone = four["reform_recall@1_image_text"], four["reform_recall@1_image"]
    print(f"4-tower reformulations: photo + text recall@1 {fused:.3f} vs photo alone {alone:.3f} = "
          f"{fused / max(alone, 1e-9):.1f}x (goal >= 2x and >= 0.2): {_verdict(fused >= 2 * alone and fused >= 0.2)}")
    storage.write_json(storage.join(work, f"results-{args.preset}-e{args.epochs}.json"),
                       {"config": vars(args), "results": results})


if __name__ == "__main__":
    main()
