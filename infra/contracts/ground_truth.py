"""The quality gate's ground truth, kept in an index version (docs/contracts.md, "Ground
truth"): what the next refresh updates from its change instead of reading every vector.

    <version>/truth.parquet   a row per evaluation query:
        set       string                 held_out | street
        own       int64                  a held-out query's own vector id (-1: a street query)
        own_key   int64                  its product key (-1: a street query)
        vector    fixed_size_list<float32>[d]
        ids       fixed_size_list<int64>[K]    exact neighbours, nearest first, ties to the smaller id (-1 pads)
        keys      fixed_size_list<int64>[K]    their product keys
        dists     fixed_size_list<float32>[K]  squared L2 (inf pads)
        bound     float32                every vector nearer than this is in the list (one at it may be)

The manifest names it (``IndexManifest.ground_truth``, a FileRef with its sha256). A
version without one (built by build-index, or before this file existed) has its truth
recomputed by the next refresh, which then writes the file.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from mimdex.infra.contracts.files import FileRef, read_table_checked, write_parquet

FILE = "truth.parquet"
SETS = ("held_out", "street")
RECORDED_IN = "the index manifest"


@dataclass(frozen=True)
class QueryTruth:
    """One query set's exact neighbours (indexing.truth computes and updates them)."""

    name: str                # held_out | street
    vectors: np.ndarray      # n x d float32
    own: np.ndarray          # n int64: a held-out query's own vector id (never its own neighbour); -1: none
    own_keys: np.ndarray     # n int64: a held-out query's product key; -1 for street queries
    ids: np.ndarray          # n x K int64 neighbour vector ids, nearest first; -1 pads
    keys: np.ndarray         # n x K int64 their product keys
    dists: np.ndarray        # n x K float32 squared L2; inf pads
    bound: np.ndarray        # n float32: every vector nearer than this is in the list

    ROWS = ("vectors", "own", "own_keys", "ids", "keys", "dists", "bound")

    @property
    def nearest(self) -> np.ndarray:
        return self.ids[:, 0]

    def take(self, rows: np.ndarray) -> "QueryTruth":
        return replace(self, **{f: getattr(self, f)[rows] for f in self.ROWS})

    def stale(self) -> np.ndarray:
        """Queries whose nearest neighbour is not known (nothing left within the bound). A
        neighbour *at* the bound counts: a vector not in the list is at least as far, so
        the nearest distance is exact and the id one of those tied at it (catalogs repeat
        images: without this, a query with 11 identical neighbours would be recomputed
        every night)."""
        first = self.dists[:, 0]
        return ~(np.isfinite(first) & (first <= self.bound))


def fixed(matrix: np.ndarray, type_) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(matrix).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type_), matrix.shape[1])


def write(version_dir: str, truths: tuple[QueryTruth, ...]) -> FileRef:
    cols = {"set": [], "own": [], "own_key": [], "vector": [], "ids": [], "keys": [], "dists": [], "bound": []}
    for t in truths:
        cols["set"].append(pa.array([t.name] * len(t.vectors), pa.string()))
        cols["own"].append(pa.array(t.own, pa.int64()))
        cols["own_key"].append(pa.array(t.own_keys, pa.int64()))
        cols["vector"].append(fixed(t.vectors.astype(np.float32), pa.float32()))
        for name, type_ in (("ids", pa.int64()), ("keys", pa.int64()), ("dists", pa.float32())):
            cols[name].append(fixed(getattr(t, name), type_))
        cols["bound"].append(pa.array(t.bound, pa.float32()))
    table = pa.table({name: pa.concat_arrays(parts) if parts else pa.array([], pa.null())
                      for name, parts in cols.items()})
    return write_parquet(version_dir, FILE, table)


def matrix(column: pa.ChunkedArray, dtype) -> np.ndarray:
    arr = column.combine_chunks()
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(-1, width)


def read(version_dir: str, ref: FileRef) -> tuple[QueryTruth, ...]:
    """The version's truth, per set (exit 65 naming the file when it is not as recorded)."""
    table = read_table_checked(version_dir, ref, "ground truth file", RECORDED_IN)
    out = []
    sets = table.column("set").to_numpy(zero_copy_only=False)
    for name in SETS:
        part = table.filter(pa.array(sets == name))
        if not part.num_rows:
            continue
        out.append(QueryTruth(
            name, matrix(part["vector"], np.float32), part["own"].to_numpy(), part["own_key"].to_numpy(),
            matrix(part["ids"], np.int64), matrix(part["keys"], np.int64), matrix(part["dists"], np.float32),
            part["bound"].to_numpy().astype(np.float32)))
    return tuple(out)
