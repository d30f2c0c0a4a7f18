"""What a night of filter-column changes costs against a night of the same number of
re-encodes (docs/benchmarks.md, "Filter columns in the nightly refresh").

    .venv/bin/python tests/benchmarks/bench_retag.py [--products 5000] [--share 0.01]

A synth catalog (inline JPEGs) with an ``in_stock`` column, the untrained tiny 3-tower,
a local Ray and the DirectRunner, on local disk under a temporary directory removed at
the end. A first refresh with ``--filter-columns category,in_stock`` encodes and builds
everything; then, on two copies of that state, one night sets ``in_stock=false`` on
--share of the products (retagged: nothing encoded), the other retitles the same
products (re-encoded). Each night's refresh is timed whole, with its report's diff
counts, rows encoded, bytes the diff read (the id maps' filter columns included) and
bytes written (encode, retag parts, index version). Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _write(path: str, table: pa.Table) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=5000)
    ap.add_argument("--share", type=float, default=0.01)
    ap.add_argument("--out", default="bench-output/retag.json")
    args = ap.parse_args()

    import ray

    from mimdex.encoders.bundle import save_untrained_bundle
    from mimdex.infra import storage
    from mimdex.pipelines import synth
    from mimdex.pipelines.encode.job import loopback_only
    from mimdex.pipelines.refresh import RefreshConfig, run

    tmp = tempfile.mkdtemp(prefix="mimdex-bench-retag-")
    try:
        synth.run(synth.SynthConfig(products=args.products, queries=2, seed=3), tmp + "/synth", workers=2,
                  progress=False)
        table = storage.parquet_dataset(tmp + "/synth/catalog").to_table()
        table = table.append_column("in_stock", pa.array(np.ones(table.num_rows, bool)))
        save_untrained_bundle(tmp + "/model", table.column("title").to_pylist(), "3-tower", "tiny", 0)
        with loopback_only():
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        base = RefreshConfig(catalog=tmp + "/base/cat", model=tmp + "/model", embeddings=tmp + "/base/emb",
                             index=tmp + "/base/index", shards=4, progress=False, eval_queries=500,
                             filter_columns=("category", "in_stock"))
        _write(tmp + "/base/cat/catalog.parquet", table)
        t0 = time.perf_counter()
        first = run(base)
        out = {"products": args.products, "share": args.share, "cpus": os.cpu_count(),
               "first_refresh_s": round(time.perf_counter() - t0, 1),
               "first_index_files_bytes": first["io"].get("index_files_bytes")}
        pick = np.random.default_rng(0).permutation(table.num_rows)[:max(1, int(args.share * table.num_rows))]
        flagged = np.zeros(table.num_rows, bool)
        flagged[pick] = True
        nights = {
            "out_of_stock": table.set_column(table.schema.get_field_index("in_stock"), "in_stock",
                                             pa.array(~flagged)),
            "retitled": table.set_column(table.schema.get_field_index("title"), "title", pa.array(
                [t + " (new edition)" if f else t for t, f in zip(table.column("title").to_pylist(), flagged)])),
        }
        for name, changed in nights.items():
            shutil.copytree(tmp + "/base", f"{tmp}/{name}")
            cfg = replace(base, catalog=f"{tmp}/{name}/cat", embeddings=f"{tmp}/{name}/emb",
                          index=f"{tmp}/{name}/index", filter_columns=None)
            _write(f"{tmp}/{name}/cat/catalog.parquet", changed)
            t0 = time.perf_counter()
            report = run(cfg)
            io = report["io"]
            out[name] = {"seconds": round(time.perf_counter() - t0, 1), "stages": report["seconds"],
                         "diff": {k: v for k, v in report["diff"].items() if v},
                         "rows_encoded": report["encode"]["rows"], "retag": report.get("retag"),
                         "diff_read": {k: report["read"][k] for k in ("catalog_bytes", "embeddings_bytes",
                                                                      "idmap_bytes", "image_bytes")},
                         "written": {"encode": io.get("encode_written_bytes", 0),
                                     "retag": io.get("retag_written_bytes", 0),
                                     "index": io.get("index_written_bytes"),
                                     "process_total": io.get("written_bytes")},
                         "decision": report["decision"][:60]}
            print(f"{name}: {out[name]['seconds']} s, {out[name]['rows_encoded']} rows encoded, "
                  f"diff {out[name]['diff']}, written {out[name]['written']}", flush=True)
        a, b = out["out_of_stock"], out["retitled"]
        out["ratio_seconds"] = round(a["seconds"] / b["seconds"], 3)
        out["ratio_encode_stage"] = round(a["stages"].get("encode", 0) / max(b["stages"].get("encode", 1e-9), 1e-9), 3)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
