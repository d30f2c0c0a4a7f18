"""Operators racing on one index root, as processes: refresh, compact, rollback, retention
(`versions --prune`), backfill and readers (`search`) started together at seeded random
offsets against one index in the local S3 server, some killed mid-race (SIGKILL), then
the invariants every trial must keep. Used by tests/test_racing.py (make test) and
tests/benchmarks/bench_racing.py (more trials, with kills).

Which operations take the refresh lease (``<index>/_locks/refresh.json``): refresh and
backfill, because both read the embeddings manifest, encode into the embeddings root and
then move its manifest: two of them interleaved would each write a manifest that drops
the other's parts. compact, rollback and retention take no lease: each changes only the
index, compact and rollback through the conditional LATEST write (so of a refresh and a
compact that started on the same version, exactly one publishes and the other exits 75 with
its complete version unpublished), and retention deletes only what no kept version
references, keeping LATEST's version, the one it replaced and anything younger than
--grace-hours.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import dirty_catalog as dc
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.infra.contracts import index_version as iv

MIMDEX = [sys.executable, "-m", "mimdex.pipelines.cli"]
OPS = ("refresh", "compact", "rollback", "retention", "backfill", "search", "search")


@dataclass
class World:
    root: str           # bucket prefix: cat/, model/, emb/, index/
    rows: list[dict]    # the catalog as it is now
    query: str          # a local JPEG for the readers
    env: dict
    next_id: int = 0

    @property
    def index(self) -> str:
        return self.root + "/index"


@dataclass
class Trial:
    seed: int
    codes: dict = field(default_factory=dict)     # op -> exit code (None: killed)
    killed: list = field(default_factory=list)
    read_versions: list = field(default_factory=list)
    latest: str | None = None
    violations: list = field(default_factory=list)
    seconds: float = 0.0


def _argv(world: World, op: str, ids_file: str, rollback_to: str | None) -> list[str]:
    common = ["--catalog", world.root + "/cat/catalog.parquet", "--model", world.root + "/model",
              "--embeddings", world.root + "/emb", "--index", world.index, "--unit-rows", "40",
              "--eval-queries", "20", "--grace-hours", "0", "--keep", "2", "--no-progress"]
    return {"refresh": ["refresh", *common],
            "backfill": ["backfill", "--ids", ids_file, *common],
            "compact": ["compact", "--index", world.index],
            "rollback": ["rollback", "--index", world.index, "--to", rollback_to or "none"],
            "retention": ["versions", "--index", world.index, "--prune", "--keep", "2", "--grace-hours", "0"],
            "search": ["search", "--index", world.index, "--image", world.query, "-k", "5", "--json"]}[op]


def make_world(bucket: str, model_src: str, tmp: str, products: int = 120) -> World:
    from mimdex.pipelines import cli

    rows = dc.write_kinds(bucket + "/cat", ["plain"] * products, row_group_size=40)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        storage.write_bytes(f"{bucket}/model/{name}", storage.read_bytes(f"{model_src}/{name}"))
    query = os.path.join(tmp, "query.jpg")
    with open(query, "wb") as f:
        f.write(dc.picture(7))
    world = World(bucket, rows, query, dict(os.environ), next_id=products)
    common = ["--catalog", bucket + "/cat/catalog.parquet", "--model", bucket + "/model", "--embeddings",
              bucket + "/emb", "--index", world.index, "--shards", "2", "--unit-rows", "40", "--eval-queries", "20",
              "--no-progress"]
    assert cli.main(["refresh", *common]) == 0   # the first refresh builds v1
    _edit(world, 0, retitle=4, add=0)
    assert cli.main(["refresh", *common]) == 0   # a delta segment, so compact has work
    return world


def _edit(world: World, trial: int, retitle: int, add: int) -> tuple[list[str], list[str]]:
    """Retitle ``retitle`` products and add ``add`` new ones; (retitled ids, added ids)."""
    rng = random.Random(trial)
    changed = rng.sample(range(len(world.rows)), retitle)
    for i in changed:
        world.rows[i]["title"] = f"product {world.rows[i]['product_id']} retitled in trial {trial}".encode()
    added = []
    objects = {}
    for _ in range(add):
        r, objs, _ = dc.row("plain", f"P{world.next_id:04d}", world.next_id)
        world.next_id += 1
        world.rows.append(r)
        objects.update(objs)
        added.append(r["product_id"])
    dc.write(world.root + "/cat", world.rows, objects, row_group_size=40)
    return [world.rows[i]["product_id"] for i in changed], added


def _titles(world: World) -> dict[str, str]:
    """product_id -> title of every product in the version LATEST names."""
    idmap = IndexReader.open(world.index).idmap
    titles = idmap.column("title").to_pylist()
    return dict(zip(idmap.column("product_id").to_pylist(),
                    (t.decode() if isinstance(t, bytes) else t for t in titles)))


def run_trial(world: World, seed: int, kill: bool = False, timeout: float = 600) -> Trial:
    """One race; the invariants it broke are in ``violations``."""
    trial = Trial(seed)
    rng = random.Random(seed)
    retitled, added = _edit(world, seed, retitle=3, add=2)
    ids_file = os.path.join(os.path.dirname(world.query), f"ids-{seed}.txt")
    with open(ids_file, "w") as f:
        f.write("\n".join(added) + "\n")
    complete = [v for v in iv.list_versions(world.index) if iv.is_complete(world.index, v)]
    before = iv.latest_version(world.index)
    rollback_to = next((v for v in reversed(complete) if v != before), before)
    schedule = sorted((rng.uniform(0, 4), op) for op in OPS)
    victim = rng.choice([op for _, op in schedule if op != "search"]) if kill else None
    t0 = time.monotonic()
    procs = []
    for i, (start, op) in enumerate(schedule):
        time.sleep(max(0.0, start - (time.monotonic() - t0)))
        procs.append((f"{op}#{i}", op, subprocess.Popen(MIMDEX + _argv(world, op, ids_file, rollback_to),
                                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                         text=True, env=world.env)))
        if op == victim:
            time.sleep(rng.uniform(2, 8))
            procs[-1][2].send_signal(signal.SIGKILL)
            trial.killed.append(procs[-1][0])
    outputs = {}
    for name, op, proc in procs:
        out, err = proc.communicate(timeout=timeout)
        trial.codes[name] = None if name in trial.killed else proc.returncode
        outputs[name] = (out, err)
        if op == "search" and proc.returncode == 0:
            trial.read_versions.append(json.loads(out)["version"])
    trial.seconds = time.monotonic() - t0
    _check(world, trial, outputs, retitled, added)
    return trial


def _check(world: World, trial: Trial, outputs: dict, retitled: list[str], added: list[str]) -> None:
    bad = trial.violations
    for name, code in trial.codes.items():
        op = name.split("#")[0]
        allowed = {0} if op == "search" else {0, 75, 99}
        if op == "rollback" and any(why in outputs[name][1] for why in ("no such version", "is incomplete",
                                                                         "cannot be served")):
            allowed.add(2)  # retention removed its target (or a file it uses) before it looked: nothing changed
        if code is not None and code not in allowed:
            bad.append(f"{name} exited {code}: {outputs[name][1].strip().splitlines()[-1:]}")
    # LATEST names a complete version, and it and the one it replaced open with every file verified
    pointer, _ = iv.read_latest(world.index)
    trial.latest = pointer.version
    for version in {pointer.version, pointer.previous} - {None}:
        try:
            IndexReader.open(world.index, version=version)
        except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
            bad.append(f"version {version} (LATEST or the one it replaced) does not open: {exc}")
    # Nothing half-written is visible: LATEST (above) and every version a reader served
    # (the readers exited 0). A refresh that lost the LATEST race keeps its complete version
    # unpublished; if LATEST moved twice while it was built, retention may have removed its
    # parent's files, which is why rollback verifies every file before serving a version.
    # no refresh's change silently lost, unless an operator rolled back after it
    refreshed = any(n.startswith("refresh") and c == 0 for n, c in trial.codes.items())
    rolled = any(n.startswith("rollback") and c == 0 for n, c in trial.codes.items())
    if refreshed and not rolled:
        titles = _titles(world)
        lost = [p for p in retitled if titles.get(p) != next(r["title"].decode() for r in world.rows
                                                                if r["product_id"] == p)]
        if lost:
            bad.append(f"refresh exited 0 but LATEST {pointer.version} lacks its changes to {lost}")


def converge(world: World) -> list[str]:
    """A serial re-run (a refresh; a second one must find nothing) brings LATEST to the
    catalog: every product with its current title. Returns what still differs."""
    argv = MIMDEX + _argv(world, "refresh", "", None)
    codes = [subprocess.run(argv, capture_output=True, text=True, env=world.env, timeout=600) for _ in range(2)]
    problems = [f"re-run refresh exited {c.returncode}: {c.stderr.strip().splitlines()[-1:]}"
                for c in codes[:1] if c.returncode not in (0, 99)]
    if codes[1].returncode != 99:
        problems.append(f"a second re-run exited {codes[1].returncode}, not 99 (nothing changed)")
    titles = _titles(world)
    want = {r["product_id"]: r["title"].decode() for r in world.rows}
    if titles != want:
        problems.append(f"{len(set(want.items()) ^ set(titles.items()))} products differ from the catalog")
    return problems
