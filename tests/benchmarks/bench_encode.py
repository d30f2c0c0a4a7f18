"""Encode pipeline throughput versus its two stages run bare, on the same machine.

    .venv/bin/python tests/benchmarks/bench_encode.py [--products 6000] [--workdir DIR]

Three numbers, same catalog, same model, same thread counts:
  * model capacity: the bare forward (image + title towers) on pre-decoded uint8 pixels
    and token ids in one process, torch threads = the encoder actor's CPUs;
  * decode capacity: decode_unit (read row groups, decode, resize, tokenise) run bare
    in as many processes as the pipeline has decode slots;
  * the pipeline: `mimdex encode` on an embedded local Ray with that split, products/s
    over the encode stage (Ray start-up reported separately).

Goal (issue "Ray batch-encoding pipeline"): pipeline >= 0.9 x min(decode, model).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from mimdex.encoders.bundle import load_bundle, save_untrained_bundle
from mimdex.encoders.inference import embed_images, embed_texts
from mimdex.infra import storage
from mimdex.pipelines.encode.config import DecodeSpec, EncodeConfig
from mimdex.pipelines.encode.decode import decode_unit
from mimdex.pipelines.encode import run
from mimdex.pipelines.encode.plan import plan_units
from mimdex.pipelines import synth
from mimdex.pipelines.synth import SynthConfig


def _spec(model_uri: str, facts: dict) -> DecodeSpec:
    enc = load_bundle(model_uri)
    return DecodeSpec(image_size=enc.cfg.image.image_size, has_text=enc.model.has_text,
                      tokenizer_json=enc.tokenizer.to_str(), context_length=enc.cfg.text.context_length,
                      model_sha256=enc.sha256, catalog_root=facts["root"], image_column=facts["image_column"],
                      jpeg_draft=enc.cfg.image.jpeg_draft)


def _decode_all(args):
    spec, units = args
    return [decode_unit(spec, u) for u in units]


def decode_capacity(spec: DecodeSpec, units: list, processes: int) -> tuple[float, list]:
    chunks = [(spec, units[i::processes]) for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_decode_all, [(spec, units[:1])] * processes))  # warm the workers' imports
        t0 = time.perf_counter()
        out = [r for chunk in pool.map(_decode_all, chunks) for r in chunk]
        seconds = time.perf_counter() - t0
    return sum(len(m.product_ids) for m, _ in out) / seconds, out


def model_capacity(model_uri: str, decoded: list, threads: int, batch: int) -> float:
    torch.set_num_threads(threads)
    model = load_bundle(model_uri).model
    pixels = np.concatenate([t["pixels"] for _, t in decoded])
    width = max(t["ids"].shape[1] for _, t in decoded)  # each unit is padded to its longest title
    ids = np.concatenate([np.pad(t["ids"], ((0, 0), (0, width - t["ids"].shape[1]))) for _, t in decoded])
    mask = np.concatenate([np.pad(t["mask"], ((0, 0), (0, width - t["mask"].shape[1]))) for _, t in decoded])
    embed_images(model, pixels[:batch], batch)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(pixels), 2048):  # unit-sized calls, as an actor makes them
        embed_images(model, pixels[i:i + 2048], batch)
        embed_texts(model, ids[i:i + 2048], mask[i:i + 2048], batch * 4)
    return len(pixels) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-output/encode")
    ap.add_argument("--products", type=int, default=6000)
    ap.add_argument("--unit-rows", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    work = os.path.abspath(args.workdir)
    data, model = os.path.join(work, "data"), os.path.join(work, "model")
    synth.run(SynthConfig(products=args.products, queries=20, seed=11), data, progress=False)
    catalog = os.path.join(data, "catalog")
    if not storage.exists(os.path.join(model, "config.json")):
        titles = storage.parquet_dataset(catalog).to_table(columns=["title"]).column("title").to_pylist()
        save_untrained_bundle(model, titles, "3-tower")
    cpus = os.cpu_count()
    actor_threads = max(1, cpus // 2)
    decode_slots = max(1, cpus - actor_threads)
    units, facts = plan_units(catalog, args.unit_rows)
    spec = _spec(model, facts)

    decode_rate, decoded = decode_capacity(spec, units, decode_slots)
    model_rate = model_capacity(model, decoded, actor_threads, args.batch_size)
    decode_all_cores, _ = decode_capacity(spec, units, cpus)
    model_all_cores = model_capacity(model, decoded, cpus, args.batch_size)

    out = os.path.join(work, "emb")
    if storage.exists(out):
        storage.delete(out, recursive=True)
    t0 = time.perf_counter()
    report = run(EncodeConfig(model=model, catalog=catalog, out=out, unit_rows=args.unit_rows,
                              batch_size=args.batch_size, encoder_cpus=actor_threads, progress=False)).report
    wall = time.perf_counter() - t0
    pipeline = report["products_per_s"]
    bound = min(decode_rate, model_rate)
    results = {
        "machine": {"cpus": cpus, "torch": torch.__version__},
        "catalog": {"products": report["counts"]["encoded"], "units": report["plan"]["units"],
                    "unit_rows": args.unit_rows, "image_px": 160, "model_px": spec.image_size},
        "split": {"encoder_actor_threads": actor_threads, "decode_slots": decode_slots},
        "products_per_s": {"model_bare": round(model_rate, 1), "decode_bare": round(decode_rate, 1),
                           "pipeline": pipeline, "model_bare_all_cores": round(model_all_cores, 1),
                           "decode_bare_all_cores": round(decode_all_cores, 1),
                           "pipeline_end_to_end": round(report["counts"]["encoded"] / wall, 1)},
        "ratios": {"pipeline / model": round(pipeline / model_rate, 3),
                   "pipeline / decode": round(pipeline / decode_rate, 3),
                   "pipeline / min(decode, model)": round(pipeline / bound, 3), "goal": 0.9},
        "pipeline_seconds": report["seconds"], "task_seconds": report["task_seconds"],
    }
    storage.write_json(os.path.join(work, "results.json"), results)
    p = results["products_per_s"]
    print(f"\nencode throughput, {cpus} CPUs: encoder actor {actor_threads} thread(s), {decode_slots} decode slot(s); "
          f"{results['catalog']['products']} products in {results['catalog']['units']} units")
    print(f"{'':34}{'products/s':>12}{'pipeline ratio':>16}")
    print(f"{'model forward, bare (same threads)':34}{p['model_bare']:>12.0f}{pipeline / model_rate:>16.2f}")
    print(f"{'decode, bare (same processes)':34}{p['decode_bare']:>12.0f}{pipeline / decode_rate:>16.2f}")
    print(f"{'pipeline (encode stage)':34}{pipeline:>12.0f}{pipeline / bound:>16.2f}   "
          f"goal >= 0.9 x min -> {'MET' if pipeline >= 0.9 * bound else 'MISSED'}")
    print(f"{'pipeline incl. Ray start':34}{p['pipeline_end_to_end']:>12.0f}")
    print(f"{'model forward, all cores':34}{p['model_bare_all_cores']:>12.0f}")
    print(f"{'decode, all cores':34}{p['decode_bare_all_cores']:>12.0f}")
    print("task seconds (summed over units):", json.dumps(results["task_seconds"]))
    print(os.path.join(work, "results.json"))


if __name__ == "__main__":
    main()
