"""The build-index launcher: validate, sample, train once, run the Beam graph, then
evaluate, gate and publish (indexing.release). Every choice and measurement lands in the
version's manifest and report.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from mimdex.indexing import release
from mimdex.indexing.exact import merge_nearest
from mimdex.indexing.params import choose
from mimdex.indexing.train import train_index
from mimdex.indexing.trial import choose_codes
from mimdex.infra import storage
from mimdex.infra.contracts import attributes
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.files import parquet_metadata
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.contracts.photos import DEFAULT_MODE, MODES
from mimdex.infra.contracts.vectors import check_kind, merge_skipped
from mimdex.infra.errors import UsageError
from mimdex.infra.memory import release_free_memory
from mimdex.pipelines import beam_runner
from mimdex.pipelines.build_index.spec import BUILD_DIR, PARTIALS_DIR, QUERIES_FILE, BuildSpec
from mimdex.pipelines.report import StageTimer

log = logging.getLogger(__name__)
MULTIPROCESS_MIN_VECTORS = 1_000_000


@dataclass(frozen=True)
class BuildConfig:
    embeddings: str
    out: str
    shards: int = 4
    vector: str = "image"
    factory: str | None = None
    max_index_memory: int | None = None
    recall_target: float = 0.95
    min_recall: float | None = None
    queries: str | None = None
    eval_queries: int = 1000
    train_size: int | None = None
    seed: int = 0
    metadata: bool = True
    filter_columns: tuple[str, ...] = ()  # contracts.attributes: recorded in params, what --filter may name
    photos: str = DEFAULT_MODE            # a multi-photo catalog: every photo, the main one, or pooled
    manifest_name: str = "manifest.json"  # refresh builds from a composite manifest beside it
    stall_timeout: float = 900.0          # exit 75 when the Beam job writes nothing for this long

    def gate(self, model: ModelRef) -> release.Gate:
        """The quality gate, with --queries embedded by ``model`` (the embeddings')."""
        from mimdex.encoders.queries import vectors_for   # torch: only for a gate with queries

        queries = vectors_for(model, f"embeddings {self.embeddings}", self.queries, self.vector) \
            if self.queries else None
        return release.Gate(self.recall_target, self.min_recall, queries, self.eval_queries, self.seed)


def _check(cfg: BuildConfig) -> None:
    if cfg.shards < 1:
        raise UsageError("--shards must be at least 1")
    check_kind(cfg.vector)
    if cfg.photos not in MODES:
        raise UsageError(f"--photos must be one of {', '.join(MODES)}, not {cfg.photos!r}")
    for name in ("recall_target", "min_recall"):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1")


def check_filter_columns(cfg: BuildConfig, manifest: emb.EmbeddingsManifest) -> None:
    """Every part's catalog source holds the filter columns, as strings, integers or bools
    (exit 65 naming the file); a flag they cannot serve is exit 2."""
    if not cfg.filter_columns:
        return
    if not cfg.metadata:
        raise UsageError("--filter-columns needs the catalog's columns in the id maps (drop --no-metadata)")
    bare = [e.name for e in manifest.parts if not e.source and e.part.rows]
    if bare:
        raise UsageError(f"--filter-columns: embeddings part {bare[0]} of {cfg.embeddings} records no catalog "
                         "source, so its id-map rows have no columns to filter on")
    for uri in sorted({e.source for e in manifest.parts if e.source}):
        attributes.check(f"catalog {uri}", parquet_metadata(uri, "catalog").schema.to_arrow_schema(),
                         cfg.filter_columns)


def validate_parts(root: str, manifest: emb.EmbeddingsManifest) -> bool:
    """Refuse, before any work, parts that are not Parquet or whose d, dtype or model
    differ from the manifest's (exit 65 naming the file). Returns whether the parts hold
    a row per photo (a multi-photo catalog)."""
    photos = False
    for entry in manifest.parts:
        uri = storage.join(root, entry.part.file)
        schema = parquet_metadata(uri, "embeddings part").schema.to_arrow_schema()
        emb.check_part_schema(uri, schema, manifest.model, manifest.dtype)
        photos |= emb.has_photos(schema)
    return photos


def fuse_alpha(manifest: emb.EmbeddingsManifest) -> float:
    config = storage.read_json(storage.join(manifest.model.uri, "config.json"))
    return float(config["model"].get("fuse_alpha", 0.5))


def worker_threads(beam_args: list[str]) -> int:
    """faiss threads per DoFn process: the cores shared out among the DirectRunner's
    worker processes (0, faiss's default, for one process or a remote runner)."""
    procs = beam_runner.local_processes(beam_args)
    return max(1, (os.cpu_count() or 1) // procs) if procs > 1 else 0


def default_beam_args(n: int, parts: int) -> list[str]:
    """The DirectRunner, in one process for small builds (no worker start-up), with a
    worker process per core from MULTIPROCESS_MIN_VECTORS on (AddPart is CPU-bound)."""
    workers = min(os.cpu_count() or 1, parts)
    if n < MULTIPROCESS_MIN_VECTORS or workers < 2:
        return ["--runner=DirectRunner"]
    return ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]


def _collect(spec: BuildSpec, trained: bytes) -> tuple[tuple[iv.ShardEntry, ...], dict, np.ndarray | None]:
    build = storage.join(spec.version_dir, BUILD_DIR)
    docs = [(u.rsplit("/", 1)[-1], storage.read_json(u)) for u in storage.list_files(build, ".json")]
    records = {r["shard"]: iv.ShardEntry.from_json(r) for name, r in docs if not name.startswith("stats-")}
    stats = [r for name, r in docs if name.startswith("stats-")]
    nlist, code_size = codec.lists_shape(trained)
    for shard in range(spec.shards):  # a shard no product hashed to is still a valid, empty index
        if shard not in records:
            blob = codec.encoded_lists(nlist, code_size, np.zeros(0, np.int64), np.zeros(0, np.int64),
                                       np.zeros((0, code_size), np.uint8))
            records[shard] = iv.write_shard(spec.version_dir, shard, blob, 0, iv.empty_idmap())
    truths = [s["truth"] for s in stats if "truth" in s]
    nearest = (merge_nearest([np.array([np.inf if d is None else d for d in t["dist"]], np.float64) for t in truths],
                             [np.array(t["ids"], np.int64) for t in truths])[1] if truths else None)
    return tuple(records[s] for s in range(spec.shards)), {
        "rows": sum(s["rows"] for s in stats), "indexed": sum(s["indexed"] for s in stats),
        "skipped": merge_skipped(s["skipped"] for s in stats),
        "skipped_examples": [p for s in stats for p in s["skipped_ids"]][:20]}, nearest


def partials_dir(vdir: str, beam_args: list[str]) -> tuple[str, bool]:
    """Where AddPart's partial files go, and whether that is a local temporary directory:
    on the DirectRunner every worker is on this machine, and a local disk is faster (and
    cheaper) than an object store for files that live minutes; a remote runner's workers
    share only storage, so theirs go beside the version and are deleted after the run."""
    if beam_runner.runs_here(beam_args):
        return tempfile.mkdtemp(prefix="mimdex-partials-"), True
    return storage.join(vdir, PARTIALS_DIR), False


def run(cfg: BuildConfig, beam_args: list[str] | None = None) -> release.Released:
    _check(cfg)
    timer, retries = StageTimer(), storage.retry_count()
    with timer.stage("validate"):
        manifest = emb.read_manifest(cfg.embeddings, cfg.manifest_name)
        photos = cfg.photos if validate_parts(cfg.embeddings, manifest) else None
        check_filter_columns(cfg, manifest)
        pointer, token = iv.read_latest(cfg.out)  # we publish only over what we started from
        alpha = fuse_alpha(manifest) if cfg.vector == "fused" else 0.5
        n, d = manifest.encoded, manifest.model.d
        if photos in ("main", "pooled"):  # one vector per product, not per photo
            n = emb.count_products(cfg.embeddings, manifest)
        params = choose(n, d, cfg.max_index_memory, cfg.factory, cfg.train_size)
        gate = cfg.gate(manifest.model)
    src = release.Source(cfg.embeddings, manifest, cfg.vector, alpha, photos)
    version = iv.new_version()
    vdir = iv.version_uri(cfg.out, version)
    beam_args = list(beam_args or []) or default_beam_args(n, len(manifest.parts))
    partials, local = partials_dir(vdir, beam_args)
    try:
        with timer.stage("sample"):
            sample = release.sample_vectors(src, n, params.train_size, cfg.eval_queries, cfg.seed)
            sets = release.query_sets(gate, sample.held, sample.held_ids)
            queries, exclude = release.stacked(sets, d)
            if len(queries):  # AddPart finds their exact neighbours while it holds each part's vectors
                buf = io.BytesIO()
                np.savez(buf, queries=queries, exclude=exclude)
                storage.write_bytes(storage.join(partials, QUERIES_FILE), buf.getvalue())
        with timer.stage("train"):
            trials = ()
            if params.code_options and len(sample.held):  # more than one fits: the data chooses
                codes, why, trials = choose_codes(sample.train, sample.held, params.code_options, n, params.nlist,
                                                  cfg.recall_target, cfg.seed)
                params = choose(n, d, cfg.max_index_memory, None, cfg.train_size, (codes, why))
            index, train_info = train_index(sample.train, params, cfg.seed)
            if trials:
                train_info["codes_trial"] = [t.to_dict() for t in trials]
            del sample
            release_free_memory()   # the sample and k-means' buffers: 0.2 GB kept through the Beam job at 10M
            trained = codec.serialize(index)
            storage.write_bytes(storage.join(vdir, "trained.index"), trained)
        spec = BuildSpec(cfg.embeddings, vdir, cfg.shards, cfg.vector, alpha, manifest.model, manifest.dtype, cfg.metadata,
                         photos or DEFAULT_MODE, truth=bool(len(queries)), partials=partials,
                         threads=worker_threads(beam_args))
        with timer.stage("beam"):
            from mimdex.pipelines.build_index.graph import build_pipeline  # Beam is imported only to build

            beam_runner.run(lambda p: build_pipeline(p, spec, list(manifest.parts)), beam_args,
                            storage.join(vdir, BUILD_DIR), len(manifest.parts) + spec.shards, cfg.stall_timeout,
                            f"version {vdir} is incomplete and unpublished, re-run to build it again")
        with timer.stage("collect"):
            shard_records, counts, nearest = _collect(spec, trained)
            truth = release.split_truth(sets, nearest) if nearest is not None else None
            if not local and storage.exists(partials):  # local ones go in the finally below
                storage.delete(partials, recursive=True)
        draft = release.VersionDraft(out=cfg.out, version=version, parent=pointer.version if pointer else None,
                                     token=token, params={**params.to_dict(), "d": d, "metric": "L2 on unit vectors",
                                             **({attributes.PARAM: list(cfg.filter_columns)}
                                                if cfg.filter_columns else {})},
                                     trained=trained, training=train_info, shards=shard_records, counts=counts)
        released = release.finish_version(draft, src, gate, sets, timer, truth=truth)
        released.report["beam_args"] = beam_args
        # the DirectRunner runs the DoFns in this process; other runners' workers retry on their own
        released.report["storage_retries"] = {"driver": storage.retry_count() - retries}
        return released
    finally:
        if local:
            shutil.rmtree(partials, ignore_errors=True)
