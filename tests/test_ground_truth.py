"""The gate's ground truth updated from each change equals a full recomputation
(indexing/truth.py; the refresh's use of it is in test_refresh_delta.py)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mimdex.indexing import truth as gt


class Catalog:
    """Products with 1-3 vectors each (photos): vector id = key * 8 + photo."""

    def __init__(self, rng: np.random.Generator, d: int):
        self.rng, self.d, self.next_key = rng, d, 0
        self.vectors: dict[int, np.ndarray] = {}   # key -> photos x d

    def add(self, n: int) -> list[int]:
        keys = list(range(self.next_key, self.next_key + n))
        self.next_key += n
        for k in keys:
            self.vectors[k] = self.rng.standard_normal((int(self.rng.integers(1, 4)), self.d)).astype(np.float32)
        return keys

    def rows(self, keys) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = [k for k in keys if k in self.vectors]
        if not keys:
            return np.zeros((0, self.d), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
        v = np.concatenate([self.vectors[k] for k in keys])
        ids = np.array([k * 8 + p for k in keys for p in range(len(self.vectors[k]))], np.int64)
        return v, ids, ids // 8

    def blocks(self, size: int = 37):
        v, ids, keys = self.rows(sorted(self.vectors))
        return [(v[a:a + size], ids[a:a + size], keys[a:a + size]) for a in range(0, len(v), size)]


def _held(cat: Catalog, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = cat.rng.choice(sorted(cat.vectors), n, replace=False)
    return np.stack([cat.vectors[k][0] for k in keys]), keys.astype(np.int64) * 8, keys.astype(np.int64)


def _assert_same(updated: gt.QueryTruth, fresh: gt.QueryTruth) -> None:
    assert np.array_equal(updated.own, fresh.own)
    assert np.array_equal(updated.nearest, fresh.nearest)
    # every neighbour the update knows is the full pass's, in the same place
    known = updated.dists < updated.bound[:, None]
    assert np.array_equal(updated.ids[known], fresh.ids[known])
    assert np.array_equal(updated.keys[known], fresh.keys[known])
    np.testing.assert_allclose(updated.dists[known], fresh.dists[known], rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31), nights=st.integers(1, 6), add=st.integers(0, 30),
       change=st.integers(0, 30), delete=st.integers(0, 30))
def test_updated_truth_equals_a_full_recomputation_after_every_night(seed, nights, add, change, delete):
    rng = np.random.default_rng(seed)
    cat = Catalog(rng, 8)
    cat.add(150)
    held, own, own_keys = _held(cat, 20)
    street = rng.standard_normal((10, 8)).astype(np.float32)
    truths = [gt.full("held_out", held, own, own_keys, cat.blocks()),
              gt.full("street", street, None, None, cat.blocks())]
    recomputed = 0
    for _ in range(nights):
        alive = sorted(cat.vectors)
        changed = [int(k) for k in rng.choice(alive, min(change, len(alive) // 3), replace=False)]
        deleted = [int(k) for k in rng.choice(sorted(set(alive) - set(changed)), min(delete, len(alive) // 3),
                                              replace=False)]
        for k in deleted:
            del cat.vectors[k]
        for k in changed:  # a new photo list: new vectors under the same product
            cat.vectors[k] = rng.standard_normal((int(rng.integers(1, 4)), 8)).astype(np.float32)
        added = changed + cat.add(add)
        v, ids, keys = cat.rows(added)
        removed = np.array(changed + deleted, np.int64)
        out = []
        for t in truths:
            t = gt.update(t, removed, v, ids, keys)
            out.append(t)
        stale = [np.flatnonzero(t.stale()) for t in out]
        recomputed += sum(len(s) for s in stale)
        truths = list(gt.recompute(tuple(out), stale, cat.blocks()))
        held_t, street_t = truths
        assert not np.isin(held_t.own_keys, removed).any()     # held-out queries of removed products left
        assert len(street_t.vectors) == 10                      # street queries never leave
        for t in truths:
            assert not t.stale().any()
            _assert_same(t, gt.full(t.name, t.vectors, t.own if t.name == "held_out" else None,
                                    t.own_keys if t.name == "held_out" else None, cat.blocks()))


def test_a_quiet_night_changes_nothing_and_recomputes_nothing():
    cat = Catalog(np.random.default_rng(3), 16)
    cat.add(500)
    held, own, keys = _held(cat, 40)
    before = gt.full("held_out", held, own, keys, cat.blocks())
    after = gt.update(before, np.zeros(0, np.int64), np.zeros((0, 16), np.float32), np.zeros(0, np.int64),
                      np.zeros(0, np.int64))
    assert not after.stale().any()
    for f in ("own", "ids", "keys", "dists", "bound"):
        assert np.array_equal(getattr(after, f), getattr(before, f)), f


def test_a_list_emptied_by_deletions_is_marked_stale_and_only_it_is_recomputed():
    cat = Catalog(np.random.default_rng(5), 8)
    cat.add(200)
    street = np.random.default_rng(6).standard_normal((5, 8)).astype(np.float32)
    t = gt.full("street", street, None, None, cat.blocks())
    gone = np.unique(t.keys[0])           # every product in query 0's list
    for k in gone.tolist():
        del cat.vectors[k]
    u = gt.update(t, gone, np.zeros((0, 8), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    stale = u.stale()
    assert stale[0] and stale.sum() < len(stale)
    (fixed,) = gt.recompute((u,), [np.flatnonzero(stale)], cat.blocks())
    _assert_same(fixed, gt.full("street", street, None, None, cat.blocks()))


def test_a_drawn_held_out_set_finds_its_products_keys_in_the_same_pass():
    cat = Catalog(np.random.default_rng(9), 8)
    cat.add(100)
    v, ids, keys = cat.rows(sorted(cat.vectors))
    pick = np.random.default_rng(1).choice(len(ids), 12, replace=False)  # photos of any position
    t = gt.full("held_out", v[pick], ids[pick], None, cat.blocks())
    assert np.array_equal(t.own_keys, keys[pick])
    assert all(ids[pick][i] not in t.ids[i] for i in range(len(pick)))  # never its own neighbour


def test_a_query_with_more_identical_neighbours_than_k_is_not_stale():
    """Catalogs repeat images: 30 products share one vector. The nearest distance is exact
    (every unseen vector is at least as far), so nothing is recomputed night after night."""
    cat = Catalog(np.random.default_rng(11), 8)
    cat.add(100)
    same = cat.vectors[0][:1]
    for k in range(100, 130):
        cat.vectors[k] = same.copy()
    t = gt.full("street", same, None, None, cat.blocks())
    assert t.dists[0, 0] == 0.0 and t.bound[0] == 0.0 and not t.stale().any()
    removed = np.unique(t.keys[0])[:5]
    for k in removed.tolist():
        del cat.vectors[k]
    u = gt.update(t, removed, np.zeros((0, 8), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert not u.stale().any() and u.dists[0, 0] == 0.0
    fresh = gt.full("street", same, None, None, cat.blocks())
    assert fresh.dists[0, 0] == u.dists[0, 0] and cat.rows([int(u.keys[0, 0])])[0].tolist() == [same[0].tolist()]
