"""`mimdex synth-catalog`: write a synthetic street-to-shop dataset directory.

    <out>/catalog/part-00000.parquet ...     product_id, title, image (+ attributes)
    <out>/train_pairs/part-00000.parquet ... street photos of training products
    <out>/queries/part-00000.parquet ...     street photos of held-out products
    <out>/manifest.json                      written last: config, files, rows, sha256

Rows are rendered in an ordered process pool and streamed to Parquet a row group at a
time, so memory stays bounded by (workers x chunk) images whatever the catalog size.
The same config gives byte-identical files.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mimdex.infra import storage
from mimdex.infra.errors import UsageError
from mimdex.pipelines.report import StageTimer
from mimdex.pipelines.synth import rows
from mimdex.pipelines.synth.plan import Plan, SynthConfig, plan_catalog

MANIFEST = "manifest.json"
DATASET_KIND = "mimdex-synth-dataset/1"
TABLES = ("catalog", "train_pairs", "queries")

# Worker state, set once per worker process by _init_worker.
_W: dict = {}


def _init_worker(products, size) -> None:
    _W["products"] = products
    _W["by_id"] = {p.product_id: i for i, p in enumerate(products)}
    _W["size"] = size


def _materialize(spec: dict) -> dict:
    return rows.materialize(spec, _W["products"], _W["by_id"], _W["size"])


def _table_specs(plan: Plan, cfg: SynthConfig) -> dict[str, tuple[list[dict], pa.Schema]]:
    return {
        "catalog": (list(rows.catalog_specs(plan, cfg)), rows.catalog_schema(cfg.views)),
        "train_pairs": (list(rows.train_pair_specs(plan, cfg)), rows.QUERY_SCHEMA),
        "queries": (list(rows.query_specs(plan, cfg)), rows.QUERY_SCHEMA),
    }


def _write_table(out: str, name: str, schema: pa.Schema, rows_iter: Iterable[dict],
                 cfg: SynthConfig, on_row: Callable[[], None]) -> list[dict]:
    """Stream rows into part files of ``cfg.rows_per_file``; returns the file entries."""
    schema = schema.with_metadata({"mimdex.synth": json.dumps(cfg.as_dict(), sort_keys=True)})
    files: list[dict] = []
    it = iter(rows_iter)
    exhausted = False
    while not exhausted:
        rel = f"{name}/part-{len(files):05d}.parquet"
        n_rows = 0
        with storage.open_write(storage.join(out, rel)) as f:
            with pq.ParquetWriter(f, schema, compression="zstd") as writer:
                batch: list[dict] = []
                for row in it:
                    batch.append(row)
                    on_row()
                    if len(batch) == cfg.row_group_rows:
                        writer.write_table(pa.Table.from_pylist(batch, schema))
                        n_rows += len(batch)
                        batch = []
                    if n_rows + len(batch) == cfg.rows_per_file:
                        break
                else:
                    exhausted = True
                if batch:
                    writer.write_table(pa.Table.from_pylist(batch, schema))
                    n_rows += len(batch)
        if n_rows == 0 and files:
            storage.delete(storage.join(out, rel))  # the stream ended on a file boundary
            break
        files.append({"path": rel, "rows": n_rows, "sha256": f.sha256(), "bytes": f.bytes_written})
    return files


def _clear_partial(out: str) -> None:
    """Remove part files of an earlier run that never wrote its manifest."""
    for name in TABLES:
        for uri in storage.list_files(storage.join(out, name)) if storage.exists(storage.join(out, name)) else []:
            storage.delete(uri)


def run(cfg: SynthConfig, out: str, *, workers: int | None = None, progress: bool = True) -> dict:
    """Generate the dataset at ``out``; returns the job report (not yet written)."""
    cfg.validate()
    timer = StageTimer()
    manifest_uri = storage.join(out, MANIFEST)
    if storage.exists(manifest_uri):
        existing = storage.read_json(manifest_uri)
        if existing.get("config") == cfg.as_dict():
            return {"out": out, "skipped": True, "reason": "dataset with this config already complete",
                    "counts": existing["counts"], "manifest": manifest_uri}
        raise UsageError(f"{out} already holds a dataset made with other settings "
                         f"({existing.get('config')}); choose another --out or delete it")
    with timer.stage("plan"):
        _clear_partial(out)
        plan = plan_catalog(cfg)
        tables = _table_specs(plan, cfg)
    total = sum(len(specs) for specs, _ in tables.values())
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=total, desc="synth-catalog", unit="img", disable=not progress, mininterval=1.0)
    manifest_tables = {}
    ctx = mp.get_context("spawn")  # no fork: s3fs keeps an event-loop thread in this process
    with ctx.Pool(workers, initializer=_init_worker, initargs=(plan.products, cfg.image_size)) as pool:
        for name, (specs, schema) in tables.items():
            bar.set_postfix_str(name)
            with timer.stage(name):
                stream: Iterator[dict] = pool.imap(_materialize, specs, chunksize=8)
                files = _write_table(out, name, schema, stream, cfg, bar.update)
            manifest_tables[name] = {"rows": sum(f["rows"] for f in files), "files": files}
    bar.close()
    counts = {
        "products": len(plan.products),
        "train_products": len(plan.products) - len(plan.heldout),
        "heldout_products": len(plan.heldout),
        "train_pairs": manifest_tables["train_pairs"]["rows"],
        "queries": manifest_tables["queries"]["rows"],
    }
    manifest = {"kind": DATASET_KIND, "config": cfg.as_dict(), "counts": counts,
                "tables": manifest_tables}
    storage.write_json(manifest_uri, manifest)
    seconds = timer.total
    return {"out": out, "skipped": False, "counts": counts, "manifest": manifest_uri,
            "timings_s": timer.seconds, "images_per_s": round(total / max(seconds, 1e-9), 1),
            "workers": workers, "config": cfg.as_dict()}
