"""Evaluation queries: the one reader of their Parquet, and what each kind measures.

A queries table (a Parquet file or directory) has `query_image: binary` (a photo) and
`product_id: string`, the product the query must find. Optional columns:

* `kind`: `street` (a shopper's photo of the product) or `reformulation` (a photo of
  a sibling plus `query_text` naming how the target differs, e.g. "in blue"). Without
  the column every row is a street query.
* `query_text`: a street query's short text (unused by the metrics), a
  reformulation's text (required).
* `source_product_id`, `distractor_product_id`: the synthetic tables' provenance (the
  product in the photo, the one whose look fills the background); not read here.

Street queries measure product recall@k and, where the index knows categories, how often
the first result is of another category; reformulations measure recall@1 of the target
from the photo alone and from photo + text fused. How a query becomes a vector is
`encoders.queries`; how the figures are computed, `contracts.recall`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mimdex.infra.contracts.files import read_dataset
from mimdex.infra.errors import DataError

KINDS = ("street", "reformulation")
# Queries of each kind an evaluation uses (the first ones, in file order): enough for
# ±0.02 on a recall near 0.5, and a bounded cost at every build.
LIMIT = 2000


@dataclass(frozen=True)
class QueryRows:
    """The queries of one kind, in file order."""

    images: tuple[bytes, ...]
    texts: tuple[str | None, ...]
    targets: tuple[str, ...]      # the product each must find

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class Queries:
    uri: str
    street: QueryRows
    reformulation: QueryRows


@dataclass(frozen=True)
class QueryVectors:
    """Queries as vectors of one model, handed by the job that loads the model to the
    index layer (which never imports it). ``reform_fused`` is None for an image-only model."""

    uri: str                      # the queries they were read from
    street: np.ndarray
    street_targets: tuple[str, ...]
    reform_image: np.ndarray
    reform_fused: np.ndarray | None
    reform_targets: tuple[str, ...]


def read_queries(uri: str, limit: int | None = LIMIT) -> Queries:
    """The first ``limit`` queries of each kind; exit 65 naming the file and the row for
    an unknown kind, a reformulation without text or a row without its target."""
    table = read_dataset(uri, "queries", required=("query_image", "product_id"))
    kinds = table.column("kind") if "kind" in table.column_names else pa.array(["street"] * table.num_rows)
    unknown = pc.invert(pc.is_in(kinds.fill_null(""), pa.array(KINDS)))
    _reject(uri, unknown, lambda i: f"kind {kinds[i].as_py()!r} is not one of {', '.join(KINDS)}")
    _reject(uri, pc.or_(table.column("product_id").is_null(), table.column("query_image").is_null()),
            lambda i: "no product_id or no query_image")
    texts = table.column("query_text") if "query_text" in table.column_names else pa.nulls(table.num_rows, pa.string())
    reform = pc.equal(kinds, "reformulation")
    _reject(uri, pc.and_kleene(reform, pc.or_kleene(texts.is_null(), pc.equal(pc.utf8_trim_whitespace(texts), ""))),
            lambda i: "a reformulation query needs its query_text")
    cols = {"query_image": table.column("query_image"), "query_text": texts, "product_id": table.column("product_id")}
    both = pa.table(cols)
    return Queries(uri, _rows(both.filter(pc.equal(kinds, "street")), limit), _rows(both.filter(reform), limit))


def _rows(table: pa.Table, limit: int | None) -> QueryRows:
    if limit is not None:
        table = table.slice(0, limit)
    return QueryRows(tuple(table.column("query_image").to_pylist()), tuple(table.column("query_text").to_pylist()),
                     tuple(table.column("product_id").to_pylist()))


def _reject(uri: str, bad, why) -> None:
    rows = np.flatnonzero(np.asarray(bad.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool))
    if len(rows):
        raise DataError(f"queries {uri}: row {rows[0]}: {why(int(rows[0]))}"
                        + (f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""))
