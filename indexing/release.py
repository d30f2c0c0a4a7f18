"""Evaluate, gate and publish an index version whose shards are written: the end of
build-index and of refresh's incremental update alike.

    held-out sample -> exact ground truth (blockwise) -> nprobe sweep -> default nprobe
      -> --min-recall gate -> report.json -> manifest.json (create-only) -> LATEST (conditional)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from mimdex.indexing.evaluate import held_out_at, sweep
from mimdex.indexing.exact import ExactTopK
from mimdex.indexing.reader import IndexReader
from mimdex.infra import storage
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.contracts.embeddings import EmbeddingsManifest
from mimdex.infra.contracts.files import FileRef, read_dataset
from mimdex.infra.contracts.recall import recall_at
from mimdex.infra.contracts.vectors import ids_for, usable_rows
from mimdex.infra.errors import DataError


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
    queries: str | None = None       # street queries, encoded with the embeddings' model
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


@dataclass(frozen=True)
class Released:
    version: str
    published: bool
    default_nprobe: int
    evaluation: dict
    counts: dict
    report: dict


def blocks(src: Source):
    """(vectors, ids) of every usable row, part by part (checksums verified)."""
    for entry in src.manifest.parts:
        rows = usable_rows(src.root, entry, src.manifest.model, src.manifest.dtype, src.vector, src.alpha,
                           photo_mode=src.photos or "every", idmap=False)
        yield rows.vectors, rows.ids


def sample_vectors(src: Source, n: int, train_size: int, eval_queries: int, seed: int = 0):
    """Training sample and held-out evaluation vectors (disjoint), in one pass."""
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = min(eval_queries, n // 5)  # held out of training (still indexed)
    train_size = min(train_size, n - n_eval)
    train_pos, eval_pos = np.sort(perm[:train_size]), np.sort(perm[train_size:train_size + n_eval])
    train, held, held_ids = [], [], []
    offset = 0
    for v, ids in blocks(src):
        lo, hi = offset, offset + len(v)
        t = train_pos[(train_pos >= lo) & (train_pos < hi)] - offset
        e = eval_pos[(eval_pos >= lo) & (eval_pos < hi)] - offset
        train.append(v[t])
        held.append(v[e])
        held_ids.append(ids[e])
        offset = hi
    d = src.manifest.model.d
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, np.float32)  # noqa: E731
    return cat(train, (0, d)), cat(held, (0, d)), (np.concatenate(held_ids) if held_ids else np.zeros(0, np.int64))


def _street_queries(src: Source, queries: str, limit: int = 2000) -> tuple[np.ndarray, list[str]]:
    from mimdex.encoders.bundle import load_bundle

    model = src.manifest.model
    enc = load_bundle(model.uri)
    if enc.sha256 != model.sha256:
        raise DataError(f"model {model.uri} is not the model the embeddings were made with")
    table = read_dataset(queries, "queries", required=("query_image", "product_id"))
    if "kind" in table.column_names:
        import pyarrow.compute as pc
        table = table.filter(pc.equal(table["kind"], "street"))
    table = table.slice(0, limit)
    images = table.column("query_image").to_pylist()
    if src.vector == "image" or "query_text" not in table.column_names:
        vectors = enc.encode_images(images)
    elif src.vector == "text":
        vectors = enc.encode_texts(table.column("query_text").to_pylist())
    else:
        vectors = enc.encode_queries(images, table.column("query_text").to_pylist())
    return vectors.astype(np.float32), table.column("product_id").to_pylist()


def evaluate(src: Source, gate: Gate, reader: IndexReader, held: np.ndarray, held_ids: np.ndarray,
             nlist: int) -> dict:
    out: dict = {}
    queries = {"held_out": (held, held_ids)}
    street_pids = None
    if gate.queries:
        vectors, street_pids = _street_queries(src, gate.queries)
        queries["street"] = (vectors, None)
    exact = {name: ExactTopK(q, 1, ex) for name, (q, ex) in queries.items() if len(q)}
    for v, ids in blocks(src):
        for acc in exact.values():
            acc.add(v, ids)
    for name, acc in exact.items():
        q, ex = queries[name]
        truth = acc.result()[1][:, 0]
        rows, chosen = sweep(lambda x, k, p: reader.search(x, k, p), q, truth, nlist, gate.recall_target, ex)
        out[name] = {"queries": len(q), "sweep": rows, "default_nprobe": chosen}
    if street_pids is not None and "street" in exact:
        nprobe = out.get("held_out", out["street"])["default_nprobe"]
        # a product is found when any of its photos is: distinct products, compared by product id
        _, _, found = reader.search_distinct(queries["street"][0], 100, nprobe)
        out["street"]["product_recall"] = recall_at(found, ids_for(street_pids))
    return out


def version_bytes(draft: VersionDraft) -> dict:
    """index_bytes: the codes and codebooks (what serving holds); files_bytes: every file
    the version uses; written_bytes: those it wrote itself (a refresh that references its
    parent's files writes only its delta)."""
    shards = list(draft.shards) + [s for seg in draft.deltas for s in seg.shards]
    refs = [draft.trained_ref] + [r for s in shards for r in (s.index, s.ids)]
    refs += [seg.deleted for seg in draft.deltas if seg.deleted]
    return {"index_bytes": sum(s.index.bytes for s in shards) + len(draft.trained),
            "files_bytes": sum(r.bytes for r in refs),
            "written_bytes": sum(r.bytes for r in refs if not r.file.startswith("../"))}


def finish_version(draft: VersionDraft, src: Source, gate: Gate, held: np.ndarray, held_ids: np.ndarray,
                   timer, extra: dict | None = None, reader: IndexReader | None = None) -> Released:
    vdir = iv.version_uri(draft.out, draft.version)
    with timer.stage("evaluate"):
        evaluation = evaluate(src, gate, reader or draft.reader(), held, held_ids, draft.params["nlist"])
    default_nprobe = evaluation["held_out"]["default_nprobe"] if "held_out" in evaluation else 1
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
    storage.write_json(storage.join(vdir, "report.json"), report)
    iv.write_manifest(draft.out, iv.IndexManifest(
        version=draft.version, model=model, vector=src.vector, fuse_alpha=src.alpha, params=draft.params,
        shards=draft.shards, trained=draft.trained_ref, default_nprobe=default_nprobe,
        recall_target=gate.recall_target, training=draft.training,
        embeddings={"uri": src.root, "manifest_created_at": src.manifest.created_at, "parts": len(src.manifest.parts)},
        counts=counts, evaluation=evaluation, parent=draft.parent, photos=src.photos, deltas=draft.deltas))
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
