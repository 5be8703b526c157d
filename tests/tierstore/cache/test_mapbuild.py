"""``mapbuild.build_map``: the parallel, ordered build of a row map at open. It must hold
exactly the (row, value) pairs ``rm_build`` inserts (a repeated row keeps its last value),
be a valid linear-probing map (every key found by ``rm_get``, absent rows not found), and
be the same bytes whatever the thread count or the input order. The byte layout differs
from ``rm_build``'s, so maps are compared by their items and by probing every key."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache import CacheIndex, mapbuild, rankmap
from tierstore.cache.default import Default
from tierstore.cache.mapbuild import PART, build_map, index_threads
from tierstore.cache.rowmap import EMPTY, _LO, new_map, rm_build, rm_get_many, rm_items
from tierstore.errors import TierStoreError
from tierstore.ranking import TopProfile


def _homes(RM: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each row's home bucket (rowmap._home in numpy)."""
    x = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x5EED0F0A)
    x ^= x >> np.uint64(29)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(32)
    return (((x >> np.uint64(32)) * np.uint64(RM.size)) >> np.uint64(32)).astype(np.int64)


def _assert_valid(RM: np.ndarray) -> None:
    """Every key's buckets from its home to its own are full (the probe reaches it)."""
    full = RM != EMPTY
    pos = np.flatnonzero(full)
    home = _homes(RM, RM[pos] >> 32)
    N = RM.size
    run = np.zeros(N + 1, np.int64)  # prefix count of empty buckets
    np.cumsum(~full, out=run[1:])
    lin = pos >= home  # no wrap: [home, pos] has no empty bucket
    assert (run[pos[lin] + 1] - run[home[lin]] == 0).all()
    w = ~lin  # wrapped: [home, N) and [0, pos]
    assert (run[N] - run[home[w]] == 0).all() and (run[pos[w] + 1] == 0).all()


def _assert_same_items(got: np.ndarray, rows: np.ndarray, vals: np.ndarray) -> None:
    want = np.full(got.size, EMPTY, np.int64)
    rm_build(want, rows, vals)
    gr, gv = rm_items(got)
    wr, wv = rm_items(want)
    assert np.array_equal(gr, wr) and np.array_equal(gv, wv)
    _assert_valid(got)
    out = np.empty(rows.size, np.int64)
    rm_get_many(got, rows, out)  # every key is found, with the last value given for it
    last = dict(zip(rows.tolist(), vals.tolist()))
    assert out.tolist() == [last[r] for r in rows.tolist()]
    cand = np.concatenate([rows + 1, rows - 1, np.arange(50)])
    absent = np.setdiff1d(cand[(cand >= 0) & (cand < 2**31)], rows)[:2000]
    out = np.empty(absent.size, np.int64)
    rm_get_many(got, absent, out)
    assert (out == -1).all()


def _cases(rng):
    for n in (1, 2, 7, 100, 5_000, 40_000):
        rows = rng.choice(10 * n + 10, size=n, replace=False).astype(np.int64)
        yield "distinct", rows, new_map(n)
        dup = rows.copy()
        dup[rng.integers(0, n, size=max(1, n // 5))] = rows[rng.integers(0, n, size=max(1, n // 5))]
        yield "repeats", dup, new_map(n)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_build_map_holds_what_rm_build_inserts(threads):
    rng = np.random.default_rng(threads)
    for name, rows, RM in _cases(rng):
        vals = rng.integers(0, 2**31 - 1, size=rows.size)
        got = RM.copy()
        dups = build_map(got, rows, vals, threads=threads)
        assert dups == rows.size - np.unique(rows).size, name
        _assert_same_items(got, rows, vals)
        got2 = RM.copy()  # vals None: a row's value is its position
        build_map(got2, rows, threads=threads)
        _assert_same_items(got2, rows, np.arange(rows.size))


def test_the_map_is_the_same_whatever_the_threads_and_the_order():
    rng = np.random.default_rng(5)
    n = 70_000  # a load of 0.8: many runs cross a part's end
    rows = rng.choice(2**31 - 1, size=n, replace=False).astype(np.int64)
    vals = rng.integers(0, 2**31 - 1, size=n)
    ref = new_map(n)
    build_map(ref, rows, vals, threads=1)
    for threads in (2, 3, 5, 16):
        got = new_map(n)
        build_map(got, rows, vals, threads=threads)
        assert np.array_equal(got, ref), threads
    perm = rng.permutation(n)
    got = new_map(n)
    build_map(got, rows[perm], vals[perm], threads=3)
    assert np.array_equal(got, ref)
    _assert_same_items(ref, rows, vals)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("threads", [1, 4])
def test_runs_crossing_parts_and_wrapping(where, threads):
    """Every key's home in one part, more keys than the part has buckets: they run through
    the following parts (carried, placed again), and from the last part around to the first."""
    rng = np.random.default_rng(11)
    RM = new_map(20 * PART)
    P = -(-RM.size // PART)
    part = {"first": 0, "middle": P // 2, "last": P - 1}[where]
    cand = np.arange(2_000_000, dtype=np.int64)
    cand = cand[_homes(RM, cand) // PART == part]
    hot = rng.choice(cand, size=min(cand.size, 3 * PART), replace=False)
    other = rng.choice(np.setdiff1d(np.arange(10_000_000, 10_200_000), hot), size=4 * PART, replace=False)
    rows = rng.permutation(np.concatenate([hot, other]))
    assert rows.size < RM.size * 0.8
    vals = np.arange(rows.size)[::-1].copy()
    got = RM.copy()
    build_map(got, rows, vals, threads=threads)
    _assert_same_items(got, rows, vals)
    if where == "last":  # the run went around the end
        assert (got[:8] != EMPTY).all() and (_homes(got, got[:8] >> 32) // PART == P - 1).any()


def test_tiny_and_empty_maps():
    for threads in (1, 3):
        RM = new_map(0)
        assert build_map(RM, np.zeros(0, np.int64), threads=threads) == 0 and (RM == EMPTY).all()
        RM = new_map(1)
        build_map(RM, np.array([5]), np.array([9]), threads=threads)
        out = np.empty(1, np.int64)
        rm_get_many(RM, np.array([5]), out)
        assert out[0] == 9 and (RM != EMPTY).sum() == 1
        RM = new_map(8)
        build_map(RM, np.array([3, 3, 3, 4]), np.array([1, 2, 7, 5]), threads=threads)
        _assert_same_items(RM, np.array([3, 3, 3, 4]), np.array([1, 2, 7, 5]))


def test_values_keep_their_sign_and_width():
    rows = np.array([1, 2, 3, 2**31 - 1], np.int64)
    vals = np.array([0, 2**31 - 1, -5, -2], np.int64)  # ghost entries are -2 - g
    RM = new_map(4)
    build_map(RM, rows, vals)
    _assert_same_items(RM, rows, vals)
    assert ((RM[RM != EMPTY] & _LO) >= 0).all()


def test_index_threads_setting(monkeypatch):
    monkeypatch.setenv("TIERSTORE_INDEX_THREADS", "3")
    assert index_threads() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("TIERSTORE_INDEX_THREADS", bad)
        with pytest.raises(TierStoreError, match="TIERSTORE_INDEX_THREADS"):
            index_threads()
    monkeypatch.delenv("TIERSTORE_INDEX_THREADS")
    assert 1 <= index_threads() <= 16


def test_default_index_builds_its_rank_map_without_sorting_the_ranking(monkeypatch):
    """The rank map no longer needs the ranking sorted by row (the sort was ~20% of open's
    index build): the index is built with ``sort_ranking`` gone, and equals, array for
    array, the one built from the sorted ranking (tests/tierstore/cache/test_prefill_ranked.py
    holds the rest of the index to the old way)."""
    rng = np.random.default_rng(2)
    n_rows, cap = 50_000, 9_000
    top = rng.choice(n_rows, size=12_000, replace=False)
    prof = TopProfile(top, None, n_rows, complete=True)
    sorted_way = Default(cap)
    sorted_way.ranked = sorted_way.ranking  # the sorted (rows, ranks) arrays, as before
    old = CacheIndex(n_rows, cap, sorted_way, profile=prof)

    def no_sort(top):
        raise AssertionError("the ranking was sorted at open")
    monkeypatch.setattr(rankmap, "sort_ranking", no_sort)
    import tierstore.cache.default as default_mod
    monkeypatch.setattr(default_mod, "sort_ranking", no_sort)
    new = CacheIndex(n_rows, cap, Default(cap), profile=prof)
    assert new.policy.prefill_rank() >= 0  # distinct rows found by the build: ranks handed on
    for k, (a, b) in enumerate(zip(new.state, old.state)):
        assert np.array_equal(a, b), f"state array {k} differs"
    assert mapbuild.PART == PART


@pytest.mark.parametrize("entries", [0, 1, 7, 1000, 70_000])
def test_empty_map_is_new_map(entries):
    for threads in (None, 1, 2, 5):
        got = mapbuild.empty_map(entries, threads=threads)
        assert got.dtype == np.int64 and np.array_equal(got, new_map(entries))
