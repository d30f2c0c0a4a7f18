"""The encode driver: plan, skip what is committed, stream the rest through Ray, commit.

    decode task (CPU)  ->  encoder actor (GPU/CPU)  ->  write task  ->  commit marker
     per unit, as many      least-loaded actor;         part + rejects   written by the
     as CPUs allow          Ray restarts dead ones      written whole    driver, in order
                                                                         of completion
A bounded window of units in flight is the backpressure: decoding runs ahead of the
encoders by at most that many units, so the object store holds a few units, not the
catalog. manifest.json is written last, only when every unit of the plan is committed.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator

import ray
from tqdm import tqdm

from mimdex.encoders.bundle import load_bundle
from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.errors import MimdexError, TransientError, UsageError
from mimdex.infra.reaper import Reaper
from mimdex.pipelines.encode import commits
from mimdex.pipelines.encode.actors import EncoderActor
from mimdex.pipelines.encode.config import DecodeSpec, EncodeConfig, Unit
from mimdex.pipelines.encode.decode import decode_unit
from mimdex.pipelines.encode.plan import plan_units
from mimdex.pipelines.report import StageTimer

log = logging.getLogger(__name__)

ACTOR_NAME = "mimdex-encoder-{run}-{i}"  # unique per run: names of killed actors linger briefly
RAY_NAMESPACE = "mimdex"


@dataclass(frozen=True)
class EncodeResult:
    """What an encode run did, for its callers (the CLI, refresh, the demo); ``report``
    is the whole JSON report."""

    complete: bool
    rows: int                   # catalog rows in the plan
    units: int
    units_skipped: int          # already committed by an earlier run
    rows_read: int              # rows this run decoded
    encoded: int                # products in the embeddings root (every unit)
    rejected: int
    failed_units: tuple[dict, ...]
    report: dict


def _check(cfg: EncodeConfig) -> None:
    if cfg.dtype not in emb.DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(emb.DTYPES)}, not {cfg.dtype!r}")
    for flag in ("unit_rows", "batch_size", "max_attempts", "fetch_threads"):
        if getattr(cfg, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if cfg.decode_cpus <= 0:
        raise UsageError("--decode-cpus must be positive")


def load_runtime_env(uri: str | None) -> dict | None:
    """A Ray runtime env from a YAML/JSON file (infra/ray/runtime_env.yaml), checked by Ray."""
    if not uri:
        return None
    import yaml
    from ray.runtime_env import RuntimeEnv

    try:
        env = yaml.safe_load(storage.read_bytes(uri))
        if not isinstance(env, dict):
            raise ValueError("expected a mapping of runtime env fields")
        RuntimeEnv(**env)  # Ray's own validation of the fields
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise UsageError(f"--runtime-env {uri}: {exc}") from exc
    return env


def _start_ray(address: str | None, runtime_env: dict | None = None) -> Reaper | bool:
    """Join ``address``, or start an embedded local Ray sized to this machine.
    Returns whether we connected (and so must shut down): for an embedded Ray, the
    reaper that stops its processes should this driver be killed."""
    if ray.is_initialized():  # a caller (a test, the demo, a notebook) already set Ray up
        return False
    common = {"namespace": RAY_NAMESPACE, "logging_level": logging.WARNING, "log_to_driver": True}
    if runtime_env:
        common["runtime_env"] = runtime_env
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # Ray 2.60's gcs_server and raylet listen on all interfaces and have no
            # loopback-only option; its token authentication (on by default) is what
            # refuses other hosts, and the cluster lives only as long as this driver.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            reaper = Reaper()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **common)
            return reaper
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TransientError(f"cannot start or join Ray (--ray-address {address or 'embedded'}): {exc}") from exc
    return True


def _stop_ray(started: Reaper | bool) -> None:
    if started:
        ray.shutdown()
        if isinstance(started, Reaper):
            started.done()


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Ray for several encode runs in one process (the demo): every ``run`` inside
    joins this session instead of starting and stopping its own."""
    started = _start_ray(address)
    try:
        yield
    finally:
        _stop_ray(started)


def _sizing(cfg: EncodeConfig) -> dict:
    """Actors and CPU split from what the cluster offers (one actor per GPU)."""
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    if gpus:
        actors, actor_cpus = cfg.encoders or gpus, 1
    else:
        actors = cfg.encoders or 1
        actor_cpus = cfg.encoder_cpus or max(1, cpus // (2 * actors))
    decode_slots = max(1, int((cpus - (actors * actor_cpus if not gpus else actors)) // cfg.decode_cpus))
    window = cfg.max_in_flight or decode_slots + 2 * actors
    return {"cpus": cpus, "gpus": gpus, "actors": actors, "actor_cpus": actor_cpus,
            "decode_slots": decode_slots, "window": window}


def _actors(cfg: EncodeConfig, sizing: dict, sha: str) -> list:
    opts = {"max_restarts": cfg.max_attempts, "max_task_retries": cfg.max_attempts}
    if sizing["gpus"]:
        opts.update(num_gpus=1, num_cpus=1)
    else:
        opts.update(num_cpus=sizing["actor_cpus"])
    cls = ray.remote(EncoderActor)
    run = uuid.uuid4().hex[:8]
    return [cls.options(name=ACTOR_NAME.format(run=run, i=i), **opts).remote(
        cfg.model, sha, cfg.dtype, cfg.batch_size, sizing["actor_cpus"], cfg.compile) for i in range(sizing["actors"])]


def _warm_decoder() -> None:
    importlib.import_module("mimdex.pipelines.encode.decode")  # PIL, tokenizers, pyarrow


def _failure(unit: Unit, exc: BaseException) -> dict:
    """A failed unit for the report; a bug in our own code is re-raised with its trace."""
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else exc
    if isinstance(cause, MimdexError):
        err = cause
    elif isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(cause, ray.exceptions.RayError):
        raise exc
    else:  # a lost actor or worker after Ray's retries, a lost object
        err = TransientError(f"{unit.name} ({unit.file} row groups {list(unit.row_groups)}): "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return {"unit": unit.name, "exit_code": err.exit_code, "error": str(err)}


def run(cfg: EncodeConfig, on_commit=None) -> EncodeResult:
    """Encode the catalog into ``cfg.out``; returns the report. ``on_commit(record)`` is
    called in the driver after each unit's marker is written (progress hooks, tests)."""
    _check(cfg)
    timer = StageTimer()
    with timer.stage("plan"):
        encoder = load_bundle(cfg.model)  # verifies the checksum once, before any work
        model = ModelRef(uri=cfg.model, sha256=encoder.sha256, variant=encoder.cfg.variant,
                         d=encoder.cfg.embed_dim, has_text=encoder.model.has_text)
        units, facts = plan_units(cfg.catalog, cfg.unit_rows)
        markers = commits.committed(cfg.out)
        done = {u.name: markers[u.name] for u in units
                if commits.still_valid(cfg.out, markers.get(u.name), u, model.sha256, cfg.dtype)}
        todo = [u for u in units if u.name not in done]
    manifest_uri = emb.manifest_uri(cfg.out)
    if todo and storage.exists(manifest_uri):
        storage.delete(manifest_uri)  # the root is about to change: not complete until the end
    spec = DecodeSpec(image_size=encoder.cfg.image.image_size, has_text=encoder.model.has_text,
                      tokenizer_json=encoder.tokenizer.to_str(), context_length=encoder.cfg.text.context_length,
                      model_sha256=model.sha256, catalog_root=facts["root"],
                      image_column=facts["image_column"], fetch_threads=cfg.fetch_threads,
                      jpeg_draft=encoder.cfg.image.jpeg_draft, gpu_jpeg=cfg.gpu_decode)
    del encoder
    records, failures, sizing, device = dict(done), [], None, None
    seconds: Counter[str] = Counter()
    started, actors = False, []
    try:
        if todo:
            with timer.stage("ray_start"):
                started = _start_ray(cfg.ray_address, load_runtime_env(cfg.runtime_env))
                sizing = _sizing(cfg)
                actors = _actors(cfg, sizing, model.sha256)
                # decode workers import their libraries while the actors load the model,
                # instead of the first units waiting for both in turn
                warm = [ray.remote(num_cpus=cfg.decode_cpus)(_warm_decoder).remote()
                        for _ in range(min(sizing["decode_slots"], len(todo)))]
                device = ray.get(actors[0].device_name.remote())
                ray.get(warm)
            with timer.stage("encode"):
                _stream(cfg, spec, model, todo, actors, sizing, records, failures, seconds, on_commit)
    finally:
        for actor in actors:  # named actors outlive the driver's handles otherwise
            ray.kill(actor)
        _stop_ray(started)
    report = {
        "catalog": cfg.catalog, "output": cfg.out, "model": model.to_json(), "dtype": cfg.dtype,
        "plan": {**facts, "units": len(units), "unit_rows": cfg.unit_rows},
        "sizing": sizing, "device": device,
        "counts": _counts(units, todo, records, failures),
        "recomputed_units": sorted(name for name in records if name not in done),
        "failed_units": failures,
        "seconds": timer.seconds, "task_seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if sizing and report["counts"]["read"]:
        report["throughput"] = stage_rates(report["counts"]["read"], seconds, sizing)
    encoded_now = report["counts"]["encoded"]
    report["products_per_s"] = round(encoded_now / timer.seconds["encode"], 1) if todo and encoded_now else None
    counts = report["counts"]
    if failures:
        report["complete"] = False
        return EncodeResult(False, facts["rows"], len(units), counts["units_skipped"], counts["read"], 0, 0,
                            tuple(failures), report)
    if todo or not storage.exists(manifest_uri):
        with timer.stage("manifest"):
            report["removed_orphans"] = commits.remove_orphans(cfg.out, {u.name for u in units})
            emb.write_manifest(cfg.out, emb.build_manifest([records[u.name].entry for u in units], model,
                                                           cfg.dtype, cfg.catalog, cfg.unit_rows))
    report["complete"] = True
    report["manifest"] = manifest_uri
    totals = report["totals"] = emb.read_manifest(cfg.out).counts
    return EncodeResult(True, facts["rows"], len(units), counts["units_skipped"], counts["read"],
                        totals["encoded"], totals["rejected"], (), report)


def _stream(cfg, spec, model, todo, actors, sizing, records, failures, seconds, on_commit) -> None:
    decode = ray.remote(num_returns=2, num_cpus=cfg.decode_cpus)(decode_unit)
    write = ray.remote(num_cpus=0)(commits.write_unit)
    queue: deque[Unit] = deque(todo)
    decoding: dict = {}   # meta ref -> (unit, tensors ref)
    writing: dict = {}    # write ref -> (unit, actor index)
    load = [0] * len(actors)
    bar = tqdm(total=len(todo), unit="unit", disable=not cfg.progress, desc="encode", dynamic_ncols=True)
    t0, products = time.perf_counter(), 0
    try:
        while queue or decoding or writing:
            while queue and len(decoding) + len(writing) < sizing["window"]:
                unit = queue.popleft()
                meta_ref, tensors_ref = decode.remote(spec, unit)
                decoding[meta_ref] = (unit, tensors_ref)
            ready, _ = ray.wait(list(decoding) + list(writing), num_returns=1)
            ref = ready[0]
            if ref in decoding:
                unit, tensors_ref = decoding.pop(ref)
                try:
                    ray.get(ref)  # surface a decode failure here, before encoding
                except ray.exceptions.RayError as exc:
                    failures.append(_failure(unit, exc))
                    bar.update(1)
                    continue
                i = min(range(len(actors)), key=load.__getitem__)
                load[i] += 1
                emb_ref = actors[i].encode.remote(tensors_ref)
                writing[write.remote(cfg.out, unit, ref, emb_ref, model, cfg.dtype)] = (unit, i)
                continue
            unit, i = writing.pop(ref)
            load[i] -= 1
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as exc:
                failures.append(_failure(unit, exc))
                bar.update(1)
                continue
            commits.commit(cfg.out, record)
            records[unit.name] = record
            seconds.update(record.seconds)
            products += record.entry.part.rows
            bar.update(1)
            bar.set_postfix(products_s=f"{products / (time.perf_counter() - t0):.0f}", refresh=False)
            if on_commit:
                on_commit(record)
    finally:
        bar.close()


def stage_rates(rows: int, seconds: dict, sizing: dict) -> dict:
    """Products/s each stage could sustain with the slots it had (rows over summed task
    seconds, times its parallelism), and the one that bounds the pipeline."""
    busy = {"decode": seconds.get("read", 0) + seconds.get("decode", 0) + seconds.get("tokenize", 0),
            "transfer": seconds.get("transfer", 0), "model": seconds.get("encode", 0) + seconds.get("device_decode", 0),
            "write": seconds.get("write", 0)}
    # an actor copies, decodes JPEGs (--gpu-decode) and runs the model in turn: one slot each
    slots = {"decode": sizing["decode_slots"], "transfer": sizing["actors"], "model": sizing["actors"],
             "write": sizing["window"]}
    rates = {stage: round(rows / s * slots[stage], 1) for stage, s in busy.items() if s > 0}
    return {"products_per_s_by_stage": rates, "bound_by": min(rates, key=rates.get) if rates else None}


def _counts(units, todo, records, failures) -> dict:
    ran = [records[u.name].entry for u in todo if u.name in records]
    skipped = [u for u in units if u not in todo]
    return {
        "units": len(units), "units_skipped": len(skipped), "units_encoded": len(ran), "units_failed": len(failures),
        "read": sum(e.input_rows for e in ran),
        "encoded": sum(e.part.rows for e in ran),
        "rejected": sum(e.rejects.rows if e.rejects else 0 for e in ran),
        "skipped": sum(u.rows for u in skipped),
        "rejects_by_reason": dict(sum((Counter(e.reject_reasons) for e in ran), Counter())),
    }
