"""What changed between the catalog and the current embeddings, bucket by bucket.

Each product (the first catalog row of a product_id) has a state (contracts.fingerprint:
the content hash of inline bytes, or the fingerprint of an image behind a URI, with the
title and model), or ``reject:<reason>`` when the row itself breaks a rule. The
embeddings remember the state of every product they encoded and of every product encode
rejected (contracts.embeddings.previous_states), so an unchanged bad row stays rejected.
Where the index has filter columns, the catalog side also has an ``attrs`` digest of their
values (contracts.attributes), and a third side reads the same digest from the previous
index version's id maps (what search filters on today: a product's row in the newest id
map that holds it). An encoded product whose state held but whose digest moved is
*retagged* (its vectors are copied, not re-encoded, under its new catalog row).

The diff is a Beam job (diff_graph.py): both sides are cut into buckets by a hash of the
product_id, and each bucket is joined on its own with pyarrow (``classify``, pure). Its
output, under ``<embeddings>/diffs/<id>/``, is the delta and nothing else:

    bucket-00007.parquet   product_id, change, part, state, attrs, vectors, order   (by product_id)
    bucket-00007.json      the bucket's counts
    payload/unit-000042.parquet   whole catalog rows that moved since the unit's previous run

so no process ever holds more than a bucket, and the refresh reads only the changes.
States travel as 8-byte digests (fingerprint.digests); the runs are kept between nights
(runs.py), so a quiet night writes none.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mimdex.infra import storage
from mimdex.infra.contracts.duplicates import first_in_order
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.contracts.vectors import ids_for

NEW, CHANGED, REJUDGED, DELETED, FORGOTTEN = "new", "changed", "rejudged", "deleted", "forgotten"
RETAGGED = "retagged"   # same state, filter columns changed: vectors copied, id-map row replaced
CHANGES = (NEW, CHANGED, REJUDGED, DELETED, FORGOTTEN, RETAGGED)
TO_ENCODE = (NEW, CHANGED, REJUDGED)
SUPERSEDED = (CHANGED, REJUDGED, DELETED, FORGOTTEN, RETAGGED)   # their earlier part or reject row no longer stands
REMOVED_FROM_INDEX = (CHANGED, DELETED, RETAGGED)               # their earlier vectors leave the index
ATTRS = pa.field("attrs", pa.int64())   # contracts.attributes.digest; null where the index has no filter columns
STATE = pa.field("state", pa.int64())   # fingerprint.digests of the state
VECTORS = pa.field("vectors", pa.int32())   # a product's rows in its part (encoded photos): what leaves the index
ORDER = pa.field("order", pa.int64())   # a catalog row's place: file index << 40 | row (its first occurrence)
OUT_SCHEMA = pa.schema([("product_id", pa.string()), ("change", pa.string()), ("part", pa.string()), STATE, ATTRS,
                        VECTORS, ORDER])
PREV_SCHEMA = pa.schema([("product_id", pa.string()), STATE, ("encoded", pa.bool_()), ("part", pa.string()), VECTORS])
RUN_FORMAT = 2   # in a kept run's name: runs of another layout are not read
ROWS_PER_BUCKET = 250_000   # at most what one join holds: ~20 MB of ids and digests, whatever the catalog size
WORK_DIR = "_work"          # the diff's progress records, deleted when the diff is done
PAYLOAD_DIR = "payload"     # catalog rows that moved since the previous night's runs, whole
STATE_RUNS = "state_runs"   # the previous side's runs, kept beside the embeddings for the next night


SHOWN_SCHEMA = pa.schema([("product_id", pa.string()), ATTRS, ("seq", pa.int32())])  # seq: base 0, then deltas


@dataclass(frozen=True)
class DiffSpec:
    """What the diff's DoFns are handed (pickled once per worker)."""

    catalog_root: str                 # image_uris resolve against it
    model_sha256: str
    embeddings: str                   # the embeddings root (its parts' entries are the elements)
    model: ModelRef | None            # the current embeddings' model and dtype (None: a first run)
    dtype: str
    out: str                          # <embeddings>/diffs/<id>
    buckets: int
    forced: tuple[str, ...] = ()      # a backfill: exactly these products, whatever their state
    fetch_threads: int = 16
    filter_columns: tuple[str, ...] = ()   # the index's (contracts.attributes): compared as ``attrs``


def bucket_count(catalog_rows: int, previous_rows: int) -> int:
    """A power of two: a growing catalog changes the count (and so every kept run) only
    when it doubles, not every ROWS_PER_BUCKET rows."""
    need = max(1, math.ceil(max(catalog_rows, previous_rows) / ROWS_PER_BUCKET))
    return 1 << (need - 1).bit_length()


def bucket_of(product_ids: list[str], buckets: int) -> np.ndarray:
    """The bucket of each product_id: its int64 id (contracts.vectors) modulo the count."""
    return ids_for(product_ids) % buckets


def first_occurrences(cat: pa.Table) -> tuple[pa.Table, int]:
    """(product_id, state, attrs, order) of each product's first row in catalog order
    (``order``), and how many later rows repeat a product_id (rejected as duplicate_product_id)."""
    if not cat.num_rows:
        return cat.select(["product_id", "state", "attrs", "order"]), 0
    cat, first = first_in_order(cat, "product_id", [("order", "ascending")])
    return cat.filter(pa.array(first)).select(["product_id", "state", "attrs", "order"]), int((~first).sum())


def shown_attrs(prev: pa.Table, shown: pa.Table) -> pa.Table:
    """PREVIOUS_SCHEMA rows with each product's attrs as the index shows them (SHOWN_SCHEMA
    rows: the newest id map holding the product wins); null for a product it does not hold."""
    if not shown.num_rows:
        return prev.append_column(ATTRS, pa.nulls(prev.num_rows, pa.int64()))
    shown, newest = first_in_order(shown, "product_id", [("seq", "descending")])
    latest = shown.filter(pa.array(newest)).select(["product_id", "attrs"])
    return prev.join(latest, "product_id", join_type="left outer").select([*prev.column_names, "attrs"])


def classify(cat: pa.Table, prev: pa.Table, forced: set[str] | None = None) -> tuple[pa.Table, dict]:
    """One bucket's join: catalog (product_id, state, attrs), one row per product, against
    the embeddings' PREVIOUS_SCHEMA rows with the attrs the index shows (shown_attrs) ->
    (OUT_SCHEMA rows of the changes, counts).

    A backfill (``forced``) re-encodes exactly the forced products found in the catalog
    (new, changed or rejudged by what the embeddings say of them) and nothing else."""
    prev = prev.rename_columns(["product_id", "prev_state", "encoded", "part", "vectors", "prev_attrs"])
    j = cat.join(prev, "product_id", join_type="full outer").sort_by("product_id")
    state, prev_state = j["state"], j["prev_state"]
    in_cat = pc.is_valid(state).to_numpy(zero_copy_only=False)
    in_prev = pc.is_valid(prev_state).to_numpy(zero_copy_only=False)
    encoded = pc.fill_null(j["encoded"], False).to_numpy(zero_copy_only=False)
    same = pc.fill_null(pc.equal(state, prev_state), False).to_numpy(zero_copy_only=False)
    # both known and different (a product the index does not hold, a skipped vector, has no shown attrs)
    moved = pc.fill_null(pc.not_equal(j["attrs"], j["prev_attrs"]), False).to_numpy(zero_copy_only=False)
    change = np.full(j.num_rows, "", dtype=object)
    if forced is None:
        change[in_cat & ~in_prev] = NEW
        change[in_cat & in_prev & ~same] = np.where(encoded, CHANGED, REJUDGED)[in_cat & in_prev & ~same]
        change[~in_cat & in_prev] = np.where(encoded, DELETED, FORGOTTEN)[~in_cat & in_prev]
        change[in_cat & same & encoded & moved] = RETAGGED
        counts = {"unchanged": int((in_cat & same & encoded & ~moved).sum()),
                  "still_rejected": int((in_cat & same & ~encoded).sum())}
    else:
        pick = in_cat & pc.is_in(j["product_id"], pa.array(sorted(forced), pa.string())).to_numpy(
            zero_copy_only=False)
        change[pick & ~in_prev] = NEW
        change[pick & in_prev] = np.where(encoded, CHANGED, REJUDGED)[pick & in_prev]
        counts = {"unchanged": int((encoded & ~pick).sum()), "still_rejected": 0}
    for name in CHANGES:
        counts[name] = int((change == name).sum())
    keep = pa.array(change != "")
    out = pa.table([j["product_id"], pa.array(change, pa.string()), j["part"], state, j["attrs"], j["vectors"],
                    j["order"]], schema=OUT_SCHEMA).filter(keep)
    return out, counts


@dataclass(frozen=True)
class Diff:
    """The diff's output directory and its summed counts; the changes themselves stay
    on storage and are read by kind, as Arrow (never a Python object per product)."""

    out: str
    counts: dict

    @property
    def empty(self) -> bool:
        return not any(self.counts.get(c, 0) for c in CHANGES)

    def n(self, *changes: str) -> int:
        return sum(self.counts.get(c, 0) for c in changes)

    def table(self, changes: tuple[str, ...], columns=("product_id",)) -> pa.Table:
        files = storage.list_files(self.out, ".parquet")
        if not files:
            return OUT_SCHEMA.empty_table().select(list(columns))
        return storage.parquet_dataset(files, schema=OUT_SCHEMA).to_table(
            columns=list(columns), filter=pc.field("change").isin(list(changes)))

    def ids(self, *changes: str) -> pa.Array:
        return self.table(changes).column("product_id").combine_chunks()

    def payload(self, *changes: str) -> pa.Table | None:
        """The catalog rows of these changes that the diff kept whole (each product's first
        row, matched by its order), with the catalog's columns; None without any. The rest
        (rows that had not moved since the previous night's runs: a backfill's, or after a
        failed night) are read from the catalog."""
        where = storage.join(self.out, PAYLOAD_DIR)
        files = storage.list_files(where, ".parquet") if storage.exists(where) else []
        if not files:
            return None
        want = self.table(changes, ("product_id", "order"))
        rows = pa.concat_tables([storage.parquet_dataset(u).to_table() for u in files], promote_options="permissive")
        # matched on the keys alone: Arrow joins carry no list columns (image_uris)
        at = rows.select(["product_id", "order"]).append_column("row", pa.array(np.arange(rows.num_rows)))
        hit = np.sort(at.join(want, ["product_id", "order"], join_type="inner").column("row").to_numpy())
        return rows.take(pa.array(hit, pa.int64())).drop_columns(["order"])

    def summary(self) -> dict:
        """The report's view: new, changed, rejudged, deleted, forgotten_rejects, unchanged, ..."""
        out = {c: self.counts.get(c, 0) for c in (NEW, CHANGED, REJUDGED, DELETED, RETAGGED)}
        out["forgotten_rejects"] = self.counts.get(FORGOTTEN, 0)
        for name in ("unchanged", "still_rejected", "row_only_rejects"):
            out[name] = self.counts.get(name, 0)
        return out

    def digest(self, salt: str) -> str:
        """A hash of ``salt`` (the model's sha256, and the filter columns) and what is to be
        encoded or retagged (product, state and filter values), bucket by bucket: the name
        of the refresh run, so a re-run of the same change resumes the same run."""
        h = hashlib.sha256(salt.encode())
        for uri in storage.list_files(self.out, ".parquet"):
            t = storage.parquet_dataset(uri, schema=OUT_SCHEMA).to_table(
                columns=["product_id", "state", "attrs"], filter=pc.field("change").isin([*TO_ENCODE, RETAGGED]))
            for pid, st, at in zip(*(t[c].to_pylist() for c in ("product_id", "state", "attrs"))):
                h.update((f"{pid}\t{st}\n" if at is None else f"{pid}\t{st}\t{at}\n").encode())
        return h.hexdigest()[:12]
