"""Street and reformulation recall of an index: the one evaluation of evaluation queries
through a loaded IndexReader. build-index's and the refresh's gates record it in the
version's manifest (`evaluation.queries`), and `mimdex eval` and the demo report it:
the same queries and nprobe give the same figures."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mimdex.indexing.reader import IndexReader
from mimdex.infra.contracts.queries import QueryVectors
from mimdex.infra.contracts.recall import KS, reformulation_recall, street_recall
from mimdex.infra.contracts.vectors import ids_for

# Distinct products searched per query: recall@k for every k of contracts.recall.KS.
K = max(KS)


def query_recall(reader: IndexReader, qv: QueryVectors, nprobe: int | None = None) -> dict:
    """recall@1/10/100 of the street queries' products (wrong_category@1 too when the id
    map has a category column) and the reformulations' recall@1, photo and photo + text,
    from one search of K distinct products per query at ``nprobe`` (the version's default)."""
    nprobe = nprobe or reader.default_nprobe
    out: dict = {"uri": qv.uri, "nprobe": nprobe}
    if len(qv.street_targets):
        _, ids, found = reader.search_distinct(qv.street, K, nprobe)
        out.update(street_recall(found, ids_for(list(qv.street_targets)), KS,
                                 *_categories(reader, ids[:, 0], qv.street_targets)))
    if len(qv.reform_targets):
        image = reader.search_distinct(qv.reform_image, K, nprobe)[2]
        fused = None if qv.reform_fused is None else reader.search_distinct(qv.reform_fused, K, nprobe)[2]
        out.update(reformulation_recall(image, fused, ids_for(list(qv.reform_targets))))
    return out


def _categories(reader: IndexReader, top1: np.ndarray, targets: tuple[str, ...]):
    """(the first result's category, the target's), from the id map; (None, None) when
    the id map has no category column."""
    idmap = reader.idmap
    if "category" not in idmap.column_names:
        return None, None
    if not idmap.num_rows:
        return [None] * len(top1), [None] * len(targets)
    found = [r["category"] if r else None for r in reader.rows(top1)]
    at = pc.index_in(pa.array(list(targets), pa.string()), value_set=idmap.column("product_id"))
    wanted = idmap.column("category").take(at.fill_null(0)).to_pylist()
    return found, [w if ok else None for w, ok in zip(wanted, at.is_valid().to_pylist())]
