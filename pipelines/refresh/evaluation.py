"""The refresh's evaluation: the previous version's ground truth (indexing.truth) and
search lists (indexing.carried_search), updated from the change, so a night reads the
changed vectors, not the catalog's, and never loads the index.

Full passes over the embeddings happen only where the kept truth cannot answer: no kept
file (a version build-index wrote, or ``--full-evaluation``), a new street query set,
a held-out set shrunk below REDRAW_BELOW by its products leaving (redrawn), and lists
with nothing left below their bound (recomputed, those queries only). The report says
which ran and how many queries each touched.
"""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from mimdex.indexing import release
from mimdex.indexing import truth as gt
from mimdex.indexing.carried_search import CarriedSearch, grid_of
from mimdex.indexing.shard_search import ShardSearch
from mimdex.infra.contracts import ground_truth, search_lists as lists_file
from mimdex.infra.contracts import index_version as iv
from mimdex.pipelines.refresh import diff as diffs
from mimdex.pipelines.refresh import update


def kept_truth(index_dir: str, manifest: iv.IndexManifest) -> dict[str, ground_truth.QueryTruth]:
    if manifest.ground_truth is None:
        return {}
    return {t.name: t for t in ground_truth.read(iv.version_uri(index_dir, manifest.version), manifest.ground_truth)}


def carried(kept: dict[str, ground_truth.QueryTruth], src: release.Source, gate: release.Gate,
            removed_keys: np.ndarray, vectors: np.ndarray, ids: np.ndarray, keys: np.ndarray,
            rows: int) -> tuple[tuple[ground_truth.QueryTruth, ...], dict]:
    """(each query set's truth for the new version, what it took). ``vectors``/``ids``/
    ``keys``: the change's added vectors; ``removed_keys``: the product keys whose earlier
    vectors left; ``rows``: the usable rows of the new embeddings (the held-out count)."""
    report = {"kept": sorted(kept), "full_passes": 0, "recomputed_queries": 0, "redrawn": [], "left_held_out": 0}

    def pass_over():
        report["full_passes"] += 1
        return release.keyed_blocks(src)

    out = []
    held = kept.get("held_out")
    want = min(gate.eval_queries, rows // 5)
    if held is not None:
        before = len(held.vectors)
        held = gt.update(held, removed_keys, vectors, ids, keys)
        report["left_held_out"] = before - len(held.vectors)
        if len(held.vectors) < gt.REDRAW_BELOW * want:
            held = None
    if held is None and want:
        report["redrawn"].append("held_out")
        drawn = release.sample_vectors(src, rows, 0, gate.eval_queries, gate.seed)
        report["full_passes"] += 1
        held = gt.full("held_out", drawn.held, drawn.held_ids, None, pass_over())
    if held is not None and len(held.vectors):
        out.append(held)
    street = gate.queries.street if gate.queries is not None else np.zeros((0, 1), np.float32)
    if len(street):
        old = kept.get("street")
        if old is not None and old.vectors.shape == street.shape and np.array_equal(old.vectors, street):
            out.append(gt.update(old, removed_keys, vectors, ids, keys))
        else:
            report["redrawn"].append("street")
            out.append(gt.full("street", street, None, None, pass_over()))
    stale = [np.flatnonzero(t.stale()) for t in out]
    if any(len(s) for s in stale):
        report["recomputed_queries"] = int(sum(len(s) for s in stale))
        out = list(gt.recompute(tuple(out), stale, pass_over()))
    return tuple(out), report


def removed_vectors(d: diffs.Diff, photos: str | None) -> int:
    """The vectors the change takes out of the index: each removed product's rows (its
    encoded photos where every photo is indexed, else one vector a product)."""
    per = d.table(diffs.REMOVED_FROM_INDEX, ("vectors",)).column("vectors")
    per = pc.fill_null(per, 0).to_numpy().astype(np.int64)
    return int(per.sum() if photos in (None, "every") else (per > 0).sum())


def code_drift(trained: bytes, delta: update.Delta, truths: tuple[ground_truth.QueryTruth, ...],
               sample: int = 2000) -> dict:
    """The new vectors' code error (update.code_error, a seeded sample of ``sample``) over
    the held-out vectors' that the change did not bring."""
    pick = np.random.default_rng(0).permutation(len(delta.ids))[:sample]
    held = next((t for t in truths if t.name == "held_out"), None)
    old = held.vectors[~np.isin(held.own, delta.ids)] if held is not None else delta.vectors[:0]
    new_e, old_e = update.code_error(trained, delta.vectors[pick]), update.code_error(trained, old)
    return {"code_error_new": None if new_e is None else round(new_e, 6),
            "code_error_old": None if old_e is None else round(old_e, 6),
            "code_error_ratio": round(new_e / old_e, 4) if new_e is not None and old_e else None}


def search_lists(index_dir: str, prev: iv.IndexManifest, draft: release.VersionDraft,
                 truths: tuple[ground_truth.QueryTruth, ...], removed_keys: np.ndarray, piece,
                 renew: tuple[str, ...]) -> CarriedSearch:
    """The sweep's search on the new version: the previous version's kept lists carried
    through the change (those of the sets in ``renew`` searched again instead)."""
    kept = {} if prev.search_lists is None else lists_file.read(iv.version_uri(index_dir, prev.version),
                                                                 prev.search_lists)
    kept = {name: rows for name, rows in kept.items() if name not in renew}
    sets = {t.name: (t.vectors, t.own if t.name == "held_out" else np.arange(len(t.vectors), dtype=np.int64))
            for t in truths}
    nlist = draft.params["nlist"]
    grid = sorted({p for name in sets for p in grid_of(prev.evaluation, name, nlist)})
    qps = {(name, r["nprobe"]): r["qps"] for name in sets for r in prev.evaluation.get(name, {}).get("sweep", [])}
    return CarriedSearch(ShardSearch(draft.loader(), draft.shards), sets, kept, removed_keys, piece, grid, qps)
