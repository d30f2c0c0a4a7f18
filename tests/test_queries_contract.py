"""The evaluation queries contract (infra/contracts/queries.py) and the one street and
reformulation recall (infra/contracts/recall.py) that every evaluation reports."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mimdex.infra.contracts.queries import read_queries
from mimdex.infra.contracts.recall import reformulation_recall, street_recall
from mimdex.infra.errors import DataError


def _write(path, **cols) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_without_a_kind_column_every_row_is_a_street_query_and_limit_applies_per_kind(tmp_path):
    q = read_queries(_write(tmp_path / "q.parquet", query_image=[b"a", b"b", b"c"], product_id=["P1", "P2", "P3"]))
    assert q.street.targets == ("P1", "P2", "P3") and q.street.texts == (None,) * 3 and len(q.reformulation) == 0
    mixed = _write(tmp_path / "m.parquet", query_image=[b"a", b"b", b"c", b"d"], product_id=["P1", "P2", "P3", "P4"],
                   kind=["street", "reformulation", "street", "reformulation"],
                   query_text=["red mug", "in blue", None, "with dots"])
    q = read_queries(mixed, limit=1)
    assert q.street.targets == ("P1",) and q.reformulation.targets == ("P2",) and q.reformulation.texts == ("in blue",)


@pytest.mark.parametrize("kind, text, message", [
    ("streat", "x", "row 1: kind 'streat' is not one of street, reformulation"),
    (None, "x", "row 1: kind None is not one of street, reformulation"),
    ("reformulation", " ", "row 1: a reformulation query needs its query_text"),
    ("reformulation", None, "row 1: a reformulation query needs its query_text"),
])
def test_a_bad_row_is_an_error_naming_the_file_and_the_row(tmp_path, kind, text, message):
    uri = _write(tmp_path / "q.parquet", query_image=[b"a", b"b"], product_id=["P1", "P2"],
                 kind=pa.array(["street", kind], pa.string()), query_text=pa.array(["q", text], pa.string()))
    with pytest.raises(DataError) as err:
        read_queries(uri)
    assert str(err.value) == f"queries {uri}: {message}"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_street_recall_is_the_share_found_within_k_and_of_the_wrong_category_at_1(data):
    n = data.draw(st.integers(1, 12))
    found = np.array([data.draw(st.lists(st.integers(-1, 6), min_size=5, max_size=5)) for _ in range(n)])
    target = np.array(data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)))
    cat_of = data.draw(st.lists(st.sampled_from("ab"), min_size=7, max_size=7))
    top_cat = [cat_of[f] if f >= 0 else None for f in found[:, 0]]
    got = street_recall(found, target, (1, 5), top_cat, [cat_of[t] for t in target], digits=None)
    assert got["street_queries"] == n
    assert got["recall@1"] == sum(f[0] == t for f, t in zip(found, target)) / n
    assert got["recall@5"] == sum(t in f for f, t in zip(found, target)) / n
    assert got["wrong_category@1"] == sum(c is None or c != cat_of[t] for c, t in zip(top_cat, target)) / n
    image, fused = found[:, :1], found[:, ::-1]
    r = reformulation_recall(image, fused, target, digits=None)
    assert r == {"reformulation_queries": n, "reform_recall@1_image": float(np.mean(image[:, 0] == target)),
                 "reform_recall@1_image_text": float(np.mean(fused[:, 0] == target))}
    assert "reform_recall@1_image_text" not in reformulation_recall(image, None, target)
