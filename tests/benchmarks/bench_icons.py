"""The paper's claim on real drawings: image-only vs 3-tower vs 4-tower on the icon
street-to-shop benchmark (icon_dataset.py: @mdi/svg's filled drawings as the catalog,
its outline drawings on clutter as street photos, its own category tags), at equal
budgets, for one or more training recipes.

    .venv/bin/python tests/benchmarks/bench_icons.py                       # the preset's recipe, seeds 0-2
    .venv/bin/python tests/benchmarks/bench_icons.py --recipes titles-half,category-negatives --variants image-only,3-tower

Every variant of a recipe trains with the same data, seed, epochs and batch size; the
figures are pipelines.train.evaluate_bundle's (exact search over the whole catalog,
held-out products only). A recipe is the preset's TrainConfig (encoders.training.
recipe_for) with the changes RECIPES names.

Goals (issue "The paper's claim on real images"), for each recipe, on the seeds' means:
  * 3-tower wrong-category top-1 <= 0.9x image-only's, with recall@10 not lower;
  * 4-tower photo + text reformulation recall@1 >= 3x the photo alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import icon_dataset  # noqa: E402

from mimdex.encoders.bundle import load_bundle  # noqa: E402
from mimdex.encoders.config import PRESETS, LossWeights  # noqa: E402
from mimdex.encoders.training import TrainConfig, recipe_for  # noqa: E402
from mimdex.infra import storage  # noqa: E402
from mimdex.pipelines import train as train_job  # noqa: E402
from mimdex.pipelines.train import evaluate_bundle  # noqa: E402

VARIANTS = ("image-only", "3-tower", "4-tower")
# Each recipe: changes to the preset's TrainConfig ("weights": LossWeights fields).
RECIPES: dict[str, dict] = {
    "preset": {},
    "titles-x2": {"weights": {"query_title": 1.0, "product_title": 1.0}},
    "titles-half": {"weights": {"query_title": 0.25, "product_title": 0.25}},
    "titles-quarter": {"weights": {"query_title": 0.125, "product_title": 0.125}},
    "product-title-only": {"weights": {"query_title": 0.0}},
    "category-negatives": {"batching": "category"},
    "epochs-x2": {"epochs_x": 2},
    "text-top-2": {"freeze_text": False, "text_layers": 2},
}


def train_config(preset: str, recipe: str, epochs: int, batch_size: int, seed: int) -> TrainConfig:
    changes = dict(RECIPES[recipe])
    weights = LossWeights(**changes.pop("weights", {}))
    epochs *= changes.pop("epochs_x", 1)
    return TrainConfig(**{**recipe_for(preset), "epochs": epochs, "batch_size": batch_size, "seed": seed,
                          "weights": weights, "validate_every": 0, **changes})


def _key(cfg: TrainConfig, variant: str) -> str:
    """The model's name: what its training depends on, so that recipes that train a
    variant alike (an image-only model ignores the text settings) share one model."""
    effective = dataclasses.asdict(dataclasses.replace(cfg, weights=cfg.weights.for_variant(variant)))
    if variant == "image-only":
        effective.pop("freeze_text"), effective.pop("text_layers")
    return hashlib.sha256(json.dumps(effective, sort_keys=True).encode()).hexdigest()[:12]


def run_one(data: str, preset: str, recipe: str, variant: str, seed: int, args, loaded: dict) -> dict:
    """Train (unless ``<data>.models`` holds the model already: train_s 0) and evaluate."""
    cfg = train_config(preset, recipe, args.epochs, args.batch_size, seed)
    out = storage.join(f"{data}.models", f"{preset}-{variant}-{_key(cfg, variant)}")
    job = train_job.TrainJob(data=data, catalog=storage.join(data, "catalog"), out=out, variant=variant,
                             preset=preset)

    def data_once():   # one decode of the data for every model
        if "data" not in loaded:
            loaded["data"] = train_job.load_data(job, progress=False)
        return loaded["data"]

    t0 = time.perf_counter()
    train_job.train_unless_complete(job, cfg, progress=False, data=data_once)
    train_s = time.perf_counter() - t0
    return {**evaluate_bundle(load_bundle(out), data), "train_s": round(train_s, 1)}


METRICS = ("recall@1", "recall@10", "wrong_category@1", "reform_recall@1_image", "reform_recall@1_image_text")


def mean_of(runs: list[dict]) -> dict:
    """Each figure's mean over seeds (absent where a model has none)."""
    return {m: sum(r[m] for r in runs) / len(runs) for m in METRICS if all(m in r for r in runs)} | {
        "train_s": sum(r["train_s"] for r in runs) / len(runs)}


def verdicts(r: dict[str, dict]) -> dict:
    """The issue's goals on one set of figures (the seed means)."""
    io, three, four = r["image-only"], r["3-tower"], r["4-tower"]
    cut = three["wrong_category@1"] / max(io["wrong_category@1"], 1e-9)
    reform = four["reform_recall@1_image_text"] / max(four["reform_recall@1_image"], 1e-9)
    return {"wrong_category_ratio": round(cut, 3), "wrong_category_met": cut <= 0.9,
            "recall10_not_lower": three["recall@10"] >= io["recall@10"],
            "reform_ratio": round(reform, 2), "reform_met": reform >= 3}


def _row(recipe: str, variant: str, seed: str, r: dict) -> str:
    text = r.get("reform_recall@1_image_text")
    return (f"| {recipe:<22} | {variant:<10} | {seed:>4} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | "
            f"{r['wrong_category@1']:.1%} | {r['reform_recall@1_image']:.3f} / "
            f"{'—' if text is None else f'{text:.3f}'} | {r['train_s']:.0f} |")


def _say(recipe: str, by: dict, v: dict, seeds: list[int]) -> str:
    mark = lambda ok: "MET" if ok else "MISSED"  # noqa: E731
    return (f"{recipe} (mean of seeds {', '.join(map(str, seeds))}): 3-tower wrong-category@1 "
            f"{by['3-tower']['wrong_category@1']:.1%} = {v['wrong_category_ratio']:.2f}x image-only's "
            f"{by['image-only']['wrong_category@1']:.1%} (goal <= 0.9x): {mark(v['wrong_category_met'])}; recall@10 "
            f"{by['3-tower']['recall@10']:.3f} vs {by['image-only']['recall@10']:.3f} (goal: not lower): "
            f"{mark(v['recall10_not_lower'])}; 4-tower photo + text {by['4-tower']['reform_recall@1_image_text']:.3f}"
            f" = {v['reform_ratio']:.1f}x photo alone {by['4-tower']['reform_recall@1_image']:.3f} (goal >= 3x): "
            f"{mark(v['reform_met'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-output/icons")
    ap.add_argument("--mdi", help="the unpacked @mdi/svg package (default: npm pack into the workdir)")
    ap.add_argument("--preset", default="efficientnet-lite0-minilm", choices=PRESETS)
    ap.add_argument("--recipes", default="preset", help=f"comma-separated, of: {', '.join(RECIPES)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (the recipe search: "
                    "image-only,3-tower); the goals need all three")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds; the goals are judged on "
                    "their means (one seed's figures move by several points)")
    ap.add_argument("--limit", type=int, help="the first products of a seeded shuffle only (quick runs)")
    ap.add_argument("--titles", choices=icon_dataset.TITLES, default="name",
                    help="the catalog's titles: name and aliases, or followed by the category (department)")
    ap.add_argument("--out", default="bench-output/icons.json")
    args = ap.parse_args()
    recipes, variants = args.recipes.split(","), args.variants.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"--recipes: unknown {unknown}; known: {', '.join(RECIPES)}")
    work = os.path.abspath(args.workdir)
    data = os.path.join(work, "dataset" + ("" if args.titles == "name" else f"-{args.titles}")
                        + ("" if args.limit is None else f"-{args.limit}"))
    manifest = icon_dataset.ensure(data, args.mdi, os.path.join(work, "npm"), limit=args.limit, titles=args.titles)
    print(json.dumps(manifest["counts"]), flush=True)
    runs: dict[str, dict[str, dict[int, dict]]] = {}
    loaded: dict = {}
    for recipe in recipes:
        for variant in variants:
            for seed in seeds:
                r = run_one(data, args.preset, recipe, variant, seed, args, loaded)
                runs.setdefault(recipe, {}).setdefault(variant, {})[seed] = r
                print(f"{recipe} {variant} seed {seed}: {json.dumps(r)}", flush=True)
    means = {recipe: {v: mean_of(list(by_seed.values())) for v, by_seed in by.items()} for recipe, by in runs.items()}
    c = manifest["counts"]
    print(f"\n{args.preset}, equal budgets: {args.epochs} epochs x batch {args.batch_size}, seeds {args.seeds}; "
          f"{c['products']} products (gallery = whole catalog), {c['street_queries']} street and "
          f"{c['reformulation_queries']} reformulation queries of held-out products")
    print("| recipe | model | seed | recall@1 | recall@10 | wrong category @1 | reform r@1 photo / photo + text "
          "| train s |")
    print("|" + "---|" * 8)
    for recipe, by in runs.items():
        for variant, by_seed in by.items():
            for seed, r in by_seed.items():
                print(_row(recipe, variant, str(seed), r))
            if len(by_seed) > 1:
                print(_row(recipe, variant, "mean", means[recipe][variant]))
    out = {"config": vars(args), "dataset": manifest, "runs": runs, "means": means, "verdicts": {}}
    print()
    for recipe, by in means.items():
        if set(by) == set(VARIANTS):
            out["verdicts"][recipe] = v = verdicts(by)
            print(_say(recipe, by, v, seeds))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(args.out)


if __name__ == "__main__":
    main()
