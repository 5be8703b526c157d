"""Building the ``default`` policy's index at open: the ranked prefill is told each row's rank
(``Policy.prefill_rank``: the prefill rows are a run of the ranking) instead of searching
``RK`` for it, and the ranking is sorted as packed (row, rank) values instead of a stable
argsort. Both are only faster: the index built the new way equals, array for array, the one
built the old way (a binary search per prefilled row, ``np.argsort(kind="stable")``), and
the lookups after it give the same slots and counters, on random profiles of every form
(counts, top lists, an explicit pinned set, a top list naming a row twice).
"""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache import CacheIndex
from tierstore.cache.default import Default
from tierstore.cache.rankmap import sort_ranking
from tierstore.ranking import TopProfile
from tierstore.tiers.hotset import placed_slots


def _old_way(cap: int, **params) -> Default:
    """``default`` as it built its index before: no rank handed to the prefill hook (so it
    binary-searches ``RK``), the ranking from a stable argsort. (Overridden on the instance:
    the index finds the policy's kernels by its class's module.)"""
    p = Default(cap, **params)

    def ranking() -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(p._top, kind="stable")
        return p._top[order].astype(np.int64), order.astype(np.int64)

    p.prefill_rank = lambda: -1
    p.ranking = ranking
    return p


def _both(n_rows, cap, profile, pinned=None, params=None):
    params = params or {}
    new = CacheIndex(n_rows, cap, Default(cap, **params), profile=profile, pinned_rows=pinned)
    old = CacheIndex(n_rows, cap, _old_way(cap, **params), profile=profile, pinned_rows=pinned)
    return new, old


def _assert_same(new: CacheIndex, old: CacheIndex) -> None:
    assert len(new.state) == len(old.state)
    for k, (a, b) in enumerate(zip(new.state, old.state)):
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert np.array_equal(a, b), f"state array {k} differs"


def _profiles(rng, n_rows, cap):
    counts = np.zeros(n_rows, np.int64)
    hot = rng.choice(n_rows, size=int(rng.integers(1, min(n_rows, 3 * cap))), replace=False)
    counts[hot] = rng.zipf(1.3, size=hot.size).clip(1, 10**6)  # ties: many equal counts
    yield "counts", counts
    top = rng.choice(n_rows, size=int(rng.integers(1, 2 * cap)), replace=False)
    yield "top", TopProfile(top, None, n_rows, complete=True)
    yield "sparse", (hot, counts[hot])


@pytest.mark.parametrize("seed", range(6))
def test_index_built_with_ranks_equals_the_search_built_one(seed):
    rng = np.random.default_rng(seed)
    n_rows = int(rng.integers(50, 5_000))
    cap = int(rng.integers(1, n_rows))
    params = {"pin_fraction": float(rng.choice([0.0, 0.1, 0.5])),
              "initial_core": float(rng.choice([0.0, 0.5, 1.0]))}
    for name, profile in _profiles(rng, n_rows, cap):
        new, old = _both(n_rows, cap, profile, params=params)
        _assert_same(new, old)
        # and they go on the same: lookups of random and profile-skewed ids
        ids = rng.integers(0, n_rows, size=4 * cap)
        for s in range(0, ids.size, 97):
            assert np.array_equal(new.lookup(ids[s: s + 97]), old.lookup(ids[s: s + 97])), name
        _assert_same(new, old)


@pytest.mark.parametrize("seed", range(3))
def test_explicit_pinned_rows_overlapping_the_prefill(seed):
    """Pinned rows the caller chose: some of them are also among the prefill rows (skipped
    there, so the ranks handed on must still be each row's own)."""
    rng = np.random.default_rng(100 + seed)
    n_rows, cap = 2_000, 300
    top = rng.choice(n_rows, size=600, replace=False)
    pinned = np.concatenate([top[100:140], rng.choice(n_rows, size=20, replace=False)])
    pinned = np.unique(pinned)
    new, old = _both(n_rows, cap, TopProfile(top, None, n_rows, complete=True), pinned=pinned)
    _assert_same(new, old)


def test_a_top_list_naming_a_row_twice_falls_back_to_the_search():
    """A ranking with a repeated row: rank != position for it, so no rank is handed on
    (``prefill_rank`` -1) and the index is still the old one."""
    n_rows, cap = 1_000, 100
    top = np.arange(0, 400, 2, dtype=np.int64)
    top[5] = top[20]  # row 40 at ranks 5 and 20: not pinned, so prefilled at 20 with rank 5
    pinned = np.setdiff1d(top[:10], [40])
    new, old = _both(n_rows, cap, TopProfile(top, None, n_rows, complete=True), pinned=pinned)
    assert new.policy.prefill_rank() == -1
    _assert_same(new, old)


def test_ranking_is_a_stable_argsort():
    rng = np.random.default_rng(7)
    for size in (0, 1, 2, 1000):
        p = Default(max(size, 1))
        p._top = rng.integers(0, 50, size=size).astype(np.int64)  # repeats
        rows, ranks = p.ranking()
        order = np.argsort(p._top, kind="stable")
        assert np.array_equal(rows, p._top[order]) and np.array_equal(ranks, order)


@pytest.mark.parametrize("high", [1, 50, 2**11, 2**22, 2**31 - 1])
def test_radix_sorted_ranking_is_a_stable_argsort(high):
    """``sort_ranking`` (a radix sort, each 11-bit digit every row shares skipped: 0 to 3
    passes, the result in either buffer) equals a stable argsort, repeats in rank order."""
    rng = np.random.default_rng(high)
    for size in (1, 2, 3, 100, 70_000):
        top = rng.integers(0, high, size=size).astype(np.int64)
        if size > 10 and high > 10:
            top[-5:] = top[:5]  # repeats far apart
            top[3] = high - 1
        rows, ranks = sort_ranking(top)
        order = np.argsort(top, kind="stable")
        assert rows.dtype == ranks.dtype == np.int32
        assert np.array_equal(rows, top[order]) and np.array_equal(ranks, order), (high, size)
    rows, ranks = sort_ranking(np.zeros(0, np.int64))
    assert rows.size == ranks.size == 0


def test_placed_slots_equals_the_scan():
    """The placed rows a warm-up loads: slots [0, size) without a scan when the index filled
    them lowest first (every new index), else the slots holding a row (a scan): the same."""
    rng = np.random.default_rng(3)
    for n_rows, cap in ((5_000, 700), (300, 299), (1_000, 1)):
        for name, profile in _profiles(rng, n_rows, cap):
            for policy in (Default(cap), "static", "lru"):
                idx = CacheIndex(n_rows, cap, policy, profile=profile)
                ros = idx.row_of_slot
                slots, rows = placed_slots(ros, idx.size)
                want = np.flatnonzero(ros >= 0)
                assert np.array_equal(slots, want) and np.array_equal(rows, ros[want]), (name, policy)
                assert slots.dtype == rows.dtype == np.int64
    ros = np.array([5, -1, 7, 9, -1], np.int32)  # holes: the scan
    slots, rows = placed_slots(ros, 3)
    assert slots.tolist() == [0, 2, 3] and rows.tolist() == [5, 7, 9]
    slots, rows = placed_slots(np.array([4, 2, -1, 8], np.int32), 2)  # a row past size: the scan
    assert slots.tolist() == [0, 1, 3] and rows.tolist() == [4, 2, 8]
