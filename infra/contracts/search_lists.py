"""The gate's search results, kept in an index version (docs/contracts.md, "Kept search
results"): what the next refresh carries through its change instead of loading the index
to evaluate (indexing.candidates).

    <version>/lists.parquet   a row per (evaluation query, nprobe):
        set       string                      held_out | street (as truth.parquet)
        query     int64                       a held-out query's own vector id; a street query's row
        nprobe    int32
        ids       fixed_size_list<int64>[C]   candidates nearest by code distance in the probed lists,
                                              ties to the smaller id (-1 pads)
        keys      fixed_size_list<int64>[C]   their product keys (absent where they are the ids:
                                              one vector per product)
        dists     fixed_size_list<float32>[C] code distances (inf pads)
        refined   fixed_size_list<float32>[C] re-ranking distances (only where the index re-ranks)
        bound     float32                     every candidate nearer than this is in the row (one at it may be)

The manifest names it (``IndexManifest.search_lists``, a FileRef with its sha256). A version
without one has its lists searched again by the next refresh, which then writes the file.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from mimdex.infra.contracts.files import FileRef, read_table_checked, write_parquet
from mimdex.infra.contracts.ground_truth import RECORDED_IN, SETS, fixed, matrix

FILE = "lists.parquet"


@dataclass(frozen=True)
class Lists:
    """One query set's kept candidates, a row per (query, nprobe)."""

    query: np.ndarray            # m int64: a held-out query's own id, a street query's row
    nprobe: np.ndarray           # m int32
    ids: np.ndarray              # m x C int64 by (code distance, id); -1 pads
    keys: np.ndarray             # m x C int64 their product keys
    dists: np.ndarray            # m x C float32 code distances; inf pads
    refined: np.ndarray | None   # m x C float32 re-ranking distances (None: the index does not re-rank)
    bound: np.ndarray            # m float32: every candidate nearer than this is in the row (one at it may be)

    ROWS = ("query", "nprobe", "ids", "keys", "dists", "refined", "bound")

    def take(self, rows: np.ndarray) -> "Lists":
        return replace(self, **{f: getattr(self, f)[rows] for f in self.ROWS if getattr(self, f) is not None})

    @staticmethod
    def concat(parts: list["Lists"]) -> "Lists":
        return Lists(**{f: (None if getattr(parts[0], f) is None else np.concatenate([getattr(p, f) for p in parts]))
                        for f in Lists.ROWS})


def write(version_dir: str, lists: dict[str, Lists]) -> FileRef | None:
    names = [n for n in SETS if n in lists and len(lists[n].query)]
    if not names:
        return None
    refine = lists[names[0]].refined is not None
    keyed = any(not np.array_equal(lists[n].keys, lists[n].ids) for n in names)
    cols: dict[str, list] = {c: [] for c in ("set", "query", "nprobe", "ids", "dists", "bound")}
    cols.update({"refined": []} if refine else {}, **({"keys": []} if keyed else {}))
    for name in names:
        t = lists[name]
        cols["set"].append(pa.array([name] * len(t.query), pa.string()))
        cols["query"].append(pa.array(t.query, pa.int64()))
        cols["nprobe"].append(pa.array(t.nprobe, pa.int32()))
        for c, type_ in (("ids", pa.int64()), ("keys", pa.int64()), ("dists", pa.float32()),
                         ("refined", pa.float32())):
            if c in cols:
                cols[c].append(fixed(getattr(t, c), type_))
        cols["bound"].append(pa.array(t.bound, pa.float32()))
    return write_parquet(version_dir, FILE, pa.table({c: pa.concat_arrays(v) for c, v in cols.items()}))


def read(version_dir: str, ref: FileRef) -> dict[str, Lists]:
    """The version's lists, per set (exit 65 naming the file when it is not as recorded)."""
    table = read_table_checked(version_dir, ref, "kept search lists file", RECORDED_IN)
    sets = table.column("set").to_numpy(zero_copy_only=False)
    out = {}
    for name in SETS:
        part = table.filter(pa.array(sets == name))
        if part.num_rows:
            ids = matrix(part["ids"], np.int64)
            out[name] = Lists(part["query"].to_numpy(), part["nprobe"].to_numpy().astype(np.int32), ids,
                              matrix(part["keys"], np.int64) if "keys" in part.column_names else ids,
                              matrix(part["dists"], np.float32),
                              matrix(part["refined"], np.float32) if "refined" in part.column_names else None,
                              part["bound"].to_numpy().astype(np.float32))
    return out
