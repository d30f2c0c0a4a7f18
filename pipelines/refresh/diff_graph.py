"""The Beam graph of the refresh diff: a bucketed join of catalog states with the
embeddings' states by product_id (diff.py says what comes out).

    catalog units (row groups) --CatalogStates--> a sorted run per unit  --\
                                                                            GroupByKey(bucket) --JoinBucket--> bucket-N
    embeddings parts           --PreviousStates-> a sorted run per batch of parts --/

Each side writes its rows to a Parquet *run* (runs.py) with one row group per bucket and
passes on only (bucket, run, row group) references: the rows never go through the
runner's shuffle, so the DirectRunner holds references, not the catalog, and a join reads
exactly its bucket's row groups. Runs are kept for the next night (runs.py): a quiet night
writes none. A catalog unit compares its rows with its previous run and writes the rows
that moved whole (every column) to ``payload/``: the refresh's encode input, without a
second read of the catalog. Every output is written whole, with a JSON record under the
diff's directory that the driver counts (progress) and sums (report).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimdex.infra import storage
from mimdex.infra.contracts import attributes, catalog, fingerprint
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.files import column_bytes, parquet_metadata
from mimdex.infra.errors import DataError
from mimdex.pipelines import beam_runner
from mimdex.pipelines.refresh import runs
from mimdex.pipelines.refresh.diff import (ATTRS, CHANGES, PREV_SCHEMA, SHOWN_SCHEMA, STATE, STATE_RUNS,
                                           PAYLOAD_DIR, WORK_DIR,
                                           Diff, DiffSpec, bucket_count, bucket_of, classify, first_occurrences,
                                           shown_attrs)

_level = logging.root.manager.disable
logging.disable(logging.WARNING)  # Beam warns on import about optional GCP clients
import apache_beam as beam  # noqa: E402
logging.disable(_level)

CAT_SCHEMA = pa.schema([("product_id", pa.string()), STATE, ("order", pa.int64()), ATTRS])


@dataclass(frozen=True)
class CatalogUnit:
    index: int
    uri: str
    file_index: int
    row_groups: tuple[int, ...]
    first_row: int


def _record(spec: DiffSpec, name: str, obj: dict) -> None:
    storage.write_json(storage.join(spec.out, WORK_DIR, f"{name}.json"), obj)


class CatalogStates(beam.DoFn):
    """One catalog unit -> each row's product state (no image byte behind a URI is read)."""

    def __init__(self, spec: DiffSpec):
        self.spec = spec

    def process(self, unit: CatalogUnit):
        spec = self.spec
        # the unit's run as the previous night left it: rows that did not move since then
        # need no payload (and on a quiet night the run is not written again)
        kept = storage.join(spec.embeddings, STATE_RUNS, runs.cat_run_name(unit.index, spec.buckets))
        prior, present, prior_bytes = runs.read_run(kept) if storage.exists(kept) else (None, [], 0)
        table, cols, read = catalog.read_unit(unit.uri, list(unit.row_groups), spec.filter_columns,
                                              every_column=prior is not None)
        fp_col = fingerprint.column_of(table.column_names, cols.image)
        ids = table.column("product_id").to_pylist()
        titles = catalog.titles_as_bytes(table)
        images = table.column(cols.image).to_pylist()
        given = table.column(fp_col).to_pylist() if fp_col else [None] * len(ids)
        rows = [i for i, pid in enumerate(ids) if pid]
        helper: dict = {}  # the HEADs run on helper threads, which count their own
        states = fingerprint.row_states([ids[i] for i in rows], [titles[i] for i in rows],
                                        [images[i] for i in rows], [given[i] for i in rows], cols, fp_col,
                                        spec.catalog_root, spec.model_sha256, spec.fetch_threads, helper)
        order = (np.int64(unit.file_index) << 40) + unit.first_row + np.asarray(rows, np.int64)
        attrs = attributes.digest(table.take(pa.array(rows, pa.int64())), spec.filter_columns)
        out = pa.table([pa.array([ids[i] for i in rows], pa.string()), pa.array(fingerprint.digests(states)),
                        pa.array(order, pa.int64()), attrs], schema=CAT_SCHEMA)
        payload = 0
        if prior is not None:
            payload = _write_payload(spec, unit, table.take(pa.array(rows, pa.int64())), out, prior)
        out, groups = runs.by_bucket(spec, out)
        if prior is not None and prior.equals(out):
            refs, written = runs.refs_of("cat", kept, present), 0
        else:
            refs, written = runs.write_run(spec, kept, "cat", out, groups)
        _record(spec, f"cat-{unit.index:06d}", {"rows": len(ids), "empty_product_id": len(ids) - len(rows),
                                                "read_bytes": read, "image_read_bytes": helper.get("read_bytes", 0),
                                                "heads": helper.get("heads", 0), "lists": helper.get("lists", 0),
                                                "runs_read_bytes": prior_bytes, "written_bytes": written,
                                                "kept": written == 0, "payload_rows": payload})
        yield from refs


def _write_payload(spec: DiffSpec, unit: CatalogUnit, rows: pa.Table, out: pa.Table, prior: pa.Table) -> int:
    """The whole catalog rows (every column, and their order) whose (product_id, state,
    attrs) the unit's previous run does not hold: where tonight's changes are, so the
    refresh's encode input needs no second read of the catalog. Rows written."""
    def key(t: pa.Table) -> pa.Table:
        return pa.table([t["product_id"], t["state"], pc.fill_null(t["attrs"], 0)], names=["product_id", "state", "a"])

    mine = key(out).append_column("pos", pa.array(np.arange(out.num_rows), pa.int64()))
    moved = mine.join(key(prior), ["product_id", "state", "a"], join_type="left anti")
    pos = np.sort(moved.column("pos").to_numpy())
    if not len(pos):
        return 0
    picked = rows.take(pa.array(pos)).append_column("order", out.column("order").take(pa.array(pos)))
    uri = storage.join(spec.out, PAYLOAD_DIR, f"unit-{unit.index:06d}.parquet")
    with storage.open_write(uri) as f:
        pq.write_table(picked, f, compression="zstd")
    return len(pos)


class PreviousStates(beam.DoFn):
    """A batch of embeddings parts -> their products' states (state columns only, no vectors)."""

    def __init__(self, spec: DiffSpec):
        self.spec = spec

    def process(self, batch: tuple[emb.PartEntry, ...]):
        spec = self.spec

        def make():
            manifest = emb.EmbeddingsManifest(spec.model, spec.dtype, ())
            tables, read = [], 0
            for entry in batch:
                table, n = emb.previous_states(spec.embeddings, manifest, entry)
                tables.append(table)
                read += n
            table = pa.concat_tables(tables)
            digests = pa.array(fingerprint.digests(table.column("state").to_pylist()))
            return table.set_column(1, STATE, digests).cast(PREV_SCHEMA), read

        refs, record = runs.kept_run(spec, "prev", batch[0].name, [e.to_json() for e in batch], make)
        _record(spec, f"prev-{batch[0].name}", record)
        yield from refs


# Parts are read in batches of about a catalog unit's rows: a bucket's join reads a row
# group of every run, so one run per 2,048-row part made 4,883 x 64 reads at 10M
BATCH_ROWS = 262_144


def part_batches(parts: list[emb.PartEntry]) -> list[tuple[emb.PartEntry, ...]]:
    """Consecutive parts of about BATCH_ROWS rows: the same batches night after night
    (a refresh appends its parts), so their kept runs are found again."""
    out, batch, rows = [], [], 0
    for entry in parts:
        batch.append(entry)
        rows += (entry.part.rows or 0) + ((entry.rejects.rows or 0) if entry.rejects else 0)
        if rows >= BATCH_ROWS:
            out.append(tuple(batch))
            batch, rows = [], 0
    return out + ([tuple(batch)] if batch else [])


@dataclass(frozen=True)
class IdMap:
    """One id map of the previous index version: a base shard's (seq 0) or a delta
    segment's (seq 1, 2, ... in the manifest's order)."""

    version_dir: str
    entry: iv.ShardEntry
    seq: int

    def run_key(self, filter_columns: tuple[str, ...]) -> tuple[str, list]:
        """(name, what its kept run is made from): the id map's content, place and columns."""
        return f"{self.seq:05d}-{self.entry.name}", [self.entry.ids.sha256, self.seq, list(filter_columns)]


class ShownAttrs(beam.DoFn):
    """One id map -> the attrs of each product it holds (product_id and the filter
    columns only): what a filter sees today."""

    def __init__(self, spec: DiffSpec):
        self.spec = spec

    def process(self, ref: IdMap):
        spec = self.spec

        def make():
            table, read = iv.idmap_columns(ref.version_dir, ref.entry, ["product_id", *spec.filter_columns])
            return pa.table([table.column("product_id"), attributes.digest(table, spec.filter_columns),
                             pa.array(np.full(table.num_rows, ref.seq, np.int32))], schema=SHOWN_SCHEMA), read

        name, made_from = ref.run_key(spec.filter_columns)
        refs, record = runs.kept_run(spec, "shown", name, made_from, make)
        _record(spec, f"shown-{name}", record)
        yield from refs


class JoinBucket(beam.DoFn):
    def __init__(self, spec: DiffSpec):
        self.spec = spec

    def process(self, element):
        bucket, refs = element
        spec, read = self.spec, 0
        sides: dict[str, list[pa.Table]] = {"cat": [], "prev": [], "shown": []}
        for ref in sorted(refs, key=lambda r: (r.side, r.uri, r.row_group)):
            with storage.open_read(ref.uri) as f:
                pf = pq.ParquetFile(f)
                sides[ref.side].append(pf.read_row_group(ref.row_group))
                read += column_bytes(pf.metadata, [ref.row_group], pf.schema_arrow.names)
        cat = pa.concat_tables(sides["cat"]) if sides["cat"] else CAT_SCHEMA.empty_table()
        prev = pa.concat_tables(sides["prev"]) if sides["prev"] else PREV_SCHEMA.empty_table()
        prev = shown_attrs(prev, pa.concat_tables(sides["shown"]) if sides["shown"] else SHOWN_SCHEMA.empty_table())
        cat, duplicates = first_occurrences(cat)
        forced = None
        if spec.forced:
            forced = {p for p, b in zip(spec.forced, bucket_of(list(spec.forced), spec.buckets)) if b == bucket}
        out, counts = classify(cat, prev, forced)
        name = f"bucket-{bucket:05d}"
        storage.write_bytes(storage.join(spec.out, f"{name}.parquet"), _parquet(out))
        counts.update(duplicates=duplicates, read_bytes=read)
        storage.write_json(storage.join(spec.out, f"{name}.json"), counts)
        _record(spec, f"join-{bucket:05d}", {"bucket": bucket})  # progress for the stall watch
        yield bucket


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def build_pipeline(p: beam.Pipeline, spec: DiffSpec, units: list[CatalogUnit],
                   batches: list[tuple[emb.PartEntry, ...]],
                   idmaps: list[IdMap] = ()) -> None:
    cat = p | "CatalogUnits" >> beam.Create(units, reshuffle=True) | "CatalogStates" >> beam.ParDo(CatalogStates(spec))
    sides = [cat]
    if batches:
        sides.append(p | "Parts" >> beam.Create(batches, reshuffle=True) | "PreviousStates" >> beam.ParDo(
            PreviousStates(spec)))
    if idmaps:
        sides.append(p | "IdMaps" >> beam.Create(list(idmaps), reshuffle=True) | "ShownAttrs" >> beam.ParDo(
            ShownAttrs(spec)))
    (sides | "Runs" >> beam.Flatten()
     | "GroupByBucket" >> beam.GroupByKey()
     | "SpreadBuckets" >> beam.Reshuffle()   # as build-index's SpreadShards: keys may hash to one worker
     | "JoinBucket" >> beam.ParDo(JoinBucket(spec)))


UNIT_ROWS = 262_144   # catalog rows per CatalogStates element (whole row groups)


def catalog_units(catalog_uri: str) -> tuple[list[CatalogUnit], str, int]:
    """The catalog cut into units of whole row groups, from the files' footers alone;
    (units, the root image_uris resolve against, rows). Files that disagree on the image
    column are exit 65, naming them."""
    files, root = catalog.catalog_files(catalog_uri)
    units: list[CatalogUnit] = []
    kinds, rows = {}, 0
    for fi, uri in enumerate(files):
        meta = parquet_metadata(uri, "catalog")
        kinds[uri] = catalog.check_schema(uri, meta.schema.to_arrow_schema()).image
        group, start, n = [], 0, 0
        for rg in range(meta.num_row_groups):
            group.append(rg)
            n += meta.row_group(rg).num_rows
            if n >= UNIT_ROWS or rg == meta.num_row_groups - 1:
                units.append(CatalogUnit(len(units), uri, fi, tuple(group), start))
                group, start, n = [], start + n, 0
        rows += meta.num_rows
    if len(set(kinds.values())) > 1:
        raise DataError(f"catalog {catalog_uri}: files disagree on the image column: "
                        + "; ".join(f"{u}: {k}" for u, k in kinds.items()))
    return units, root, rows


def run_diff(catalog_uri: str, model_sha256: str, embeddings: str, previous: emb.EmbeddingsManifest | None,
             out: str, forced: tuple[str, ...] = (), beam_args: list[str] | None = None,
             stall_timeout: float = 900.0, buckets: int | None = None,
             filter_columns: tuple[str, ...] = (), index: tuple[str, iv.IndexManifest] | None = None
             ) -> tuple[Diff, dict]:
    """Run the diff into ``out``; (its result, what it read: rows, bytes, HEADs, buckets).
    ``buckets`` overrides the count bucket_count chooses (tests: many small buckets);
    ``filter_columns`` and ``index`` (its root and the version the embeddings are in): the
    attrs compared, catalog against that version's id maps (retagged products)."""
    units, root, rows = catalog_units(catalog_uri)
    parts = list(previous.parts) if previous else []
    idmaps = []
    if filter_columns and index is not None and previous is not None:
        vdir = iv.version_uri(index[0], index[1].version)
        idmaps = ([IdMap(vdir, s, 0) for s in index[1].shards]
                  + [IdMap(vdir, s, i + 1) for i, seg in enumerate(index[1].deltas) for s in seg.shards])
    prev_rows = (previous.counts.get("encoded", 0) + previous.counts.get("rejected", 0)) if previous else 0
    spec = DiffSpec(root, model_sha256, embeddings, previous.model if previous else None,
                    previous.dtype if previous else "float16", out, buckets or bucket_count(rows, prev_rows), tuple(forced),
                    filter_columns=tuple(filter_columns))
    work = storage.join(out, WORK_DIR)
    batches = part_batches(parts)
    beam_runner.run(lambda p: build_pipeline(p, spec, units, batches, idmaps), list(beam_args or []), work,
                    len(units) + len(batches) + len(idmaps), stall_timeout, f"the diff in {out} is incomplete; re-run the refresh")
    records = {u.rsplit("/", 1)[-1]: storage.read_json(u) for u in storage.list_files(work, ".json")}
    buckets = [storage.read_json(u) for u in storage.list_files(out, ".json")]
    counts = {k: sum(b.get(k, 0) for b in buckets) for k in (*CHANGES, "unchanged", "still_rejected")}
    cat = [r for name, r in records.items() if name.startswith("cat-")]
    counts["row_only_rejects"] = sum(r["empty_product_id"] for r in cat) + sum(b["duplicates"] for b in buckets)
    read = {"catalog_rows": sum(r["rows"] for r in cat),
            "catalog_bytes": sum(r["read_bytes"] for r in cat),
            "image_bytes": sum(r["image_read_bytes"] for r in cat),
            "image_heads": sum(r["heads"] for r in cat),
            "image_lists": sum(r["lists"] for r in cat),
            "embeddings_rows": sum(r["rows"] for name, r in records.items() if name.startswith("prev-")),
            "embeddings_bytes": sum(r.get("read_bytes", 0) for name, r in records.items() if name.startswith("prev-")),
            "idmap_bytes": sum(r.get("read_bytes", 0) for name, r in records.items() if name.startswith("shown-")),
            "bucket_bytes": sum(b["read_bytes"] for b in buckets),
            # what this diff wrote besides its output: the catalog side's runs (deleted now)
            # and the previous side's runs it did not find kept
            "runs_written_bytes": sum(r.get("written_bytes", 0) for r in records.values()),
            "runs_kept": {side: sum(1 for name, r in records.items() if name.startswith(side + "-") and r.get("kept"))
                          for side in ("cat", "prev", "shown")},
            "runs_read_bytes": sum(r.get("runs_read_bytes", 0) for r in cat),
            "payload_rows": sum(r.get("payload_rows", 0) for r in cat),
            "buckets": spec.buckets, "units": len(units), "parts": len(parts),
            "part_batches": len(batches), "idmaps": len(idmaps)}
    storage.delete(work, recursive=True)
    _forget_runs(spec, len(units), batches, idmaps)
    return Diff(out, counts), read


def _forget_runs(spec: DiffSpec, units: int, batches: list[tuple[emb.PartEntry, ...]], idmaps: list[IdMap]
                 ) -> None:
    """Delete the kept runs this diff did not use: those of superseded deletion files,
    compacted id maps, an older bucket count, catalog units past the catalog's end."""
    where = storage.join(spec.embeddings, STATE_RUNS)
    if not storage.exists(where):
        return
    used = {runs.kept_run_name("prev", b[0].name, [e.to_json() for e in b], spec.buckets) for b in batches}
    used |= {runs.cat_run_name(u, spec.buckets) for u in range(units)}
    used |= {runs.kept_run_name("shown", *m.run_key(spec.filter_columns), spec.buckets) for m in idmaps}
    for uri in storage.list_files(where, ".parquet"):
        if uri.rsplit("/", 1)[-1] not in used:
            storage.delete(uri)
