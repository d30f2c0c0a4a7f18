"""The build-index launcher: validate, sample, train once, run the Beam graph, evaluate,
gate, publish. Every choice and measurement lands in the version's manifest and report.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mimdex.indexing import publish
from mimdex.indexing.evaluate import held_out_at, sweep
from mimdex.indexing.exact import ExactTopK
from mimdex.indexing.ids import ids_for
from mimdex.indexing.params import choose
from mimdex.indexing.reader import IndexReader
from mimdex.indexing.train import deserialize, serialize, train_index
from mimdex.indexing.vectors import KINDS, index_vectors, invalid_reasons
from mimdex.infra import storage
from mimdex.infra.errors import DataError, MimdexError, TransientError, UsageError
from mimdex.pipelines.build_index.graph import BUILD_DIR, BuildSpec, build_pipeline, encoded_lists, write_shard
from mimdex.pipelines.encode import shards as emb_shards
from mimdex.pipelines.report import StageTimer

log = logging.getLogger(__name__)


class QualityGateFailed(DataError):
    """The built index is below --min-recall: it is kept but not published."""


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
    manifest_name: str = "manifest.json"  # refresh builds from a composite manifest beside it


def _check(cfg: BuildConfig) -> None:
    if cfg.shards < 1:
        raise UsageError("--shards must be at least 1")
    if cfg.vector not in KINDS:
        raise UsageError(f"--vector must be one of {', '.join(KINDS)}")
    for name in ("recall_target", "min_recall"):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1")


def validate_parts(root: str, manifest: dict) -> None:
    """Refuse parts whose d, dtype or model differ from the manifest's (exit 65, named)."""
    want = {b"mimdex.d": str(manifest["model"]["d"]).encode(), b"mimdex.dtype": manifest["dtype"].encode(),
            b"mimdex.model_sha256": manifest["model"]["sha256"].encode()}
    bad = []
    for entry in manifest["parts"]:
        uri = storage.join(root, entry["part"]["file"])
        with storage.open_read(uri) as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        diffs = [f"{k.decode().split('.', 1)[1]} {meta.get(k, b'?').decode()} != {v.decode()}"
                 for k, v in want.items() if meta.get(k) != v]
        if diffs:
            bad.append(f"{uri} ({', '.join(diffs)})")
    if bad:
        raise DataError(f"embeddings {root}: {len(bad)} part(s) do not match the manifest's model/d/dtype: "
                        + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))


def _fuse_alpha(manifest: dict) -> float:
    config = storage.read_json(storage.join(manifest["model"]["uri"], "config.json"))
    return float(config["model"].get("fuse_alpha", 0.5))


def _blocks(cfg: BuildConfig, manifest: dict, alpha: float):
    """(vectors, ids, product_ids) of every usable row, part by part."""
    for entry in manifest["parts"]:
        fs, path = storage.resolve(storage.join(cfg.embeddings, entry["part"]["file"]))
        table = emb_shards.live_rows(pq.read_table(path, filesystem=fs), entry)
        v = index_vectors(table, cfg.vector, alpha)
        keep = invalid_reasons(v) == ""
        pids = [p for p, k in zip(table.column("product_id").to_pylist(), keep) if k]
        yield v[keep], ids_for(pids), pids


def sample_vectors(cfg: BuildConfig, manifest: dict, alpha: float, n: int, train_size: int):
    """Training sample and held-out evaluation vectors (disjoint), in one pass."""
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    n_eval = min(cfg.eval_queries, n // 5)  # held out of training (still indexed)
    train_size = min(train_size, n - n_eval)
    train_pos, eval_pos = np.sort(perm[:train_size]), np.sort(perm[train_size:train_size + n_eval])
    train, held, held_ids = [], [], []
    offset = 0
    for v, ids, _ in _blocks(cfg, manifest, alpha):
        sl = slice(offset, offset + len(v))
        t = train_pos[(train_pos >= sl.start) & (train_pos < sl.stop)] - offset
        e = eval_pos[(eval_pos >= sl.start) & (eval_pos < sl.stop)] - offset
        train.append(v[t])
        held.append(v[e])
        held_ids.append(ids[e])
        offset += len(v)
    return np.concatenate(train), np.concatenate(held), np.concatenate(held_ids)


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


def _run_beam(spec: BuildSpec, parts: list[dict], beam_args: list[str]) -> None:
    pipeline = beam_pipeline(beam_args)
    try:
        with pipeline as p:
            build_pipeline(p, spec, parts)
    except MimdexError:
        raise
    except Exception as exc:  # a DoFn's error comes back wrapped by the runner
        cause = exc
        while cause is not None and not isinstance(cause, MimdexError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise type(cause)(str(cause)) from exc
        for marker, cls in (("DataError", DataError), ("ObjectNotFound", DataError), ("StorageFailure", TransientError)):
            if marker in str(exc):
                raise cls(f"build-index Beam job failed: {str(exc).strip().splitlines()[-1]}") from exc
        raise


def _collect(spec: BuildSpec, trained: bytes) -> tuple[list[dict], dict]:
    build = storage.join(spec.version_dir, BUILD_DIR)
    records = {r["shard"]: r for r in (storage.read_json(u) for u in storage.list_files(build, ".json"))
               if "shard" in r}
    stats = [storage.read_json(u) for u in storage.list_files(build, ".json") if u.rsplit("/", 1)[-1].startswith("stats-")]
    index = deserialize(trained)
    for shard in range(spec.shards):  # a shard no product hashed to is still a valid, empty index
        if shard not in records:
            empty = pa.table({"id": pa.array([], pa.int64()), "product_id": pa.array([], pa.string())})
            ivf = faiss.extract_index_ivf(index)
            blob = encoded_lists(ivf.nlist, ivf.code_size, np.zeros(0, np.int64), np.zeros(0, np.int64),
                                 np.zeros((0, ivf.code_size), np.uint8))
            records[shard] = write_shard(spec, shard, blob, 0, empty)
    skipped: dict[str, int] = {}
    for s in stats:
        for reason, count in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    return [records[s] for s in range(spec.shards)], {
        "rows": sum(s["rows"] for s in stats), "indexed": sum(s["indexed"] for s in stats),
        "skipped": skipped, "skipped_examples": [p for s in stats for p in s["skipped_ids"]][:20]}


def _street_queries(cfg: BuildConfig, manifest: dict, limit: int = 2000) -> tuple[np.ndarray, list[str]]:
    from mimdex.encoders.bundle import load_bundle

    enc = load_bundle(manifest["model"]["uri"])
    if enc.sha256 != manifest["model"]["sha256"]:
        raise DataError(f"model {manifest['model']['uri']} is not the model the embeddings were made with")
    table = storage.parquet_dataset(cfg.queries).to_table()
    if "kind" in table.column_names:
        import pyarrow.compute as pc
        table = table.filter(pc.equal(table["kind"], "street"))
    table = table.slice(0, limit)
    images = table.column("query_image").to_pylist()
    if cfg.vector == "image" or "query_text" not in table.column_names:
        vectors = enc.encode_images(images)
    elif cfg.vector == "text":
        vectors = enc.encode_texts(table.column("query_text").to_pylist())
    else:
        vectors = enc.encode_queries(images, table.column("query_text").to_pylist())
    return vectors.astype(np.float32), table.column("product_id").to_pylist()


def run(cfg: BuildConfig, beam_args: list[str] | None = None) -> dict:
    _check(cfg)
    timer = StageTimer()
    with timer.stage("validate"):
        manifest = emb_shards.read_manifest(cfg.embeddings, cfg.manifest_name)
        validate_parts(cfg.embeddings, manifest)
        parent, token = publish.read_latest(cfg.out)  # we publish only over what we started from
        alpha = _fuse_alpha(manifest) if cfg.vector == "fused" else 0.5
        n, d = manifest["counts"]["encoded"], manifest["model"]["d"]
        params = choose(n, d, cfg.max_index_memory, cfg.factory, cfg.train_size)
    version = publish.new_version()
    vdir = publish.version_uri(cfg.out, version)
    with timer.stage("sample"):
        train, held, held_ids = sample_vectors(cfg, manifest, alpha, n, params.train_size)
    with timer.stage("train"):
        index, train_info = train_index(train, params, cfg.seed)
        trained = serialize(index)
        storage.write_bytes(storage.join(vdir, "trained.index"), trained)
    spec = BuildSpec(cfg.embeddings, vdir, cfg.shards, cfg.vector, alpha, cfg.metadata)
    with timer.stage("beam"):
        _run_beam(spec, manifest["parts"], beam_args or [])
    with timer.stage("collect"):
        shard_records, counts = _collect(spec, trained)
    draft = VersionDraft(cfg=cfg, embeddings=manifest, alpha=alpha, version=version, parent=parent, token=token,
                         params={**params.to_dict(), "d": d, "metric": "L2 on unit vectors"},
                         trained=trained, training=train_info, shards=shard_records, counts=counts)
    return finish_version(draft, held, held_ids, timer)


@dataclass
class VersionDraft:
    """An index version whose shards are written: what finish_version needs to evaluate,
    gate and publish it (build-index and refresh both end here)."""

    cfg: BuildConfig
    embeddings: dict          # the embeddings manifest the version indexes
    alpha: float
    version: str
    parent: str | None        # LATEST when the job started ...
    token: str | None         # ... and its version token for the conditional replace
    params: dict
    trained: bytes
    training: dict
    shards: list[dict]
    counts: dict


def finish_version(draft: VersionDraft, held: np.ndarray, held_ids: np.ndarray, timer: StageTimer,
                   extra: dict | None = None) -> dict:
    cfg, version = draft.cfg, draft.version
    vdir = publish.version_uri(cfg.out, version)
    trained_rec = {"file": "trained.index", "sha256": hashlib.sha256(draft.trained).hexdigest(),
                   "bytes": len(draft.trained)}
    with timer.stage("evaluate"):
        reader = IndexReader(vdir, {"version": version, "params": draft.params, "shards": draft.shards,
                                    "default_nprobe": 1, "trained": trained_rec})
        evaluation = _evaluate(cfg, draft.embeddings, draft.alpha, reader, held, held_ids, draft.params["nlist"])
    default_nprobe = evaluation["held_out"]["default_nprobe"] if "held_out" in evaluation else 1
    at_default = held_out_at(evaluation, default_nprobe)
    report = {
        "embeddings": cfg.embeddings, "index_root": cfg.out, "version": version, "parent": draft.parent,
        "vector": cfg.vector, "model": draft.embeddings["model"], "params": draft.params, "training": draft.training,
        "counts": {**draft.counts, "shards": {r["name"]: r["ntotal"] for r in draft.shards}},
        "evaluation": evaluation, "default_nprobe": default_nprobe, "seconds": timer.seconds,
        "index_bytes": sum(r["index"]["bytes"] for r in draft.shards) + len(draft.trained), **(extra or {}),
    }
    report["bytes_per_vector"] = round(report["index_bytes"] / max(draft.counts["indexed"], 1), 2)
    gate = cfg.min_recall
    if gate is not None and at_default.get("recall@10", 0.0) < gate:
        report["published"] = False
        report["why_not_published"] = (f"recall@10 {at_default.get('recall@10')} at nprobe {default_nprobe} is "
                                       f"below --min-recall {gate}")
        storage.write_json(storage.join(vdir, "report.json"), report)
        raise QualityGateFailed(f"{report['why_not_published']}; version {version} is kept at {vdir} "
                                "but not published")
    storage.write_json(storage.join(vdir, "report.json"), report)
    publish.write_manifest(cfg.out, version, {
        "version": version, "model": draft.embeddings["model"], "vector": cfg.vector, "fuse_alpha": draft.alpha,
        "factory": draft.params["factory"], "params": draft.params, "training": draft.training,
        "default_nprobe": default_nprobe, "recall_target": cfg.recall_target,
        "shards": draft.shards, "trained": trained_rec,
        "embeddings": {"uri": cfg.embeddings, "manifest_created_at": draft.embeddings.get("created_at"),
                       "parts": len(draft.embeddings["parts"])},
        "counts": report["counts"], "evaluation": evaluation, "parent": draft.parent,
    })
    with timer.stage("publish"):
        try:
            publish.point_latest(cfg.out, version, draft.token, draft.parent)
        except storage.ConcurrentUpdate as exc:
            now, _ = publish.read_latest(cfg.out)
            raise storage.ConcurrentUpdate(
                f"another publisher replaced {publish.latest_uri(cfg.out)} (it now names {now}) after this job "
                f"started from {draft.parent}; version {version} is complete but not published") from exc
    report["published"] = True
    report["seconds"] = timer.seconds
    return report


def _evaluate(cfg, manifest, alpha, reader: IndexReader, held, held_ids, nlist) -> dict:
    out: dict = {}
    queries = {"held_out": (held, held_ids)}
    street_pids = None
    if cfg.queries:
        vectors, street_pids = _street_queries(cfg, manifest)
        queries["street"] = (vectors, None)
    exact = {name: ExactTopK(q, 1, ex) for name, (q, ex) in queries.items() if len(q)}
    for v, ids, _ in _blocks(cfg, manifest, alpha):
        for acc in exact.values():
            acc.add(v, ids)
    for name, acc in exact.items():
        q, ex = queries[name]
        truth = acc.result()[1][:, 0]
        rows, chosen = sweep(lambda x, k, p: reader.search(x, k, p), q, truth, nlist, cfg.recall_target, ex)
        out[name] = {"queries": len(q), "sweep": rows, "default_nprobe": chosen}
    if street_pids is not None and "street" in exact:
        want = ids_for(street_pids)
        nprobe = out.get("held_out", out["street"])["default_nprobe"]
        _, found = reader.search(queries["street"][0], 100, nprobe)
        out["street"]["product_recall"] = {f"recall@{k}": round(float((found[:, :k] == want[:, None]).any(1).mean()), 4)
                                           for k in (1, 10, 100)}
    return out
