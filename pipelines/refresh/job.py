"""The refresh / backfill driver (docs/cli.md, "refresh").

    lock -> diff -> delta encode (Ray), retagged products' vectors copied -> composite embeddings manifest
         -> next index version (incremental, or a full build when drift says retrain)
         -> LATEST (conditional) -> current embeddings manifest -> retention -> unlock

The current embeddings manifest (EMB_ROOT/manifest.json) is replaced only after the
index version is published, so a refresh killed at any point is redone by the next run:
its delta encode (in a run directory named after the diff) resumes from its committed
units, and re-applying a change to an index that already has it is a no-op.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from mimdex.encoders.bundle import load_bundle
from mimdex.indexing import release, versions
from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts import ground_truth, index_delta
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts import part_deletions
from mimdex.infra.contracts.reuse import write_reuse
from mimdex.infra.contracts import attributes
from mimdex.infra.contracts.catalog import write_subsets
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.contracts.vectors import ids_for
from mimdex.infra.errors import DataError, TransientError, UsageError
from mimdex.infra.lock import Lease
from mimdex.pipelines import build_index, compact, encode
from mimdex.pipelines.refresh import diff as diffs
from mimdex.pipelines.refresh import evaluation, retag, update
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
    photos: str = "every"            # for a first build of a multi-photo catalog; later versions keep theirs
    filter_columns: tuple[str, ...] | None = None   # None: the index's (contracts.attributes)
    max_drift: float = 1.25          # retrain when new vectors' coarse MSE > this x the training MSE
    max_change: float = 0.25         # ... or when this share of the catalog was added/changed/deleted
    max_code_drift: float = 2.0      # ... or when new vectors' code error is this x the held-out old vectors'
    keep: int = 5                    # retention after publishing
    grace_hours: float = 24.0
    lock_ttl_hours: float = 6.0
    eval_queries: int = 1000
    queries: str | None = None       # evaluation queries (contracts.queries), as build-index's --queries
    full_evaluation: bool = False    # ground truth from every vector, not updated from the change
    recall_target: float = 0.95
    min_recall: float | None = None
    ray_address: str | None = None
    runtime_env: str | None = None
    unit_rows: int = 2048
    progress: bool = True
    beam_args: tuple[str, ...] = ()  # pipeline options for the diff and a rebuild (--runner=FlinkRunner ...)
    stall_timeout: float = 900.0     # exit 75 when a Beam job writes nothing for this long
    max_delta_share: float = 0.10    # compact when the delta segments hold more than this share of the vectors


def _read_ids(uri: str) -> list[str]:
    try:
        text = storage.read_bytes(uri).decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise DataError(f"--ids {uri}: not UTF-8 text: {exc}") from exc
    ids = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not ids:
        raise DataError(f"--ids {uri}: no product ids in the file")
    return ids


def _composite(root: str, prev: emb.EmbeddingsManifest | None, d: diffs.Diff | None,
               delta: emb.EmbeddingsManifest, run: str, retagged: list[emb.PartEntry]) -> emb.EmbeddingsManifest:
    """The next embeddings manifest: previous parts (minus the products the diff
    superseded: a new deletion file for each part it touched, under the run) + delta parts
    + retag parts (the same products' rows)."""
    by_part: dict[str, set[str]] = {}
    if prev is not None and d is not None:
        gone = d.table(diffs.SUPERSEDED, ("product_id", "part"))
        for pid, part in zip(gone["product_id"].to_pylist(), gone["part"].to_pylist()):
            by_part.setdefault(part, set()).add(pid)
    parts = [replace(e, exclude=(), deleted=part_deletions.write(root, f"runs/{run}", e.name, by_part[e.name],
                                                                 e.deleted, e.exclude))
             if e.name in by_part else e for e in (prev.parts if prev else ())]
    parts += [e.moved(f"{run}-{e.name}", f"runs/{run}") for e in (*delta.parts, *retagged)]
    removed = d.n(diffs.CHANGED, diffs.DELETED) if d is not None else 0  # a retag removes and adds back
    encoded = (prev.encoded - removed if prev else 0) + delta.encoded
    return emb.build_manifest(parts, delta.model, delta.dtype, delta.catalog, delta.unit_rows, encoded, run)


def run(cfg: RefreshConfig) -> dict:
    timer, retries, io0 = StageTimer(), storage.retry_count(), storage.IO.snapshot()
    report: dict = {"catalog": cfg.catalog, "embeddings": cfg.embeddings, "index_root": cfg.index,
                    "mode": "backfill" if cfg.ids_file else "refresh"}
    lease = Lease(storage.join(cfg.index, "_locks", "refresh.json"), cfg.lock_ttl_hours, "refresh")
    with lease:
        report["broken_stale_lock"] = lease.broken
        with timer.stage("diff"):
            model_sha = load_bundle(cfg.model).sha256
            prev_emb = emb.read_manifest(cfg.embeddings) if emb.has_manifest(cfg.embeddings) else None
            pointer, token = iv.read_latest(cfg.index)
            parent = pointer.version if pointer else None
            prev_index = iv.read_manifest(cfg.index, parent) if pointer else None
            columns = (cfg.filter_columns if cfg.filter_columns is not None
                       else tuple(prev_index.params.get(attributes.PARAM, ())) if prev_index else ())
            cfg = replace(cfg, filter_columns=columns)
            full_reason = None
            if prev_emb is None or prev_index is None:
                full_reason = "first run: no current embeddings or index"
            elif prev_emb.model.sha256 != model_sha:
                full_reason = (f"model changed ({prev_emb.model.sha256[:12]} -> {model_sha[:12]}): "
                               "full re-encode and retrain")
            elif prev_index.embeddings.get("manifest_created_at") not in (None, prev_emb.created_at):
                prev_emb, full_reason = _embeddings_of(cfg.embeddings, prev_index)
                report["diff_base"] = "the embeddings LATEST was built from (it is not the current ones)"
            d = None
            if not full_reason or cfg.ids_file:
                forced = tuple(_read_ids(cfg.ids_file)) if cfg.ids_file else ()
                from mimdex.pipelines.refresh import diff_graph  # Beam is imported only to diff

                diff_dir = storage.join(cfg.embeddings, "diffs", iv.new_version())
                with iv.started_from(cfg.index, parent):
                    d, report["read"] = diff_graph.run_diff(cfg.catalog, model_sha, cfg.embeddings,
                                                            None if full_reason else prev_emb, diff_dir, forced,
                                                            list(cfg.beam_args), cfg.stall_timeout,
                                                            filter_columns=columns, index=(cfg.index, prev_index))
                to_encode = d.ids(*diffs.TO_ENCODE)
                if forced:
                    found = set(to_encode.to_pylist())
                    report["ids_not_in_catalog"] = sorted(set(forced) - found)[:100]
                    if not found:
                        raise DataError(f"--ids {cfg.ids_file}: none of its {len(forced)} product ids is a "
                                        f"product of {cfg.catalog}")
        # a full run diffs nothing: it encodes the whole catalog
        report["diff"] = d.summary() if d is not None else {"full": full_reason}
        new_columns = prev_index is not None and list(columns) != prev_index.params.get(attributes.PARAM, [])
        if not full_reason and d.empty and not new_columns:  # a new set of filter columns is a new version
            _forget_diffs(cfg.embeddings)
            report.update(nothing_to_do=True, decision="no change: nothing encoded, no new version",
                          seconds=timer.seconds, io=_io(io0, None, None),
                          storage_retries={"driver": storage.retry_count() - retries})
            return report
        run_id = "r-" + (hashlib.sha256(f"full {model_sha}".encode()).hexdigest()[:12] if d is None
                         else d.digest(model_sha + "".join(f",{c}" for c in columns)))
        run_dir = storage.join(cfg.embeddings, "runs", run_id)
        with timer.stage("encode"):
            if d is None:
                source = cfg.catalog
            else:
                source = storage.join(run_dir, "input", "catalog.parquet")
                subsets = []  # a resumed run keeps its input
                if d.n(*diffs.TO_ENCODE) and not storage.exists(source):
                    subsets.append((diffs.TO_ENCODE, source))
                if d.n(diffs.RETAGGED) and not storage.exists(storage.join(run_dir, retag.ROWS)) \
                        and not storage.exists(storage.join(run_dir, retag.DONE)):
                    subsets.append(((diffs.RETAGGED,), storage.join(run_dir, retag.ROWS)))
                if subsets:  # the rows the diff kept whole; one pass over the catalog for the rest, if any
                    given = [d.payload(*c) for c, _ in subsets]
                    written = write_subsets(cfg.catalog, [(d.ids(*c), out) for c, out in subsets], given)
                    from_diff = sum(g.num_rows for g in given if g is not None)
                    report["encode_input"] = {"rows_from_the_diff": from_diff,
                                              "rows_read_from_the_catalog": sum(written) - from_diff}
            reuse = None
            if d is not None and d.n(diffs.CHANGED) and not full_reason and not cfg.ids_file:
                reuse = _reuse_photos(cfg.embeddings, prev_emb, d, run_dir)
            enc = _encode(cfg, source, run_dir, model_sha, d is None or bool(d.n(*diffs.TO_ENCODE)),
                          prev_emb.dtype if prev_emb else "float16", reuse)
        report["encode"] = {"run": run_id, "rows": enc.rows, "encoded": enc.encoded, "rejected": enc.rejected,
                            "units": enc.units, "units_resumed": enc.units_skipped,
                            **({"photos": enc.report["counts"]["photos"]}
                               if "photos" in enc.report.get("counts", {}) else {}),
                            "rows_encoded_by_this_attempt": enc.rows_read,
                            "storage_retries_of_workers": enc.report.get("storage_retries", {}).get("workers", 0)}
        retagged = []
        if d is not None and d.n(diffs.RETAGGED):
            with timer.stage("retag"):
                retagged = retag.write_parts(cfg.embeddings, prev_emb, d, run_dir)
            report["retag"] = {"products": d.n(diffs.RETAGGED), "parts": len(retagged),
                               "rows_copied": sum(e.part.rows or 0 for e in retagged),
                               "bytes_written": sum(e.part.bytes + (e.rejects.bytes if e.rejects else 0)
                                                    for e in retagged)}
        delta = emb.read_manifest(run_dir)
        if not full_reason:
            report["removed_now_rejected"] = _now_rejected(run_dir, delta, set(d.ids(diffs.CHANGED).to_pylist()))
        base = None if full_reason else prev_emb
        composite = _composite(cfg.embeddings, base, d, delta, run_id, retagged)
        manifest_name = f"manifests/{run_id}.json"
        emb.write_manifest(cfg.embeddings, composite, manifest_name)
        with iv.started_from(cfg.index, parent):   # retention may remove it once LATEST moves on
            released = _next_version(cfg, report, timer, full_reason, d, prev_index, pointer, token, composite,
                                     manifest_name, run_id, prev_emb.encoded if prev_emb and not full_reason else 0)
        emb.write_manifest(cfg.embeddings, composite)  # now the current embeddings
        _forget_diffs(cfg.embeddings)
        segments, share = released.counts.get("delta_segments", 0), _delta_share(released.counts)
        if segments and share > cfg.max_delta_share:
            with timer.stage("compact"):
                report["compaction"] = compact.run(compact.CompactConfig(cfg.index, cfg.stall_timeout),
                                                   list(cfg.beam_args))
                report["compaction"]["why"] = (f"the delta segments hold {share:.1%} of the vectors "
                                               f"(> --max-delta-share {cfg.max_delta_share:.0%})")
        with timer.stage("retention"):
            report["retention"] = versions.prune(cfg.index, cfg.keep, cfg.grace_hours)
    report.update(version=report.get("compaction", {}).get("version", released.version), published=True, evaluation=released.evaluation,
                  index_counts=released.counts, default_nprobe=released.default_nprobe, seconds=timer.seconds,
                  stage_io=timer.io,
                  io=_io(io0, delta, released.report, report.get("retag")),
                  storage_retries={"driver": storage.retry_count() - retries,
                                   "workers": report["encode"]["storage_retries_of_workers"]})
    return report


def _embeddings_of(root: str, version: iv.IndexManifest) -> tuple[emb.EmbeddingsManifest | None, str | None]:
    """The embeddings manifest ``version`` was built from, where LATEST names a version
    older than the current embeddings (a rollback): the diff must start from what the index
    holds, so that every change made since is applied again. Its copy under manifests/
    (each refresh keeps one); without it, a full run."""
    want = version.embeddings.get("manifest_created_at")
    for uri in reversed(storage.list_files(storage.join(root, "manifests"), ".json")):
        m = emb.read_manifest(root, "manifests/" + uri.rsplit("/", 1)[-1])
        if m.created_at == want:
            return m, None
    return None, (f"LATEST {version.version} was built from the embeddings of {want}, not the current ones "
                  "(a rollback), and no copy of that manifest is kept: full re-encode and build")


def _delta_share(counts: dict) -> float:
    return counts.get("delta_vectors", 0) / max(counts.get("indexed", 0), 1)


def _io(before: dict, delta: emb.EmbeddingsManifest | None, version: dict | None, retagged: dict | None = None) -> dict:
    """What the refresh read and wrote: this process's storage traffic (the diff, the update,
    the evaluation), and what the encode workers wrote (its parts)."""
    out = storage.io_since(before)
    if delta is not None:
        out["encode_written_bytes"] = sum(e.part.bytes + (e.rejects.bytes if e.rejects else 0) for e in delta.parts)
    if retagged:
        out["retag_written_bytes"] = retagged["bytes_written"]
    if version is not None:
        out["index_written_bytes"] = version.get("written_bytes")
        out["index_files_bytes"] = version.get("files_bytes")
    return out


def _forget_diffs(root: str) -> None:
    """The diff's output has served its run (the run's own input holds what it needs)."""
    where = storage.join(root, "diffs")
    if storage.exists(where):
        storage.delete(where, recursive=True)


def _reuse_photos(root: str, manifest: emb.EmbeddingsManifest, d: diffs.Diff, run_dir: str) -> str | None:
    """The current image vectors of changed multi-photo products, by (product_id, photo
    sha256): their re-encode copies the photos they still have instead of encoding them
    again (a reordered list or a new title costs no image encoding). None for a
    single-image catalog."""
    name = "input/reuse.parquet"
    if storage.exists(out := storage.join(run_dir, name)):  # a resumed run keeps its input
        return out
    changed = d.table((diffs.CHANGED,), ("product_id", "part"))
    where = dict(zip(changed["product_id"].to_pylist(), changed["part"].to_pylist()))
    return write_reuse(root, manifest, where, set(where), run_dir, name)


def _encode(cfg: RefreshConfig, source: str, run_dir: str, model_sha: str, needed: bool,
            dtype: str, reuse: str | None = None) -> encode.EncodeResult:
    if not needed:  # only deletions: an empty delta run
        model = load_bundle(cfg.model)
        ref = ModelRef(cfg.model, model_sha, model.cfg.variant, model.cfg.embed_dim, model.model.has_text)
        emb.write_manifest(run_dir, emb.build_manifest([], ref, dtype, cfg.catalog, cfg.unit_rows))
        return encode.EncodeResult(True, 0, 0, 0, 0, 0, 0, (), {})
    enc = encode.run(encode.EncodeConfig(model=cfg.model, catalog=source, out=run_dir, ray_address=cfg.ray_address,
                                         runtime_env=cfg.runtime_env, unit_rows=cfg.unit_rows, dtype=dtype,
                                         progress=cfg.progress, reuse=reuse))
    if not enc.complete:
        raise TransientError(f"delta encode into {run_dir} left {len(enc.failed_units)} units failed; "
                             "re-run the refresh to finish")
    return enc


def _now_rejected(run_dir: str, delta: emb.EmbeddingsManifest, changed: set[str]) -> list[dict]:
    """Indexed products that this run's encode rejected: removed from the index, and said so.
    (A multi-photo product with a photo rejected but others encoded is still indexed.)"""
    rejects = emb.read_all(run_dir, delta, "rejects")
    still = set(emb.read_all(run_dir, delta, "part").column("product_id").to_pylist())
    rows = [r for r in rejects.select(["product_id", "reason", "detail"]).to_pylist()
            if r["product_id"] in changed and r["product_id"] not in still]
    return rows[:100]


def _next_version(cfg, report, timer, full_reason, d, prev_index, pointer, token, composite, manifest_name,
                  run_id, previous_count) -> release.Released:
    vector = prev_index.vector if prev_index else cfg.vector
    n_shards = len(prev_index.shards) if prev_index else cfg.shards
    photos = (prev_index.photos if prev_index else None) or cfg.photos
    bcfg = build_index.BuildConfig(embeddings=cfg.embeddings, out=cfg.index, shards=n_shards, vector=vector,
                                   recall_target=cfg.recall_target, min_recall=cfg.min_recall,
                                   eval_queries=cfg.eval_queries, queries=cfg.queries, manifest_name=manifest_name,
                                   photos=photos,
                                   filter_columns=cfg.filter_columns)
    decision = full_reason
    if not decision:
        alpha = prev_index.fuse_alpha
        delta_entries = [e for e in composite.parts if e.name.startswith(run_id + "-")]
        with timer.stage("drift"):
            delta = update.new_vectors(cfg.embeddings, composite, delta_entries, vector, alpha, prev_index.photos)
            prev_dir = iv.version_uri(cfg.index, prev_index.version)
            trained = iv.read_trained(prev_dir, prev_index.trained)
            drift = update.drift(trained, delta.vectors, prev_index.training)
            change = d.n(diffs.NEW, diffs.CHANGED, diffs.DELETED) / max(previous_count, 1)
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
            return build_index.run(bcfg, list(cfg.beam_args))
    with timer.stage("update"):
        version = iv.new_version()
        vdir = iv.version_uri(cfg.index, version)
        removed_ids = d.ids(*diffs.REMOVED_FROM_INDEX)
        segment, piece = update.write_delta(vdir, version, trained, n_shards, removed_ids.to_pylist(), delta)
    src = release.Source(cfg.embeddings, composite, vector, alpha, prev_index.photos)
    home = prev_index.version  # the previous version's files are referenced, not copied
    draft = release.VersionDraft(
        out=cfg.index, version=version, parent=pointer.version, token=token,
        params=_with_filter_columns(prev_index.params, cfg.filter_columns),
        trained=trained, training=prev_index.training,
        shards=tuple(index_delta.rebase_shard(s, home) for s in prev_index.shards), counts={},
        deltas=tuple(index_delta.rebase_segment(g, home) for g in prev_index.deltas) + (segment,),
        trained_file=index_delta.rebased(prev_index.trained, home).file)
    indexed = prev_index.ntotal + len(delta.ids) - evaluation.removed_vectors(d, prev_index.photos)
    with timer.stage("truth"):
        # the previous version's ground truth updated from the change (a full pass only
        # where it cannot be): its held-out vectors also measure the old side below
        n = composite.encoded
        gate = bcfg.gate(composite.model)
        # a full recomputation on request, and on the night the deltas pass --max-delta-share
        # (compaction follows): the kept lists are renewed as the shards are
        compacting = sum(g.added for g in draft.deltas) / max(indexed, 1) > cfg.max_delta_share
        why = ("--full-evaluation" if cfg.full_evaluation else "compaction follows" if compacting else
               None if prev_index.ground_truth else "the previous version keeps none (build-index writes none)")
        kept = evaluation.kept_truth(cfg.index, prev_index) if why is None else {}
        removed = ids_for(removed_ids.to_pylist())
        truths, report["ground_truth"] = evaluation.carried(kept, src, gate, removed, delta.vectors, delta.ids,
                                                            delta.keys, n)
        report["ground_truth"]["recomputed_because"] = why
    with timer.stage("drift"):
        # do the reused codebooks represent the new vectors as well as the old ones? (a
        # coarse MSE can look fine while the list codes of out-of-distribution vectors are poor)
        report["drift"].update(evaluation.code_drift(trained, delta, truths), max_code_drift=cfg.max_code_drift)
    ratio = report["drift"]["code_error_ratio"]
    if ratio is not None and ratio > cfg.max_code_drift:
        report["decision"] = (f"retrain: the new vectors' code error is {ratio}x the held-out old vectors' "
                              f"(> --max-code-drift {cfg.max_code_drift})")
        report["discarded_incremental_version"] = version
        storage.delete(vdir, recursive=True)
        with timer.stage("build"):
            return build_index.run(bcfg, list(cfg.beam_args))
    report["decision"] = ("incremental: previous quantizer reused; a delta segment adds the new vectors and "
                          "deletes the changed and deleted products"
                          + (" (retagged ones: their vectors again, under new id-map rows)" if d.n(diffs.RETAGGED) else ""))
    draft = replace(draft, counts={"rows": n, "indexed": indexed, "skipped": delta.skipped,
                                   "delta_segments": len(draft.deltas),
                                   "delta_vectors": sum(g.added for g in draft.deltas)})
    with timer.stage("evaluate"):
        renew = tuple(ground_truth.SETS) if why else tuple(report["ground_truth"]["redrawn"])
        carried = evaluation.search_lists(cfg.index, prev_index, draft, truths, removed, piece, renew)
    sets = tuple(release.QuerySet(t.name, t.vectors, t.own if t.name == "held_out" else None) for t in truths)
    released = release.finish_version(draft, src, gate, sets, timer, kept=truths, carried=carried)
    report["search_lists"] = carried.report()
    return released


def _with_filter_columns(params: dict, columns: tuple[str, ...]) -> dict:
    out = {k: v for k, v in params.items() if k != attributes.PARAM}
    return {**out, attributes.PARAM: list(columns)} if columns else out


def check(cfg: RefreshConfig) -> None:
    for name in ("max_drift", "max_change", "max_delta_share", "max_code_drift"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if cfg.keep < 1:
        raise UsageError("--keep must be at least 1")

