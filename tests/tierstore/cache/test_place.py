"""Building an index at open: the pinned rows and the policy's prefill rows are mapped to
their slots by one ``build_map`` (``index._place``), not the prefill's one-by-one inserts
(``walk.prefill``, ~30 ns a row at 40M slots, issue 19's open). Only faster: the index
equals, array for array, the one built the old way, except the row map's layout, which
holds the same (row, slot) set (mapbuild's ordered layout); the lookups after it give the
same slots and counters. A prefill row that repeats a pinned row or an earlier prefill row
falls back to the old way (its slots differ: ``walk.prefill`` skips it).
"""

from __future__ import annotations

import numpy as np
import pytest

import tierstore.cache.index as index_mod
from tierstore.cache import CacheIndex
from tierstore.cache import walk
from tierstore.cache.default import Default
from tierstore.cache.mapbuild import build_map
from tierstore.ranking import TopProfile

from .helpers import dense_map, mapped


def _old_place(M, RM, ros, pinned, pre):
    """``index._place`` as the index placed rows before: the pinned rows alone, then (the
    -1) ``walk.prefill`` one row at a time."""
    ros[: pinned.size] = pinned
    ros[pinned.size:] = -1
    build_map(RM, pinned)
    return -1


def _old_index(monkeypatch, *a, **k) -> CacheIndex:
    with monkeypatch.context() as m:
        m.setattr(index_mod, "_place", _old_place)
        return CacheIndex(*a, **k)


def _assert_same(new: CacheIndex, old: CacheIndex) -> None:
    for k, (a, b) in enumerate(zip(new.state, old.state)):
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if k != 1:  # the row map: the same set (its layout is mapbuild's)
            assert np.array_equal(a, b), f"state array {k} differs"
    for a, b in zip(mapped(new), mapped(old)):
        assert np.array_equal(a, b), "the row maps hold different (row, slot) sets"
    assert np.array_equal(dense_map(new), dense_map(old))


def _profiles(rng, n_rows, cap):
    counts = np.zeros(n_rows, np.int64)
    hot = rng.choice(n_rows, size=int(rng.integers(1, min(n_rows, 3 * cap))), replace=False)
    counts[hot] = rng.zipf(1.3, size=hot.size).clip(1, 10**6)  # ties
    yield "counts", counts
    top = rng.choice(n_rows, size=int(rng.integers(1, min(n_rows, 2 * cap))), replace=False)
    yield "top", TopProfile(top, None, n_rows, complete=True)
    yield "sparse", (hot, counts[hot])


@pytest.mark.parametrize("seed", range(5))
def test_one_build_of_pinned_and_prefill_rows_equals_the_one_by_one_inserts(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n_rows = int(rng.integers(50, 20_000))
    cap = int(rng.integers(1, n_rows))
    params = {"pin_fraction": float(rng.choice([0.0, 0.1, 0.5, 1.0])),
              "initial_core": float(rng.choice([0.0, 0.5, 1.0]))}
    for name, profile in _profiles(rng, n_rows, cap):
        for policy in ("default", "static", "lru", "s3fifo"):
            mk = (lambda: Default(cap, **params)) if policy == "default" else (lambda: policy)
            new = CacheIndex(n_rows, cap, mk(), profile=profile, rng=1)
            old = _old_index(monkeypatch, n_rows, cap, mk(), profile=profile, rng=1)
            _assert_same(new, old)
            ids = rng.integers(0, n_rows, size=3 * cap)
            for s in range(0, ids.size, 89):
                assert np.array_equal(new.lookup(ids[s: s + 89]), old.lookup(ids[s: s + 89])), (name, policy)
            _assert_same(new, old)
            assert new.stats() == old.stats()


def test_the_comparison_sees_a_different_placement(monkeypatch):
    """Negative control: an index whose prefill rows went into other slots (here: reversed)
    is told apart from the old way's."""
    n_rows, cap = 5_000, 1_000
    top = np.random.default_rng(4).choice(n_rows, size=1_500, replace=False)
    prof = TopProfile(top, None, n_rows, complete=True)
    real = index_mod._place

    def reversed_place(M, RM, ros, pinned, pre):
        return real(M, RM, ros, pinned, pre[: int(M[index_mod.M_NFREE])][::-1].copy())
    monkeypatch.setattr(index_mod, "_place", reversed_place)
    bad = CacheIndex(n_rows, cap, Default(cap), profile=prof)
    monkeypatch.undo()
    old = _old_index(monkeypatch, n_rows, cap, Default(cap), profile=prof)
    with pytest.raises(AssertionError):
        _assert_same(bad, old)
    _assert_same(CacheIndex(n_rows, cap, Default(cap), profile=prof), old)


def test_default_index_maps_its_prefill_in_the_one_map_build(monkeypatch):
    """The work removed: ``walk.prefill`` (a probe and an insert per row) is not called; the
    row map is built once, from the policy's ranking itself (pinned and prefill rows are one
    run of it: no copy). Main called ``walk.prefill`` once per index."""
    n_rows, cap = 100_000, 20_000
    top = np.random.default_rng(5).choice(n_rows, size=30_000, replace=False)
    prof = TopProfile(top, None, n_rows, complete=True)
    calls = {"prefill": 0, "builds": []}
    real_build, real_prefill = index_mod.build_map, walk.prefill

    def prefill(*a):
        calls["prefill"] += 1
        return real_prefill(*a)

    def build(RM, rows, *a, **k):
        calls["builds"].append(rows)
        return real_build(RM, rows, *a, **k)
    monkeypatch.setattr(index_mod.walk, "prefill", prefill)
    monkeypatch.setattr(index_mod, "build_map", build)
    idx = CacheIndex(n_rows, cap, Default(cap), profile=prof)
    monkeypatch.undo()
    assert calls["prefill"] == 0
    assert len(calls["builds"]) == 1
    rows = calls["builds"][0]
    assert rows.size == cap and np.shares_memory(rows, idx.policy._top)
    assert np.array_equal(rows, top[:cap]) and np.array_equal(idx.row_of_slot, top[:cap])
    assert idx.size == cap and idx.insertions == 0


def test_a_prefill_row_repeating_a_pinned_one_takes_the_old_way(monkeypatch):
    """Pinned rows of the caller's that the prefill also names: the one-build placement
    would give the repeated row two slots, so the index falls back to ``walk.prefill`` (once)
    and is the old way's, slot for slot (the repeated rows skipped)."""
    n_rows, cap = 3_000, 400
    rng = np.random.default_rng(6)
    top = rng.choice(n_rows, size=900, replace=False)
    pinned = np.unique(np.concatenate([top[50:90], rng.choice(n_rows, size=10, replace=False)]))
    prof = TopProfile(top, None, n_rows, complete=True)
    called = []
    real = walk.prefill
    monkeypatch.setattr(index_mod.walk, "prefill", lambda *a: called.append(1) or real(*a))
    new = CacheIndex(n_rows, cap, Default(cap), profile=prof, pinned_rows=pinned)
    assert called == [1]
    monkeypatch.undo()
    old = _old_index(monkeypatch, n_rows, cap, Default(cap), profile=prof, pinned_rows=pinned)
    _assert_same(new, old)
    assert np.array_equal(new.state[1], old.state[1])  # the old way's very bytes
    placed = new.row_of_slot[new.row_of_slot >= 0]  # the pinned rows, then the prefill's others
    assert placed.size == np.union1d(pinned, top[pinned.size: cap]).size < cap


def test_joined_is_a_view_only_of_adjacent_runs():
    a = np.arange(10, dtype=np.int64)
    j = index_mod._joined(a[:4], a[4:9])
    assert np.shares_memory(j, a) and j.tolist() == list(range(9))
    j = index_mod._joined(a[:4], a[5:9])  # a gap: a copy
    assert not np.shares_memory(j, a) and j.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    b = np.arange(10, 20, dtype=np.int64)
    assert index_mod._joined(a[:2], b[:2]).tolist() == [0, 1, 10, 11]
    assert index_mod._joined(a[:0], b[:2]).tolist() == [10, 11]
    assert index_mod._joined(a[:2], b[:0]).tolist() == [0, 1]
