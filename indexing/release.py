"""Evaluate, gate and publish an index version whose shards are written: the end of
build-index and of refresh's incremental update alike.

    query sets (held-out sample, street queries) -> exact nearest neighbours (found by
      build-index's Beam job, or blockwise here) -> nprobe sweep -> default nprobe
      -> evaluation queries' recall (query_recall) -> --min-recall gate -> report.json
      -> manifest.json (create-only) -> LATEST (conditional)

Evaluation queries come as vectors (contracts.queries.QueryVectors): the job that
publishes loads the model and encodes them (encoders.queries); this layer never does.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mimdex.indexing.carried_search import CarriedSearch
from mimdex.indexing.evaluate import Ladder, held_out_at, one_at_a_time, sweep
from mimdex.indexing.exact import ExactTopK
from mimdex.indexing.query_recall import query_recall
from mimdex.indexing.reader import IndexReader, ShardLoader
from mimdex.indexing.sample import Sample, draw
from mimdex.indexing.shard_search import ShardSearch
from mimdex.infra import storage
from mimdex.infra.contracts import ground_truth, search_lists
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.embeddings import EmbeddingsManifest
from mimdex.infra.contracts.files import FileRef
from mimdex.infra.contracts.queries import QueryVectors
from mimdex.infra.contracts.vectors import usable_rows
from mimdex.infra.errors import DataError


# Evaluation loads the whole index (a consolidated IndexReader, the queries/s serving
# gets) up to this size, and above it holds one shard at a time (shard_search.py), so that
# a build's memory does not grow with its index: the consolidated 10M x SQ8 index made
# evaluation the build's peak, 5.0 GB against 2.3 GB for every other stage. Searching the
# shards one after another costs a few microseconds per probed list per shard more: at
# 10M in 4 shards, nprobe 16, 2,220 queries/s against 2,730 consolidated
# (docs/benchmarks.md). 1 GiB keeps the loaded reader below the Beam stage's own peak.
EVAL_LOADED_MAX_BYTES = 1 << 30


class QualityGateFailed(DataError):
    """The built index is below --min-recall: it is kept but not published."""


@dataclass(frozen=True)
class Source:
    """The embeddings a version indexes, and how rows become vectors."""

    root: str
    manifest: EmbeddingsManifest
    vector: str
    alpha: float
    photos: str | None = None        # a multi-photo catalog's photo mode (contracts.photos), else None


@dataclass(frozen=True)
class Gate:
    recall_target: float = 0.95
    min_recall: float | None = None
    queries: QueryVectors | None = None   # evaluation queries, encoded with the embeddings' model
    eval_queries: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class VersionDraft:
    """An index version whose shards are written, before evaluation and publishing."""

    out: str                         # index root
    version: str
    parent: str | None               # LATEST when the job started ...
    token: str | None                # ... and its version token for the conditional replace
    params: dict
    trained: bytes
    training: dict
    shards: tuple[iv.ShardEntry, ...]
    counts: dict
    deltas: tuple[iv.DeltaSegment, ...] = ()
    trained_file: str = "trained.index"    # "../<version>/trained.index": the codebooks a refresh reuses

    @property
    def trained_ref(self) -> FileRef:
        return FileRef(self.trained_file, hashlib.sha256(self.trained).hexdigest(), len(self.trained))

    def reader(self, default_nprobe: int = 1) -> IndexReader:
        return IndexReader(iv.version_uri(self.out, self.version), self.params, self.shards, self.trained_ref,
                           default_nprobe, deltas=self.deltas)

    def loader(self) -> ShardLoader:
        return ShardLoader(iv.version_uri(self.out, self.version), self.params, self.trained_ref, self.deltas,
                           held=self.trained)


@dataclass(frozen=True)
class Released:
    version: str
    published: bool
    default_nprobe: int
    evaluation: dict
    counts: dict
    report: dict


def _usable(src: Source, ids: bool = True):
    """(part name, UsableRows) of every part, in order (checksums verified)."""
    for entry in src.manifest.parts:
        yield entry.name, usable_rows(src.root, entry, src.manifest.model, src.manifest.dtype, src.vector,
                                      src.alpha, photo_mode=src.photos or "every", idmap=False, ids=ids)


def blocks(src: Source, ids: bool = True):
    """(part name, vectors, ids) of every usable row, part by part; with ``ids=False`` the
    third item hashes the ids of the rows it is given (sampling)."""
    for name, rows in _usable(src, ids):
        yield name, rows.vectors, rows.ids if ids else rows.ids_at


def keyed_blocks(src: Source):
    """(vectors, vector ids, product keys) of every usable row, part by part: one full pass
    for the ground truth (indexing.truth)."""
    for _, rows in _usable(src):
        yield rows.vectors, rows.ids, rows.product_keys


def sample_vectors(src: Source, n: int, train_size: int, eval_queries: int, seed: int = 0) -> Sample:
    """Training sample and held-out evaluation vectors (disjoint), in one streaming pass."""
    return draw(blocks(src, ids=False), n, train_size, eval_queries, src.manifest.model.d, seed)


@dataclass(frozen=True)
class QuerySet:
    name: str                        # held_out | street
    vectors: np.ndarray
    exclude: np.ndarray | None       # a held-out vector's own id, never its own neighbour


def query_sets(gate: Gate, held: np.ndarray, held_ids: np.ndarray) -> tuple[QuerySet, ...]:
    """The held-out vectors and the street queries, each swept against exact search."""
    sets = [QuerySet("held_out", held, held_ids)] if len(held) else []
    if gate.queries is not None and len(gate.queries.street):
        sets.append(QuerySet("street", gate.queries.street, None))
    return tuple(sets)


def stacked(sets: tuple[QuerySet, ...], d: int) -> tuple[np.ndarray, np.ndarray]:
    """All sets' queries in one matrix and their exclusions (-1: none), for one exact pass."""
    if not sets:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    return (np.concatenate([s.vectors for s in sets]).astype(np.float32),
            np.concatenate([s.exclude if s.exclude is not None else np.full(len(s.vectors), -1, np.int64)
                            for s in sets]))


def split_truth(sets: tuple[QuerySet, ...], nearest: np.ndarray) -> dict[str, np.ndarray]:
    bounds = np.cumsum([0] + [len(s.vectors) for s in sets])
    return {s.name: nearest[a:b] for s, a, b in zip(sets, bounds, bounds[1:])}


def exact_truth(src: Source, sets: tuple[QuerySet, ...]) -> dict[str, np.ndarray]:
    """Each set's exact nearest neighbours, by one blockwise pass over the embeddings
    (build-index finds them inside its Beam job instead; a refresh reads them here)."""
    queries, exclude = stacked(sets, src.manifest.model.d)
    if not len(queries):
        return {}
    acc = ExactTopK(queries, 1, exclude)
    for _, v, ids in blocks(src):
        acc.add(v, ids)
    return split_truth(sets, acc.result()[1][:, 0])


def default_nprobe_of(evaluation: dict) -> int:
    """The version's default nprobe: the held-out sweep's choice (1 without held-out vectors)."""
    return evaluation["held_out"]["default_nprobe"] if "held_out" in evaluation else 1


def evaluate(gate: Gate, search: Ladder, reader: Callable[[], IndexReader], sets: tuple[QuerySet, ...],
             truth: dict[str, np.ndarray], nlist: int, ladder: int = 1) -> dict:
    """The sweeps run on ``search`` (evaluate.sweep); ``reader()``, a loaded reader, serves
    only the evaluation queries' recall (query_recall), at the default nprobe."""
    out: dict = {}
    for s in sets:
        rows, chosen, why = sweep(search, s.vectors, truth[s.name], nlist, gate.recall_target, s.exclude, ladder)
        out[s.name] = {"queries": len(s.vectors), "sweep": rows, "default_nprobe": chosen, "why": why}
    if gate.queries is not None:
        nprobe = default_nprobe_of(out)
        # a product is found when any of its photos is (search_distinct maps photos to
        # products through the whole id map: a loaded reader)
        out["queries"] = query_recall(reader(), gate.queries, nprobe)
    return out


def held_bytes(shards, trained_bytes: int, params: dict) -> int:
    """What serving holds in memory: the lists, the trained index, and each vector's
    re-ranking codes (stored in the id maps, held beside the lists by the reader)."""
    return (sum(s.index.bytes for s in shards) + trained_bytes
            + int(params.get("refine_bytes") or 0) * sum(s.ntotal for s in shards))


def version_bytes(draft: VersionDraft) -> dict:
    """index_bytes: what serving holds (held_bytes); files_bytes: every file the version
    uses; written_bytes: those it wrote itself (a refresh that references its parent's
    files writes only its delta)."""
    shards = list(draft.shards) + [s for seg in draft.deltas for s in seg.shards]
    refs = [draft.trained_ref] + [r for s in shards for r in (s.index, s.ids)]
    refs += [seg.deleted for seg in draft.deltas if seg.deleted]
    return {"index_bytes": held_bytes(shards, len(draft.trained), draft.params),
            "files_bytes": sum(r.bytes for r in refs),
            "written_bytes": sum(r.bytes for r in refs if not r.file.startswith("../"))}


def finish_version(draft: VersionDraft, src: Source, gate: Gate, sets: tuple[QuerySet, ...], timer,
                   extra: dict | None = None, reader: IndexReader | None = None,
                   truth: dict[str, np.ndarray] | None = None,
                   kept: tuple[ground_truth.QueryTruth, ...] | None = None,
                   carried: CarriedSearch | None = None) -> Released:
    """``truth``: each query set's exact nearest neighbours when the caller found them
    (build-index's Beam job), else one blockwise pass over the embeddings finds them.
    ``kept``: the sets' exact neighbour lists (a refresh, indexing.truth): their nearest
    are the truth, and the version keeps them for the next refresh. ``carried``: the
    sweep's search from the previous version's lists (a refresh): the index is not
    loaded (but for --queries' product recall), and the version keeps the lists."""
    vdir = iv.version_uri(draft.out, draft.version)
    with timer.stage("evaluate"):
        if kept is not None:
            truth = {t.name: t.nearest for t in kept}
        truth = truth if truth is not None else exact_truth(src, sets)
        if carried is not None:
            searched, search, ladder = carried.describe(draft.parent), carried.ladder, 1
            loaded = functools.cache(draft.reader)
        elif reader is None and version_bytes(draft)["index_bytes"] > EVAL_LOADED_MAX_BYTES:
            searched, search, loaded = ("one shard at a time",
                                        ShardSearch(draft.loader(), draft.shards).search_ladder, draft.reader)
            ladder = ShardSearch.LADDER
        else:
            reader = reader or draft.reader()
            searched, search, loaded, ladder = "loaded reader", one_at_a_time(reader.search), lambda: reader, 1
        evaluation = evaluate(gate, search, loaded, sets, truth, draft.params["nlist"], ladder)
        for name, result in evaluation.items():
            if name != "queries":   # (query_recall always searches a loaded reader)
                result["searched"] = carried.describe(draft.parent) if carried is not None else searched
    default_nprobe = default_nprobe_of(evaluation)
    at_default = held_out_at(evaluation, default_nprobe)
    model = src.manifest.model
    counts = {**draft.counts, "shards": {s.name: s.ntotal for s in draft.shards}}
    report = {
        "embeddings": src.root, "index_root": draft.out, "version": draft.version, "parent": draft.parent,
        "vector": src.vector, "model": model.to_json(), "params": draft.params, "training": draft.training,
        "counts": counts, "evaluation": evaluation, "default_nprobe": default_nprobe, "seconds": timer.seconds,
        **(extra or {}),
    }
    report.update(version_bytes(draft))
    report["bytes_per_vector"] = round(report["index_bytes"] / max(draft.counts["indexed"], 1), 2)
    if gate.min_recall is not None and at_default.get("recall@10", 0.0) < gate.min_recall:
        report["published"] = False
        report["why_not_published"] = (f"recall@10 {at_default.get('recall@10')} at nprobe {default_nprobe} is "
                                       f"below --min-recall {gate.min_recall}")
        storage.write_json(storage.join(vdir, "report.json"), report)
        raise QualityGateFailed(f"{report['why_not_published']}; version {draft.version} is kept at {vdir} "
                                "but not published")
    truth_ref = ground_truth.write(vdir, kept) if kept else None   # no query set: nothing to keep
    lists_ref = search_lists.write(vdir, carried.lists) if carried is not None else None
    if truth_ref is not None:
        report["truth_bytes"] = truth_ref.bytes
    if lists_ref is not None:
        report["search_lists_bytes"] = lists_ref.bytes
    storage.write_json(storage.join(vdir, "report.json"), report)
    iv.write_manifest(draft.out, iv.IndexManifest(
        version=draft.version, model=model, vector=src.vector, fuse_alpha=src.alpha, params=draft.params,
        shards=draft.shards, trained=draft.trained_ref, default_nprobe=default_nprobe,
        recall_target=gate.recall_target, training=draft.training,
        embeddings={"uri": src.root, "manifest_created_at": src.manifest.created_at, "parts": len(src.manifest.parts)},
        counts=counts, evaluation=evaluation, parent=draft.parent, photos=src.photos, deltas=draft.deltas,
        ground_truth=truth_ref, search_lists=lists_ref))
    with timer.stage("publish"):
        try:
            iv.point_latest(draft.out, draft.version, draft.token, draft.parent)
        except storage.ConcurrentUpdate as exc:
            raise storage.ConcurrentUpdate(
                f"another publisher replaced {iv.latest_uri(draft.out)} (it now names "
                f"{iv.latest_version(draft.out)}) after this job started from {draft.parent}; version "
                f"{draft.version} is complete but not published") from exc
    report["published"] = True
    report["seconds"] = timer.seconds
    return Released(draft.version, True, default_nprobe, evaluation, counts, report)
