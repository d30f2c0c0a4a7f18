"""Kept search lists carried through changes (indexing.candidates, issue #31): night after
night, every search a list can answer equals the same search on an index rebuilt from the
current vectors with the same trained codes, and a list says when it cannot answer."""
from __future__ import annotations

import faiss
import numpy as np
from hypothesis import given, settings, strategies as st

from mimdex.indexing import candidates as cand

D, NLIST = 16, 16


def _index(trained: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    index = faiss.clone_index(trained)
    index.add_with_ids(vectors, ids)
    return index


def _search(index: faiss.Index, queries: np.ndarray, n: int, nprobe: int):
    index.nprobe = nprobe
    dists, ids = index.search(queries, n)
    return dists, ids


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), nprobe=st.sampled_from([1, 2, 4]), churn=st.sampled_from([0.01, 0.05, 0.2]))
def test_carried_lists_answer_as_a_rebuilt_index_does(seed, nprobe, churn):
    rng = np.random.default_rng(seed)
    trained = faiss.index_factory(D, f"IVF{NLIST},SQ8")
    trained.train(rng.standard_normal((2000, D)).astype(np.float32))
    vectors = {int(i): v for i, v in zip(rng.choice(1 << 40, 1500, replace=False), rng.standard_normal((1500, D)))}
    queries = rng.standard_normal((40, D)).astype(np.float32)
    qkeys = np.arange(40, dtype=np.int64)
    c = cand.capacity(1)

    def current():
        ids = np.array(sorted(vectors), np.int64)
        return _index(trained, np.array([vectors[i] for i in ids], np.float32), ids)

    dists, ids = _search(current(), queries, c + 1, nprobe)
    lists = cand.from_search(qkeys, nprobe, dists, ids, ids, None, c)
    answered = 0
    for _ in range(4):
        removed = rng.choice(sorted(vectors), int(churn * len(vectors)), replace=False)
        for i in removed.tolist():
            del vectors[i]
        new = {int(i): v for i, v in zip(rng.integers(1 << 41, 1 << 42, int(churn * 1500)),
                                         rng.standard_normal((int(churn * 1500), D)))}
        vectors.update(new)
        nids = np.array(sorted(new), np.int64)
        delta = _index(trained, np.array([new[i] for i in nids], np.float32), nids)
        ad, ai = _search(delta, queries, c + 1, nprobe)
        added = cand.Lists(qkeys, lists.nprobe, ai, ai, np.where(ai >= 0, ad, np.inf).astype(np.float32), None,
                           lists.bound)
        lists = cand.update(lists, removed, added)
        rebuilt = current()
        for k in (2, 11, 101):
            got, known = cand.answer(lists, k, 1)
            _, want = _search(rebuilt, queries, k, nprobe)
            assert np.array_equal(got[known], want[known]), k
            answered += known.sum()
        # what a list holds below its bound is exactly the rebuilt index's nearest
        full_d, full_i = _search(rebuilt, queries, c + 1, nprobe)
        for r in range(len(queries)):
            below = lists.dists[r] < lists.bound[r]
            assert np.array_equal(lists.ids[r][below], full_i[r][:below.sum()])
            np.testing.assert_array_equal(lists.dists[r][below], full_d[r][:below.sum()])
    # at a 1% or 5% churn the margin carries every list through four nights
    if churn < 0.2:
        assert answered == 4 * 3 * len(queries)


def test_a_list_the_change_cut_short_says_it_cannot_answer():
    ids = np.array([[5, 6, 7, -1]], np.int64)
    lists = cand.Lists(np.array([0]), np.array([1], np.int32), ids, ids,
                       np.array([[0.1, 0.2, 0.3, np.inf]], np.float32), None, np.array([0.35], np.float32))
    after = cand.update(lists, np.array([6]), None)
    assert after.ids[0].tolist() == [5, 7, -1, -1] and after.bound[0] == np.float32(0.35)
    assert cand.answer(after, 2, 1)[1].tolist() == [True]
    assert cand.answer(after, 3, 1)[1].tolist() == [False]   # a third may lie anywhere at 0.35 or beyond
    # a list holding every candidate of its probed lists (bound inf) answers any k
    whole = cand.Lists(np.array([0]), np.array([1], np.int32), ids, ids,
                       np.array([[0.1, 0.2, 0.3, np.inf]], np.float32), None, np.array([np.inf], np.float32))
    got, known = cand.answer(whole, 4, 1)
    assert known.tolist() == [True] and got[0].tolist() == [5, 6, 7, -1]


def test_the_code_drift_check_tells_vectors_the_codebooks_fit_from_ones_they_do_not():
    """--max-code-drift (2.0): new vectors from the training distribution stay near the
    old ones' code error, vectors from elsewhere (a new kind of product) do not."""
    from mimdex.infra.contracts import index_codec as codec
    from mimdex.pipelines.refresh.update import code_error

    rng = np.random.default_rng(0)
    for factory in ("IVF16,SQ8", "IVF16,PQ8x4fs,Refine(SQ8)"):
        index = faiss.index_factory(D, factory)
        index.train(rng.standard_normal((4000, D)).astype(np.float32))
        trained = codec.serialize(index)
        old = code_error(trained, rng.standard_normal((1000, D)).astype(np.float32))
        same = code_error(trained, rng.standard_normal((2000, D)).astype(np.float32))
        shifted = code_error(trained, 2.5 * rng.standard_normal((2000, D)).astype(np.float32) + 1.0)
        assert same / old < 1.2 and shifted / old > 2.0, (factory, same / old, shifted / old)
    assert code_error(trained, np.zeros((0, D), np.float32)) is None
