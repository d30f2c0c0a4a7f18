"""Retagged products (diff.py): a product whose filter columns alone changed keeps its
vectors. Its rows are copied from the part that holds them into a part of the refresh's
run whose catalog source is the product's new row, so the delta segment re-adds the same
vectors under new id-map rows and the embeddings remember the new values (the next diff
compares against them). No image is read and nothing is encoded.

    runs/<run>/input/retag-rows.parquet   the retagged products' catalog rows (write_subsets)
    runs/<run>/input/retag.parquet        the same rows without image bytes, a row group per retag part
    runs/<run>/retag-00003.parquet        one earlier part's retagged rows (and reject rows), copied
    runs/<run>/retag.json                 the parts' entries, written last: a resumed run reuses them

Memory: one earlier part at a time, and the retagged products' catalog rows (no images).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.pipelines.refresh import diff as diffs

ROWS = "input/retag-rows.parquet"
SOURCE = "input/retag.parquet"
DONE = "retag.json"


def write_parts(root: str, manifest: emb.EmbeddingsManifest, d: diffs.Diff, run_dir: str) -> list[emb.PartEntry]:
    """The retag parts of ``d``'s retagged products (entries relative to ``run_dir``)."""
    done = storage.join(run_dir, DONE)
    if storage.exists(done):
        return [emb.PartEntry.from_json(e) for e in storage.read_json(done)["parts"]]
    moved = d.table((diffs.RETAGGED,), ("product_id", "part"))
    rows = storage.parquet_dataset(storage.join(run_dir, ROWS)).to_table()
    rows = rows.drop_columns([c for c in ("image", "images") if c in rows.column_names])
    row_of = {pid: i for i, pid in enumerate(rows.column("product_id").to_pylist())}
    by_part: dict[str, list[str]] = {}
    for pid, part in zip(moved["product_id"].to_pylist(), moved["part"].to_pylist()):
        by_part.setdefault(part, []).append(pid)
    earlier = {e.name: e for e in manifest.parts}
    source = storage.join(run_dir, SOURCE)
    entries, row_group = [], 0
    with storage.open_write(source) as f:
        writer = pq.ParquetWriter(f, rows.schema, compression="zstd")
        for i, name in enumerate(sorted(by_part)):
            wanted = pa.array(sorted(by_part[name]), pa.string())
            entry = earlier[name]
            part = emb.read_part(root, entry, manifest.model, manifest.dtype)
            part = part.filter(pc.is_in(part["product_id"], wanted))
            rejects = emb.read_rejects(root, entry)
            rejects = rejects.filter(pc.fill_null(pc.is_in(rejects["product_id"], wanted), False))
            meta = rows.take(pa.array([row_of[p] for p in wanted.to_pylist() if p in row_of], pa.int64()))
            groups = ()
            if meta.num_rows:  # one row group per part, so its id-map rows read only theirs
                writer.write_table(meta, row_group_size=meta.num_rows)
                groups, row_group = (row_group,), row_group + 1
            retag = f"retag-{i:05d}"
            ref, rej, reasons = emb.write_part(run_dir, retag, part, rejects.to_pylist())
            entries.append(emb.PartEntry(name=retag, part=ref, rejects=rej, reject_reasons=reasons, unit=i,
                                         source=source, row_groups=groups, input_rows=len(wanted)))
        writer.close()
    storage.write_json(done, {"parts": [e.to_json() for e in entries]})
    return entries
