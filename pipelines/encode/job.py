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
import socket
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import ray

from mimdex.encoders.bundle import load_bundle
from mimdex.infra import storage
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.errors import TransientError, UsageError
from mimdex.infra.reaper import Reaper
from mimdex.pipelines.encode import commits, stream
from mimdex.pipelines.encode.config import DecodeSpec, EncodeConfig
from mimdex.pipelines.encode.plan import plan_units
from mimdex.pipelines.report import StageTimer

log = logging.getLogger(__name__)

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
            _reachable(address)
            ray.init(address=address, **common)
        else:
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            reaper = Reaper()
            with loopback_only():
                # address="local": a new instance even when another Ray runs on this machine
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **common)
            return reaper
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TransientError(f"cannot start or join Ray (--ray-address {address or 'embedded'}): {exc}") from exc
    return True


def _reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a head that does not answer: ray.init waits for a GCS at a closed port
    for longer than 5 minutes (measured). ``auto`` and addresses without a port are Ray's."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {hostport} within {timeout:g} s ({exc})") from exc


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Every process of an embedded Ray on 127.0.0.1. Ray's single-machine mode (the
    default on macOS and Windows, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) takes the loopback
    address as the node's; on Linux it is off by default, and Ray then listens on all
    interfaces. Its setting is read at import, so the module constant is set for the
    start, and the variable for the processes Ray spawns."""
    from ray._private import ray_constants

    saved, env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = env


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


def _warm_decoder() -> None:
    importlib.import_module("mimdex.pipelines.encode.decode")  # PIL, tokenizers, pyarrow


def run(cfg: EncodeConfig, on_commit=None) -> EncodeResult:
    """Encode the catalog into ``cfg.out``; returns the report. ``on_commit(record)`` is
    called in the driver after each unit's marker is written (progress hooks, tests)."""
    _check(cfg)
    timer, retries = StageTimer(), storage.retry_count()
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
                      tokenizer_json=encoder.tokenizer.to_str(), context_length=encoder.cfg.text.token_limit,
                      model_sha256=model.sha256, catalog_root=facts["root"],
                      image_column=facts["image_column"], fetch_threads=cfg.fetch_threads,
                      jpeg_draft=encoder.cfg.image.jpeg_draft, gpu_jpeg=cfg.gpu_decode, reuse=cfg.reuse)
    del encoder
    records, failures, sizing, device, flow = dict(done), [], None, None, None
    decode_path = None
    seconds: Counter[str] = Counter()
    started, actors = False, []
    try:
        if todo:
            with timer.stage("ray_start"):
                started = _start_ray(cfg.ray_address, load_runtime_env(cfg.runtime_env))
                sizing = stream.sizing(cfg)
                actors = stream.make_actors(cfg, sizing, model.sha256)
                # decode workers import their libraries while the actors load the model,
                # instead of the first units waiting for both in turn
                warm = [ray.remote(num_cpus=cfg.decode_cpus)(_warm_decoder).remote()
                        for _ in range(min(sizing["decode_slots"], len(todo)))]
                try:
                    device = ray.get(actors[0].device_name.remote(), timeout=cfg.stall_timeout)
                    if cfg.gpu_decode:  # said once, here and in the report, never a silent fallback
                        decode_path = ray.get(actors[0].decoder.remote(), timeout=cfg.stall_timeout)
                        if not decode_path.startswith("gpu"):
                            print(f"mimdex encode: warning: --gpu-decode: decode: {decode_path}", file=sys.stderr)
                except ray.exceptions.GetTimeoutError as exc:
                    raise TransientError(f"no encoder actor started within {cfg.stall_timeout:g} s "
                                         f"(--stall-timeout): each needs {sizing['actor_cpus']} CPU"
                                         f"{' and 1 GPU' if sizing['gpus'] else ''}; the cluster offers "
                                         f"{ray.cluster_resources()}") from exc
                ray.wait(warm, num_returns=len(warm), timeout=30)  # bounded: a starved cluster must not hang here
            with timer.stage("encode"):
                flow = stream.Stream(cfg, spec, model, actors, sizing, records, failures, seconds, on_commit)
                try:
                    flow.run(todo)
                finally:
                    actors = flow.actors  # after a re-size, the ones to stop
    finally:
        for actor in actors:  # named actors outlive the driver's handles otherwise
            ray.kill(actor)
        _stop_ray(started)
    report = {
        "catalog": cfg.catalog, "output": cfg.out, "model": model.to_json(), "dtype": cfg.dtype,
        "plan": {**facts, "units": len(units), "unit_rows": cfg.unit_rows},
        "sizing": flow.size if flow else sizing, "device": device,
        **({"decode": decode_path} if cfg.gpu_decode else {}),
        "resized": flow.resizes if flow else [],
        "nodes": {k: sorted(v) for k, v in flow.nodes.items()} if flow else {},
        "storage_retries": {"driver": storage.retry_count() - retries,
                            "workers": sum(records[n].retries for n in records if n not in done)},
        "counts": _counts(units, todo, records, failures),
        "recomputed_units": sorted(name for name in records if name not in done),
        "failed_units": failures,
        "seconds": timer.seconds, "task_seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if sizing and report["counts"]["read"]:
        report["throughput"] = stage_rates(report["counts"]["read"], seconds, report["sizing"])
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
    out = {
        "units": len(units), "units_skipped": len(skipped), "units_encoded": len(ran), "units_failed": len(failures),
        "read": sum(e.input_rows for e in ran),
        "encoded": sum(e.part.rows for e in ran),
        "rejected": sum(e.rejects.rows if e.rejects else 0 for e in ran),
        "skipped": sum(u.rows for u in skipped),
        "rejects_by_reason": dict(sum((Counter(e.reject_reasons) for e in ran), Counter())),
    }
    photos: Counter[str] = Counter()
    for u in todo:
        photos.update(records[u.name].photos if u.name in records else {})  # update keeps zero counts
    if photos:  # a multi-photo catalog: photos encoded, copied from --reuse, and cut beyond the bound
        out["photos"] = dict(photos)
    return out
