"""The refresh's ground truth: the previous version's, updated from the change
(indexing.truth), so a night reads the changed vectors, not the catalog's.

Full passes over the embeddings happen only where the kept truth cannot answer: no kept
file (a version build-index wrote, or ``--full-evaluation``), a new street query set,
a held-out set shrunk below REDRAW_BELOW by its products leaving (redrawn), and lists
with nothing left below their bound (recomputed, those queries only). The report says
which ran and how many queries each touched.
"""
from __future__ import annotations

import numpy as np

from mimdex.indexing import release
from mimdex.indexing import truth as gt
from mimdex.infra.contracts import ground_truth
from mimdex.infra.contracts import index_version as iv


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
