"""The driver's loop: size the job to the cluster, stream units through decode tasks,
encoder actors and write tasks, and keep going when the cluster changes under it.

    decode task (CPU)  ->  encoder actor (GPU/CPU)  ->  write task  ->  commit marker

A bounded window of units in flight is the backpressure. The loop never waits blindly:
it wakes every few seconds, and

* when the cluster lost CPUs (a node died) so that the actors' reservations leave no
  room to decode, it replaces the actors with ones sized to what is left and sends the
  units they held through again (writes are whole-object and idempotent, and a unit is
  committed once, by this driver);
* when no unit has been committed for ``stall_timeout`` seconds, it stops with exit 75
  and says what it was waiting for.
"""
from __future__ import annotations

import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import ray
from tqdm import tqdm

from mimdex.infra.errors import MimdexError, TransientError
from mimdex.pipelines.encode import commits
from mimdex.pipelines.encode.actors import EncoderActor
from mimdex.pipelines.encode.config import EncodeConfig, Unit
from mimdex.pipelines.encode.decode import decode_unit

ACTOR_NAME = "mimdex-encoder-{run}-{i}"  # unique per run: names of killed actors linger briefly
POLL_SECONDS = 2.0


def sizing(cfg: EncodeConfig) -> dict:
    """Actors and CPU split from what the cluster offers now (one actor per GPU)."""
    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    if gpus:
        actors, actor_cpus = min(cfg.encoders or gpus, gpus), 1
    else:
        # never so many actors that no CPU is left to decode (a shrunken cluster included).
        # A share may be fractional (--encoder-cpus beyond what the decode tasks leave, with
        # a fractional --decode-cpus): the actor runs the share rounded up as torch threads,
        # for a model that needs the cores more than the decode tasks beside it do.
        actors = max(1, min(cfg.encoders or 1, int(cpus - cfg.decode_cpus)))
        actor_cpus = max(1, min(cfg.encoder_cpus or cpus // (2 * actors), (cpus - cfg.decode_cpus) / actors))
        actor_cpus = int(actor_cpus) if float(actor_cpus).is_integer() else round(actor_cpus, 3)
    decode_slots = max(1, int((cpus - actors * actor_cpus) / cfg.decode_cpus + 1e-9))
    window = cfg.max_in_flight or decode_slots + 2 * actors
    return {"cpus": cpus, "gpus": gpus, "actors": actors, "actor_cpus": actor_cpus,
            "decode_slots": decode_slots, "window": window}


def make_actors(cfg: EncodeConfig, size: dict, sha: str) -> list:
    # SPREAD: actors (and decode tasks) go to different nodes, so one lost node costs one of them
    opts = {"max_restarts": cfg.max_attempts, "max_task_retries": cfg.max_attempts, "scheduling_strategy": "SPREAD"}
    opts.update(num_gpus=1, num_cpus=1) if size["gpus"] else opts.update(num_cpus=size["actor_cpus"])
    cls = ray.remote(EncoderActor)
    run = uuid.uuid4().hex[:8]
    return [cls.options(name=ACTOR_NAME.format(run=run, i=i), **opts).remote(
        cfg.model, sha, cfg.dtype, cfg.batch_size, math.ceil(size["actor_cpus"]), cfg.compile)
        for i in range(size["actors"])]


def failure(unit: Unit, exc: BaseException) -> dict:
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


@dataclass
class Stream:
    cfg: EncodeConfig
    spec: object
    model: object                  # ModelRef
    actors: list
    size: dict
    records: dict                  # unit name -> Commit
    failures: list
    seconds: dict                  # Counter of task seconds
    on_commit: object = None
    resizes: list = field(default_factory=list)
    nodes: dict = field(default_factory=lambda: {"decode": set(), "encode": set()})

    def run(self, todo: list[Unit]) -> None:
        cfg = self.cfg
        decode = ray.remote(num_returns=2, num_cpus=cfg.decode_cpus, scheduling_strategy="SPREAD")(decode_unit)
        write = ray.remote(num_cpus=0)(commits.write_unit)
        queue: deque[Unit] = deque(todo)
        decoding: dict = {}   # meta ref -> (unit, tensors ref)
        writing: dict = {}    # write ref -> (unit, actor)
        bar = tqdm(total=len(todo), unit="unit", disable=not cfg.progress, desc="encode", dynamic_ncols=True)
        t0 = last = time.perf_counter()
        products = 0
        try:
            while queue or decoding or writing:
                while queue and len(decoding) + len(writing) < self.size["window"]:
                    unit = queue.popleft()
                    meta_ref, tensors_ref = decode.remote(self.spec, unit)
                    decoding[meta_ref] = (unit, tensors_ref)
                ready, _ = ray.wait(list(decoding) + list(writing), num_returns=1, timeout=POLL_SECONDS)
                if not ready:
                    self._check_cluster(queue, writing)
                    self._check_stall(last, decoding, writing)
                    continue
                ref = ready[0]
                if ref in decoding:
                    unit, tensors_ref = decoding.pop(ref)
                    try:
                        ray.get(ref)  # surface a decode failure here, before encoding
                    except ray.exceptions.RayError as exc:
                        self.failures.append(failure(unit, exc))
                        bar.update(1)
                        continue
                    actor = min(self.actors, key=lambda a: sum(1 for _, b in writing.values() if b is a))
                    emb_ref = actor.encode.remote(tensors_ref)
                    writing[write.remote(cfg.out, unit, ref, emb_ref, self.model, cfg.dtype)] = (unit, actor)
                    continue
                unit, _ = writing.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    self.failures.append(failure(unit, exc))
                    bar.update(1)
                    continue
                commits.commit(cfg.out, record)
                self.records[unit.name] = record
                self.seconds.update(record.seconds)
                for stage, node in record.nodes.items():
                    self.nodes[stage].add(node)
                products += record.entry.part.rows
                last = time.perf_counter()
                bar.update(1)
                bar.set_postfix(products_s=f"{products / (last - t0):.0f}", refresh=False)
                if self.on_commit:
                    self.on_commit(record)
        finally:
            bar.close()

    def _check_cluster(self, queue: deque, writing: dict) -> None:
        """Re-size when the cluster shrank so far that decoding has no room left."""
        now = sizing(self.cfg)
        reserved = (self.size["actors"] * (1 if self.size["gpus"] else self.size["actor_cpus"]))
        if now["cpus"] >= self.size["cpus"] or reserved + self.cfg.decode_cpus <= now["cpus"]:
            return
        self.resizes.append({"at": time.strftime("%H:%M:%S"), "cpus": [self.size["cpus"], now["cpus"]],
                             "actor_cpus": [self.size["actor_cpus"], now["actor_cpus"]]})
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = make_actors(self.cfg, now, self.model.sha256)
        self.size = now
        for ref, (unit, _) in list(writing.items()):  # their actor is gone: encode them again
            del writing[ref]
            queue.appendleft(unit)

    def _check_stall(self, last: float, decoding: dict, writing: dict) -> None:
        waited = time.perf_counter() - last
        if waited < self.cfg.stall_timeout:
            return
        res, free = ray.cluster_resources(), ray.available_resources()
        raise TransientError(
            f"no unit committed for {waited:.0f} s (--stall-timeout {self.cfg.stall_timeout:g}): waiting for "
            f"{len(decoding)} decode task(s) (each needs {self.cfg.decode_cpus:g} CPU) and {len(writing)} "
            f"encode+write(s) on {len(self.actors)} actor(s) needing {self.size['actor_cpus']} CPU each; the "
            f"cluster has {res.get('CPU', 0):g} CPU ({free.get('CPU', 0):g} free) and {res.get('GPU', 0):g} GPU; "
            "committed units are kept, re-run to finish")
