"""A serving host's load of a 10M-vector index: read into memory against mapped from the
local cache, and the cost of folding delta segments at load.

    .venv/bin/python tests/benchmarks/bench_mmap.py [--n 10000000] [--deltas 1 10 30]

The index: bench_scale.py's clustered unit vectors x 256 (fp16 parts), built by
`mimdex build-index --shards 4` with its defaults, under a temporary directory removed at
the end (about 8 GB at 10M). Each measurement runs in a fresh process:

  * read: ``IndexReader.open(root)`` (every shard downloaded, verified and merged in memory);
  * mmap, first open: ``IndexReader.open(root, mmap=True, cache_dir=...)`` downloads,
    verifies and writes the cache, then maps it;
  * mmap, later opens: the cache is there; only the mapping.

Per row: open seconds; the process's anonymous memory (RssAnon) and file-backed resident
memory (RssFile: mapped pages read so far) after the open and after the queries; queries/s
(1,000 queries, k 10, default nprobe) cold (first batch after the open) and warm (best of 3).

Deltas: 1, 10 and 30 delta segments (each re-adds 0.1% of the products with new vectors and
deletes their old ones, as a refresh writes them) added to the version's manifest in a copy;
the load time of read mode with them (folded at every load) and of the mmap cache's first
build (folded once), and a later mapped open.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_scale import D, ours, write  # noqa: E402

PROBE = r"""
import json, sys, time
import numpy as np
from mimdex.indexing.reader import IndexReader

root, version, mode, cache, queries = sys.argv[1:6]

def mem():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: round(int(fields[k].split()[0]) / 2**20, 2) for k in ("RssAnon", "RssFile")}

q = np.load(queries)
t0 = time.perf_counter()
reader = IndexReader.open(root, version, mmap=(mode == "mmap"), cache_dir=cache)
out = {"open_s": round(time.perf_counter() - t0, 2), "after_open_gb": mem(), "ntotal": reader.ntotal}
t0 = time.perf_counter()
reader.search(q, 10)
out["cold_qps"] = round(len(q) / (time.perf_counter() - t0))
best = 0
for _ in range(3):
    t0 = time.perf_counter()
    _, ids = reader.search(q, 10)
    best = max(best, len(q) / (time.perf_counter() - t0))
out["warm_qps"] = round(best)
out["after_queries_gb"] = mem()
np.save(queries + f".{version}.{mode}.ids.npy", ids)
print(json.dumps(out))
"""


def probe(root: str, version: str, mode: str, cache: str, queries: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, root, version, mode, cache, queries], capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_deltas(root: str, count: int, share: float, seed: int) -> str:
    """A copy of LATEST's manifest (a new version name, the same files) with ``count`` delta
    segments appended, each replacing ``share`` of the products with new vectors."""
    import pyarrow as pa

    from mimdex.infra.contracts import index_codec as codec
    from mimdex.infra.contracts import index_delta
    from mimdex.infra.contracts import index_version as iv
    from mimdex.infra.contracts.vectors import ids_for, shard_of
    from dataclasses import replace

    base = iv.read_manifest(root, iv.latest_version(root))
    trained = iv.read_trained(iv.version_uri(root, base.version), base.trained)
    index = codec.deserialize(trained)
    nlist, code_size = codec.lists_shape(index)
    home = base.version
    rng = np.random.default_rng(seed)
    n = base.counts.get("indexed") or sum(s.ntotal for s in base.shards)
    segments = []
    for _ in range(count):   # each segment in a version directory of its own, as refreshes write them
        version = iv.new_version()
        vdir = iv.version_uri(root, version)
        rows = rng.choice(n, int(n * share), replace=False)
        pids = [f"v{r:010d}" for r in rows.tolist()]
        v = rng.standard_normal((len(rows), D)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        lists, codes, refine = codec.encode(index, v)
        ids = ids_for(pids)
        idmap = iv.with_refine(pa.table({"id": pa.array(ids, pa.int64()), "product_id": pids}), refine)
        shard = shard_of(ids, len(base.shards))
        out = {}
        for s in np.unique(shard).tolist():
            sel = np.flatnonzero(shard == s)
            out[int(s)] = (codec.encoded_lists(nlist, code_size, ids[sel], lists[sel], codes[sel]), len(sel),
                           idmap.take(pa.array(sel, pa.int64())))
        segments.append((version, index_delta.write_segment(vdir, version, out, pids)))
    manifest = replace(base, version=version, parent=base.version,
                       shards=tuple(index_delta.rebase_shard(s, home) for s in base.shards),
                       trained=index_delta.rebased(base.trained, home),
                       deltas=tuple(index_delta.rebase_segment(seg, v) if v != version else seg for v, seg in segments))
    iv.write_manifest(root, manifest)
    return version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--deltas", type=int, nargs="*", default=[1, 10, 30])
    ap.add_argument("--delta-share", type=float, default=0.001)
    ap.add_argument("--out", default="bench-output/mmap.json")
    args = ap.parse_args()
    from mimdex.infra.contracts import index_version as iv

    work = tempfile.mkdtemp(prefix="mimdex-mmap-")
    result = {"n": args.n, "d": D, "cpus": os.cpu_count(), "rows": [], "deltas": []}
    try:
        emb, root = os.path.join(work, "emb"), os.path.join(work, "index")
        t0 = time.perf_counter()
        write(emb, os.path.join(work, "model"), args.n)
        built = ours(emb, root, args.shards)
        rep = built.pop("report")
        result["factory"], result["nprobe"] = rep["params"]["factory"], rep["default_nprobe"]
        result["index_bytes"] = rep["index_bytes"]
        print(f"{args.n} vectors written and indexed in {time.perf_counter() - t0:.0f} s: {result['factory']}, "
              f"{rep['index_bytes'] / 2**30:.2f} GiB", flush=True)
        shutil.rmtree(emb)
        queries = os.path.join(work, "queries.npy")
        q = np.random.default_rng(7).standard_normal((1000, D)).astype(np.float32)
        np.save(queries, q / np.linalg.norm(q, axis=1, keepdims=True))
        version, cache = iv.latest_version(root), os.path.join(work, "cache")
        for name, mode in (("read", "read"), ("mmap, first open (cache built)", "mmap"), ("mmap, cached", "mmap")):
            row = {"load": name, **probe(root, version, mode, cache, queries)}
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
        same = np.array_equal(np.load(f"{queries}.{version}.read.ids.npy"), np.load(f"{queries}.{version}.mmap.ids.npy"))
        result["same_results"] = bool(same)
        for count in args.deltas:
            t0 = time.perf_counter()
            v = add_deltas(root, count, args.delta_share, seed=count)
            row = {"deltas": count, "written_s": round(time.perf_counter() - t0, 1),
                   "read": probe(root, v, "read", cache, queries),
                   "mmap_first": probe(root, v, "mmap", cache, queries),
                   "mmap_cached": probe(root, v, "mmap", cache, queries)}
            print(json.dumps(row), flush=True)
            result["deltas"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{args.n} x {D}, {result['factory']}, nprobe {result['nprobe']}, {os.cpu_count()} CPUs; "
          f"mapped and read give the same results: {result['same_results']}")
    print(f"{'load':32} {'open s':>7} {'anon GB':>8} {'file GB':>8} {'cold q/s':>9} {'warm q/s':>9} {'anon/file GB after':>19}")
    for r in result["rows"]:
        a, b = r["after_open_gb"], r["after_queries_gb"]
        print(f"{r['load']:32} {r['open_s']:>7} {a['RssAnon']:>8} {a['RssFile']:>8} {r['cold_qps']:>9} "
              f"{r['warm_qps']:>9} {b['RssAnon']:>9}/{b['RssFile']:<9}")
    print(f"{'deltas':>6} {'read: open s':>13} {'mmap first: open s':>19} {'mmap cached: open s':>20} {'warm q/s read/mmap':>19}")
    for r in result["deltas"]:
        print(f"{r['deltas']:>6} {r['read']['open_s']:>13} {r['mmap_first']['open_s']:>19} {r['mmap_cached']['open_s']:>20} "
              f"{r['read']['warm_qps']:>9}/{r['mmap_cached']['warm_qps']}")
    print(args.out)


if __name__ == "__main__":
    main()
