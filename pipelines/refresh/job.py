"""The refresh / backfill driver (DESIGN.md, "refresh", "backfill").

    lock -> diff -> delta encode (Ray) -> composite embeddings manifest
         -> next index version (incremental, or a full build when drift says retrain)
         -> LATEST (conditional) -> current embeddings manifest -> retention -> unlock

The current embeddings manifest (EMB_ROOT/manifest.json) is replaced only after the
index version is published, so a refresh killed at any point is redone by the next run:
its delta encode (in a run directory named after the diff) resumes from its committed
units, and re-applying a change to an index that already has it is a no-op.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimdex.encoders.bundle import load_bundle
from mimdex.indexing import publish, versions
from mimdex.indexing.publish import read_checked
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.infra.errors import DataError, TransientError, UsageError
from mimdex.infra.lock import Lease
from mimdex.pipelines.build_index import job as build_job
from mimdex.pipelines.build_index.graph import BuildSpec
from mimdex.pipelines.encode import job as encode_job
from mimdex.pipelines.encode import shards
from mimdex.pipelines.encode.config import EncodeConfig
from mimdex.pipelines.encode.decode import resolve_uri
from mimdex.pipelines.encode.plan import catalog_files
from mimdex.pipelines.refresh import diff as diffs
from mimdex.pipelines.refresh import update
from mimdex.pipelines.report import StageTimer


@dataclass(frozen=True)
class RefreshConfig:
    catalog: str
    model: str
    embeddings: str
    index: str
    ids_file: str | None = None      # backfill: encode and index exactly these products
    shards: int = 4                  # for a first build; later versions keep the previous count
    vector: str = "image"
    max_drift: float = 1.25          # retrain when new vectors' coarse MSE > this x the training MSE
    max_change: float = 0.25         # ... or when this share of the catalog was added/changed/deleted
    max_recall_drop: float = 0.05    # ... or when new vectors find themselves this much less often than old ones
    keep: int = 5                    # retention after publishing
    grace_hours: float = 24.0
    lock_ttl_hours: float = 6.0
    eval_queries: int = 1000
    recall_target: float = 0.95
    min_recall: float | None = None
    ray_address: str | None = None
    runtime_env: str | None = None
    unit_rows: int = 2048
    progress: bool = True
    beam_args: tuple[str, ...] = ()  # pipeline options for a full rebuild (--runner=FlinkRunner ...)


def _read_ids(uri: str) -> list[str]:
    text = storage.read_bytes(uri).decode("utf-8", errors="strict")
    ids = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not ids:
        raise DataError(f"--ids {uri}: no product ids in the file")
    return ids


def _subset_catalog(cfg: RefreshConfig, wanted: set[str], out: str) -> None:
    """The catalog rows to (re-)encode, as one Parquet file (first occurrence of an id;
    relative image_uris made absolute so they resolve from the new location)."""
    files, root = catalog_files(cfg.catalog)
    tables, seen = [], set()
    for uri in files:
        fs, path = storage.resolve(uri)
        t = pq.read_table(path, filesystem=fs)
        mask = pc.is_in(t["product_id"], pa.array(sorted(wanted - seen), pa.string()))
        t = t.filter(mask)
        if not t.num_rows:
            continue
        first = {}
        for i, pid in enumerate(t.column("product_id").to_pylist()):
            first.setdefault(pid, i)
        t = t.take(pa.array(sorted(first.values())))
        seen |= set(first)
        if "image_uri" in t.column_names:
            t = t.set_column(t.schema.get_field_index("image_uri"), "image_uri",
                             pa.array([resolve_uri(root, u) if u else u for u in t.column("image_uri").to_pylist()]))
        tables.append(t)
    with storage.open_write(out) as f:
        pq.write_table(pa.concat_tables(tables, promote_options="permissive"), f, compression="zstd",
                       row_group_size=2048)


def _run_id(model_sha: str, d: diffs.Diff, current: dict[str, str], full: bool) -> str:
    h = hashlib.sha256(model_sha.encode())
    h.update(b"full" if full else json.dumps([(p, current[p]) for p in d.new + d.changed]).encode())
    return "r-" + h.hexdigest()[:12]


def _composite(prev: dict | None, where: dict[str, str], delta: dict, run: str, drop: set[str]) -> dict:
    """The next embeddings manifest: previous parts (minus ``drop``, by exclusion) + delta parts."""
    parts = []
    for entry in (prev or {}).get("parts", []):
        gone = sorted(p for p in drop if where.get(p) == entry["name"])
        if gone:
            entry = {**entry, "exclude": sorted(set(entry.get("exclude", [])) | set(gone))}
        parts.append(entry)
    for entry in delta["parts"]:
        moved = {**entry, "name": f"{run}-{entry['name']}",
                 "part": {**entry["part"], "file": f"runs/{run}/{entry['part']['file']}"}}
        if entry.get("rejects"):
            moved["rejects"] = {**entry["rejects"], "file": f"runs/{run}/{entry['rejects']['file']}"}
        parts.append(moved)
    previous_live = (prev or {}).get("counts", {}).get("encoded", 0) - len(drop & set(where))
    return {**delta, "parts": parts, "run": run,
            "counts": {**delta["counts"], "encoded": previous_live + delta["counts"]["encoded"]}}


def run(cfg: RefreshConfig) -> dict:
    timer = StageTimer()
    report: dict = {"catalog": cfg.catalog, "embeddings": cfg.embeddings, "index_root": cfg.index,
                    "mode": "backfill" if cfg.ids_file else "refresh"}
    lease = Lease(storage.join(cfg.index, "_locks", "refresh.json"), cfg.lock_ttl_hours, "refresh")
    with lease:
        report["broken_stale_lock"] = lease.broken
        with timer.stage("diff"):
            model_sha = load_bundle(cfg.model).sha256
            prev_emb = (shards.read_manifest(cfg.embeddings) if storage.exists(shards.manifest_uri(cfg.embeddings))
                        else None)
            latest, token = publish.read_latest(cfg.index)
            prev_index = publish.read_manifest(cfg.index, latest) if latest else None
            full_reason = None
            if prev_emb is None or prev_index is None:
                full_reason = "first run: no current embeddings or index"
            elif prev_emb["model"]["sha256"] != model_sha:
                full_reason = (f"model changed ({prev_emb['model']['sha256'][:12]} -> {model_sha[:12]}): "
                               "full re-encode and retrain")
            current, unindexable = diffs.catalog_hashes(cfg.catalog, model_sha)
            prev_hashes, where = diffs.embedding_hashes(cfg.embeddings, prev_emb) if not full_reason else ({}, {})
            if cfg.ids_file:
                wanted = _read_ids(cfg.ids_file)
                report["ids_not_in_catalog"] = sorted(set(wanted) - set(current))[:100]
                picked = {p: current[p] for p in wanted if p in current}
                if not picked:
                    raise DataError(f"--ids {cfg.ids_file}: none of its {len(wanted)} product ids is an indexable "
                                    f"row of {cfg.catalog}")
                d = diffs.Diff(new=sorted(p for p in picked if p not in prev_hashes),
                               changed=sorted(p for p in picked if p in prev_hashes),
                               unchanged=len(prev_hashes) - len([p for p in picked if p in prev_hashes]))
                current = picked
            else:
                d = diffs.diff(current, prev_hashes, unindexable)
        report["diff"] = d.counts()
        if not full_reason and d.empty:
            report.update(nothing_to_do=True, decision="no change: nothing encoded, no new version",
                          seconds=timer.seconds)
            return report
        run_id = _run_id(model_sha, d, current, bool(full_reason))
        run_dir = storage.join(cfg.embeddings, "runs", run_id)
        with timer.stage("encode"):
            if full_reason and not cfg.ids_file:
                source = cfg.catalog
            else:
                source = storage.join(run_dir, "input", "catalog.parquet")
                if not storage.exists(source):  # a resumed run keeps its input (and its fingerprints)
                    _subset_catalog(cfg, set(d.new) | set(d.changed), source)
            enc = encode_job.run(EncodeConfig(model=cfg.model, catalog=source, out=run_dir,
                                              ray_address=cfg.ray_address, runtime_env=cfg.runtime_env,
                                              unit_rows=cfg.unit_rows, progress=cfg.progress))
            if not enc["complete"]:
                raise TransientError(f"delta encode into {run_dir} left {len(enc['failed_units'])} units failed; "
                                     "re-run the refresh to finish")
        # rows: what this refresh (re-)encodes; a resumed refresh finds some units already
        # committed by the attempt that was killed and encodes only the rest this time
        report["encode"] = {"run": run_id, "rows": enc["plan"]["rows"], "encoded": enc["totals"]["encoded"],
                            "rejected": enc["totals"]["rejected"], "units": enc["counts"]["units"],
                            "units_resumed": enc["counts"]["units_skipped"],
                            "rows_encoded_by_this_attempt": enc["counts"]["read"]}
        delta = shards.read_manifest(run_dir)
        drop = set(d.changed) | set(d.deleted)
        composite = _composite(None if full_reason else prev_emb, where, delta, run_id, drop)
        manifest_name = f"manifests/{run_id}.json"
        storage.write_json(storage.join(cfg.embeddings, manifest_name), composite)
        version_report = _next_version(cfg, report, timer, full_reason, d, prev_index, latest, token, composite,
                                       manifest_name, run_id, len(prev_hashes))
        storage.write_json(shards.manifest_uri(cfg.embeddings), composite)  # now the current embeddings
        with timer.stage("retention"):
            report["retention"] = versions.prune(cfg.index, cfg.keep, cfg.grace_hours)
    report.update(version=version_report["version"], published=True, evaluation=version_report["evaluation"],
                  index_counts=version_report["counts"], default_nprobe=version_report["default_nprobe"],
                  seconds=timer.seconds)
    return report


def _next_version(cfg, report, timer, full_reason, d, prev_index, latest, token, composite, manifest_name,
                  run_id, previous_count) -> dict:
    vector = prev_index["vector"] if prev_index else cfg.vector
    n_shards = len(prev_index["shards"]) if prev_index else cfg.shards
    bcfg = build_job.BuildConfig(embeddings=cfg.embeddings, out=cfg.index, shards=n_shards, vector=vector,
                                 recall_target=cfg.recall_target, min_recall=cfg.min_recall,
                                 eval_queries=cfg.eval_queries, manifest_name=manifest_name)
    decision = full_reason
    if not decision:
        alpha = prev_index.get("fuse_alpha", 0.5)
        spec = BuildSpec(cfg.embeddings, "", n_shards, vector, alpha)
        delta_entries = [e for e in composite["parts"] if e["name"].startswith(run_id + "-")]
        with timer.stage("drift"):
            vectors, ids, idmap, skipped = update.new_vectors(spec, delta_entries)
            prev_dir = publish.version_uri(cfg.index, prev_index["version"])
            trained = read_checked(storage.join(prev_dir, "trained.index"), prev_index["trained"])
            drift = update.drift(trained, vectors, prev_index.get("training"))
            change = (len(d.new) + len(d.changed) + len(d.deleted)) / max(previous_count, 1)
            drift["changed_fraction"] = round(change, 4)
            drift["thresholds"] = {"max_drift": cfg.max_drift, "max_change": cfg.max_change}
        report["drift"] = drift
        if drift["ratio"] is not None and drift["ratio"] > cfg.max_drift:
            decision = f"retrain: new vectors' coarse MSE is {drift['ratio']}x the training MSE (> {cfg.max_drift})"
        elif change > cfg.max_change:
            decision = f"retrain: {change:.1%} of the catalog changed (> {cfg.max_change:.0%})"
    if decision:
        report["decision"] = decision
        with timer.stage("build"):
            return build_job.run(bcfg, list(cfg.beam_args))
    with timer.stage("update"):
        version = publish.new_version()
        vdir = publish.version_uri(cfg.index, version)
        storage.write_bytes(storage.join(vdir, "trained.index"), trained)
        spec = replace(spec, version_dir=vdir)
        records = update.update_shards(spec, prev_dir, prev_index, trained, sorted(set(d.changed) | set(d.deleted)),
                                       vectors, ids, idmap)
    with timer.stage("drift"):
        # Do the reused codebooks represent the new vectors as well as the old ones?
        # (A coarse MSE can look fine while the PQ codes of out-of-distribution vectors are poor.)
        draft_reader = IndexReader(vdir, {"params": prev_index["params"], "shards": records, "trained": {
            "file": "trained.index", "sha256": hashlib.sha256(trained).hexdigest()}})
        nprobe = prev_index.get("default_nprobe") or 1
        rng = np.random.default_rng(0)
        pick = rng.permutation(len(ids))[:2000]
        new_recall = update.self_recall(draft_reader, vectors[pick], ids[pick], nprobe)
        # one pass over the embeddings draws the held-out vectors: the old ones among them
        # measure the old side here, and all of them evaluate the version below
        n = composite["counts"]["encoded"]
        _, held, held_ids = build_job.sample_vectors(bcfg, composite, alpha, n, 0)
        old = ~np.isin(held_ids, ids)
        old_recall = update.self_recall(draft_reader, held[old], held_ids[old], nprobe)
        report["drift"].update(self_recall_at_10_new=new_recall, self_recall_at_10_old=old_recall,
                               max_recall_drop=cfg.max_recall_drop)
    if new_recall is not None and old_recall is not None and old_recall - new_recall > cfg.max_recall_drop:
        report["decision"] = (f"retrain: new vectors find themselves in the top 10 {new_recall:.1%} of the time "
                              f"against {old_recall:.1%} for the rest (a drop over {cfg.max_recall_drop:.0%})")
        report["discarded_incremental_version"] = version
        storage.delete(vdir, recursive=True)
        with timer.stage("build"):
            return build_job.run(bcfg, list(cfg.beam_args))
    report["decision"] = "incremental: previous quantizer reused, changed/deleted ids removed, new vectors added"
    counts = {"rows": n, "indexed": sum(r["ntotal"] for r in records), "skipped": skipped}
    draft = build_job.VersionDraft(cfg=bcfg, embeddings=composite, alpha=alpha, version=version, parent=latest,
                                   token=token, params=prev_index["params"], trained=trained,
                                   training=prev_index.get("training") or {}, shards=records, counts=counts)
    return build_job.finish_version(draft, held, held_ids, timer)


def check(cfg: RefreshConfig) -> None:
    for name in ("max_drift", "max_change"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if cfg.keep < 1:
        raise UsageError("--keep must be at least 1")

