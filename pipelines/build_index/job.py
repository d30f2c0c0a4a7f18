"""The build-index launcher: validate, sample, train once, run the Beam graph, then
evaluate, gate and publish (indexing.release). Every choice and measurement lands in the
version's manifest and report.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import psutil

from mimdex.indexing import release
from mimdex.indexing.params import choose
from mimdex.indexing.train import train_index
from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.files import parquet_metadata
from mimdex.infra.contracts.photos import DEFAULT_MODE, MODES
from mimdex.infra.contracts.vectors import check_kind, merge_skipped
from mimdex.infra.errors import DataError, MimdexError, TransientError, UsageError
from mimdex.pipelines.build_index.spec import BUILD_DIR, BuildSpec
from mimdex.pipelines.report import StageTimer

log = logging.getLogger(__name__)
STALL_POLL_SECONDS = 2.0


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
    photos: str = DEFAULT_MODE            # a multi-photo catalog: every photo, the main one, or pooled
    manifest_name: str = "manifest.json"  # refresh builds from a composite manifest beside it
    stall_timeout: float = 900.0          # exit 75 when the Beam job writes nothing for this long

    @property
    def gate(self) -> release.Gate:
        return release.Gate(self.recall_target, self.min_recall, self.queries, self.eval_queries, self.seed)


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


def beam_pipeline(beam_args: list[str]):
    """A Beam pipeline for these options (DirectRunner when none). Runners that check
    their options when the pipeline is made (Dataflow: project, gs:// temp/staging)
    fail here, before any work, as a usage error."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        return beam.Pipeline(options=PipelineOptions(beam_args or ["--runner=DirectRunner"]))
    except (ValueError, SystemExit) as exc:  # argparse inside Beam exits on a bad value
        why = "rejected by Beam's option parser (its message is above)" if isinstance(exc, SystemExit) else exc
        raise UsageError(f"Beam pipeline options {' '.join(beam_args)}: {why}") from exc


def _run_beam(spec: BuildSpec, parts: tuple[emb.PartEntry, ...], beam_args: list[str],
              stall_timeout: float) -> None:
    """Run the graph; if it writes nothing for ``stall_timeout`` seconds (a lost worker of
    a multi-process or remote runner can leave it waiting forever), stop with exit 75."""
    from mimdex.pipelines.build_index.graph import build_pipeline  # Beam is imported only to build

    pipeline = beam_pipeline(beam_args)
    outcome: dict = {}

    def work() -> None:
        try:
            with pipeline as p:
                build_pipeline(p, spec, list(parts))
        except BaseException as exc:  # noqa: BLE001 - handed to the driver thread below
            outcome["error"] = exc

    # a daemon thread: a stalled runner cannot keep the process alive after we give up on it
    thread = threading.Thread(target=work, name="beam-job", daemon=True)
    thread.start()
    build, outputs, last = storage.join(spec.version_dir, BUILD_DIR), -1, time.monotonic()
    while thread.is_alive():
        thread.join(STALL_POLL_SECONDS)
        done = len(storage.list_files(build, ".json")) if storage.exists(build) else 0
        if done != outputs:
            outputs, last = done, time.monotonic()
        elif thread.is_alive() and time.monotonic() - last > stall_timeout:
            _stop_beam_workers()
            raise TransientError(
                f"the Beam job wrote nothing for {stall_timeout:g} s (--stall-timeout): {outputs} of "
                f"{len(parts) + spec.shards} part and shard outputs are done (a worker may have died); version "
                f"{spec.version_dir} is incomplete and unpublished, re-run to build it again")
    exc = outcome.get("error")
    if exc is None:
        return
    if isinstance(exc, MimdexError):
        raise exc
    cause = exc  # a DoFn's error comes back wrapped by the runner
    while cause is not None and not isinstance(cause, MimdexError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        raise type(cause)(str(cause)) from exc
    for marker, cls in (("DataError", DataError), ("ObjectNotFound", DataError),
                        ("StorageFailure", TransientError)):
        if marker in str(exc):
            raise cls(f"build-index Beam job failed: {str(exc).strip().splitlines()[-1]}") from exc
    raise exc


def _stop_beam_workers() -> None:
    """The SDK worker processes a multi-process DirectRunner started for this job."""
    for child in psutil.Process().children(recursive=True):
        try:
            if "apache_beam.runners.worker" in " ".join(child.cmdline()):
                child.kill()
        except psutil.Error:
            pass


def _collect(spec: BuildSpec, trained: bytes) -> tuple[tuple[iv.ShardEntry, ...], dict]:
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
    return tuple(records[s] for s in range(spec.shards)), {
        "rows": sum(s["rows"] for s in stats), "indexed": sum(s["indexed"] for s in stats),
        "skipped": merge_skipped(s["skipped"] for s in stats),
        "skipped_examples": [p for s in stats for p in s["skipped_ids"]][:20]}


def run(cfg: BuildConfig, beam_args: list[str] | None = None) -> release.Released:
    _check(cfg)
    timer, retries = StageTimer(), storage.retry_count()
    with timer.stage("validate"):
        manifest = emb.read_manifest(cfg.embeddings, cfg.manifest_name)
        photos = cfg.photos if validate_parts(cfg.embeddings, manifest) else None
        pointer, token = iv.read_latest(cfg.out)  # we publish only over what we started from
        alpha = fuse_alpha(manifest) if cfg.vector == "fused" else 0.5
        n, d = manifest.encoded, manifest.model.d
        if photos in ("main", "pooled"):  # one vector per product, not per photo
            n = emb.count_products(cfg.embeddings, manifest)
        params = choose(n, d, cfg.max_index_memory, cfg.factory, cfg.train_size)
    src = release.Source(cfg.embeddings, manifest, cfg.vector, alpha, photos)
    version = iv.new_version()
    vdir = iv.version_uri(cfg.out, version)
    with timer.stage("sample"):
        train, held, held_ids = release.sample_vectors(src, n, params.train_size, cfg.eval_queries, cfg.seed)
    with timer.stage("train"):
        index, train_info = train_index(train, params, cfg.seed)
        trained = codec.serialize(index)
        storage.write_bytes(storage.join(vdir, "trained.index"), trained)
    spec = BuildSpec(cfg.embeddings, vdir, cfg.shards, cfg.vector, alpha, manifest.model, manifest.dtype, cfg.metadata,
                     photos or DEFAULT_MODE)
    with timer.stage("beam"):
        _run_beam(spec, manifest.parts, beam_args or [], cfg.stall_timeout)
    with timer.stage("collect"):
        shard_records, counts = _collect(spec, trained)
    draft = release.VersionDraft(out=cfg.out, version=version, parent=pointer.version if pointer else None,
                                 token=token, params={**params.to_dict(), "d": d, "metric": "L2 on unit vectors"},
                                 trained=trained, training=train_info, shards=shard_records, counts=counts)
    released = release.finish_version(draft, src, cfg.gate, held, held_ids, timer)
    # the DirectRunner runs the DoFns in this process; other runners' workers retry on their own
    released.report["storage_retries"] = {"driver": storage.retry_count() - retries}
    return released
