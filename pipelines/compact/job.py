"""Compaction: the version LATEST names, with its delta segments folded into new base
shards, published as the next version (conditionally, like every publish).

    LATEST's manifest -> Beam: one CompactShard per shard (base + its deltas - deletions,
      contracts.index_delta.combine) -> new shards -> manifest (create-only) -> LATEST

The vectors are the same as before, in the same order (``combine`` is what the reader
applies to a version with deltas), so search results do not change and the version keeps
its evaluation. The codebooks are referenced, not copied.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from mimdex.infra import storage
from mimdex.infra.contracts import index_codec as codec
from mimdex.infra.contracts import index_delta
from mimdex.infra.contracts import index_version as iv
from mimdex.infra.errors import DataError
from mimdex.pipelines import beam_runner
from mimdex.pipelines.compact.spec import PROGRESS_DIR, CompactSpec
from mimdex.pipelines.report import StageTimer



@dataclass(frozen=True)
class CompactConfig:
    index: str
    stall_timeout: float = 900.0


def run(cfg: CompactConfig, beam_args: list[str] | None = None) -> dict:
    timer, io0 = StageTimer(), storage.IO.snapshot()
    pointer, token = iv.read_latest(cfg.index)
    if pointer is None:
        raise DataError(f"index {cfg.index}: no LATEST (nothing has been published here to compact)")
    with iv.started_from(cfg.index, pointer.version):   # retention may remove it once LATEST moves on
        return _compact(cfg, beam_args, pointer.version, token, timer, io0)


def _compact(cfg: CompactConfig, beam_args: list[str] | None, parent: str, token: str | None, timer: StageTimer,
             io0: dict) -> dict:
    m = iv.read_manifest(cfg.index, parent)
    report: dict = {"index_root": cfg.index, "from": m.version, "delta_segments": len(m.deltas),
                    "delta_vectors": sum(d.added for d in m.deltas)}
    if not m.deltas:
        report.update(nothing_to_do=True, decision="no delta segments: nothing to compact")
        return report
    version = iv.new_version()
    src, out = iv.version_uri(cfg.index, m.version), iv.version_uri(cfg.index, version)
    nlist, code_size = codec.lists_shape(iv.read_trained(src, m.trained))  # verified, and its shape
    spec = CompactSpec(src, out, m.deltas, nlist, code_size)
    with timer.stage("beam"):
        from mimdex.pipelines.compact.graph import build_pipeline  # Beam is imported only to compact

        beam_runner.run(lambda p: build_pipeline(p, spec, list(m.shards)), list(beam_args or []),
                        storage.join(out, PROGRESS_DIR), len(m.shards), cfg.stall_timeout,
                        f"version {out} is incomplete and unpublished; re-run to compact again")
    records = sorted((iv.ShardEntry.from_json(storage.read_json(u))
                      for u in storage.list_files(storage.join(out, PROGRESS_DIR), ".json")), key=lambda e: e.shard)
    if [r.shard for r in records] != [s.shard for s in m.shards]:
        raise DataError(f"compaction of {m.version}: shards {[r.shard for r in records]} were written, "
                        f"expected {[s.shard for s in m.shards]}")
    storage.delete(storage.join(out, PROGRESS_DIR), recursive=True)
    ntotal = sum(r.ntotal for r in records)
    counts = {**{k: v for k, v in m.counts.items() if not k.startswith("delta_")}, "indexed": ntotal,
              "shards": {r.name: r.ntotal for r in records}, "compacted_from": m.version}
    manifest = replace(m, version=version, shards=tuple(records), deltas=(), parent=m.version, counts=counts,
                       trained=index_delta.rebased(m.trained, m.version),
                       # the same codes in the same lists: the kept truth and search lists hold as they are
                       ground_truth=index_delta.rebased(m.ground_truth, m.version) if m.ground_truth else None,
                       search_lists=index_delta.rebased(m.search_lists, m.version) if m.search_lists else None)
    written = sum(r.index.bytes + r.ids.bytes for r in records)
    report.update(version=version, vectors=ntotal, written_bytes=written, seconds=timer.seconds,
                  io=storage.io_since(io0))
    storage.write_json(storage.join(out, "report.json"), report)
    iv.write_manifest(cfg.index, manifest)
    with timer.stage("publish"):
        iv.point_latest(cfg.index, version, token, m.version)
    report.update(published=True, seconds=timer.seconds)
    return report
