"""The profiler's replays over direct maps (tierstore.analysis.direct) decide exactly as the
replays over the store's hashed maps: the same hits, misses, insertions and evictions for
every policy they apply to, on random, Zipf and real traces, at capacities from 1 to past
the distinct ids, with and without a profile; and the direct map itself against a dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tierstore.analysis import direct as direct_mod
from tierstore.analysis import hit_ratios as hr
from tierstore.analysis.direct import DIRECT_POLICIES, direct_index, direct_trace, ranked, usable
from tierstore.analysis.simulate import TableTrace, load_trace, simulate
from tierstore.analysis.stack_distance import dense_ids
from tierstore.cache.rowmap import EMPTY, direct_map, is_direct, new_map, rm_items, to_direct
from tierstore.errors import TierStoreError
from tierstore.ranking import TopProfile, hot_rows

from ..cache.test_rowmap import _apply  # the same ops on any map: hashed or direct

REAL = Path("/tmp/study-v41/code_test_100000_b1.trace.zst")
REAL_PROFILE = Path("/tmp/study-v41/prose_test_100000_b1.trace.zst")




@pytest.mark.parametrize("n", [1, 7, 8, 64, 1000])
def test_direct_map_matches_a_dict(n):
    """Sets, replacements, deletes (matching or not) and reads of rows 0..n-1, against a dict."""
    RM = direct_map(n)
    assert is_direct(RM) and RM.size in (n, n + 1) and RM.size % 8 and (RM == EMPTY).all()
    assert not is_direct(new_map(n))
    rng = np.random.default_rng(n)
    k = 20_000
    ops = rng.integers(0, 3, k)
    rows = rng.integers(0, n, k)
    vals = rng.integers(-2 - n, n, k)
    vals[vals == -1] = 0
    out = np.empty(k, np.int64)
    _apply(RM, ops, rows, vals, out)
    state: dict[int, int] = {}
    want = np.empty(k, np.int64)
    for i in range(k):
        r, v = int(rows[i]), int(vals[i])
        if ops[i] == 0:
            state[r] = v
        elif ops[i] == 2 or state.get(r) == v:
            state.pop(r, None)
        want[i] = state.get(r, -1)
    np.testing.assert_array_equal(out, want)
    got_rows, got_vals = rm_items(RM)
    keys = sorted(state)
    np.testing.assert_array_equal(got_rows, keys)
    np.testing.assert_array_equal(got_vals, [state[r] for r in keys])


def test_to_direct_holds_the_hashed_maps_entries_and_refuses_a_row_past_it():
    RM = new_map(100)
    for r, v in ((5, 3), (99, -7), (0, 0), (42, 41)):
        rm_set_py(RM, r, v)
    D = to_direct(RM, 100)
    for a, b in zip(rm_items(RM), rm_items(D)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TierStoreError, match="cannot hold row 99"):
        to_direct(RM, 99)


def rm_set_py(RM, r, v):
    _apply(RM, np.zeros(1, np.int64), np.array([r]), np.array([v]), np.empty(1, np.int64))


def test_direct_trace_numbers_the_most_accessed_first_then_ranked_rows_not_in_the_trace():
    rows = np.array([900, 7, 7, 300, 7, 55, 300, 1000, 55, 55, 55], np.int64)
    d = direct_trace(rows, dense_ids(rows))
    # 55 (4 accesses) -> 0, 7 (3) -> 1, 300 (2) -> 2, then 900 and 1000 (1 each) in row order
    np.testing.assert_array_equal(d.rows, [3, 1, 1, 2, 1, 0, 2, 4, 0, 0, 0])
    assert d.universe == 5 and d.profile is None
    profile = TopProfile.from_pairs(np.array([300, 12, 1000, 7]), np.array([9, 8, 7, 1]), 2000)
    r = ranked(d, profile, 2000, 3)
    # ranked 300, 12 (not in the trace: the next id, 5), 1000; the trace's ids unchanged
    assert r.rows is d.rows and r.universe == 6
    np.testing.assert_array_equal(hot_rows(r.profile, 3), [2, 5, 4])
    assert not r.profile.complete and ranked(d, profile, 2000, 10).profile.complete  # 4 < 10: all of them
    assert ranked(d, None, 2000, 3) is d


def _zipf(n, universe, s, seed):
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, universe + 1) ** s
    ranks = rng.choice(universe, size=n, p=w / w.sum())
    scatter = rng.choice(10**6, size=universe, replace=False)  # ids spread over the table
    return scatter[ranks].astype(np.int64)


def _traces():
    rng = np.random.default_rng(7)
    yield "uniform", rng.integers(0, 3000, 20_000).astype(np.int64), None, None
    z = _zipf(30_000, 5000, 0.9, 1)
    yield "zipf", z, None, _zipf(30_000, 5000, 0.9, 2)
    yield "zipf-batched", z, np.arange(0, z.size, 24, dtype=np.int64), _zipf(30_000, 5000, 0.8, 3)
    if REAL.is_file():
        t = load_trace(REAL).tables
        name = sorted(t)[0]
        real = t[name].rows[:60_000]
        off = t[name].offsets
        off = off[off < real.size] if off is not None else None
        prof = load_trace(REAL_PROFILE).tables if REAL_PROFILE.is_file() else None
        yield "real", real, off, (prof[name].rows[:200_000] if prof and name in prof else _zipf(30_000, 5000, 0.9, 4))


@pytest.mark.parametrize("policy", sorted(DIRECT_POLICIES))
def test_direct_replay_decides_as_the_hashed_replay(policy, monkeypatch):
    """Every policy of DIRECT_POLICIES, every trace, capacities 1 to past the distinct ids,
    with and without a profile (of other accesses: ranked rows not in the trace too)."""
    built = []
    real_index = direct_mod.direct_index
    monkeypatch.setattr("tierstore.analysis.simulate.direct_index",
                        lambda *a, **k: built.append(1) or real_index(*a, **k))
    for kind, rows, off, prof_rows in _traces():
        n_rows = int(max(rows.max(), prof_rows.max() if prof_rows is not None else 0)) + 1
        distinct = np.unique(rows).size
        caps = [1, 3, 50, distinct // 4, distinct - 1, distinct + 10]
        for profiled in (False, True):
            if profiled and prof_rows is None:
                continue
            seen, cnt = np.unique(prof_rows, return_counts=True) if profiled else (None, None)
            profile = TopProfile.from_pairs(seen, cnt, n_rows) if profiled else None
            d = ranked(direct_trace(rows, dense_ids(rows)), profile, n_rows, max(caps))
            for cap in caps:
                want = simulate(rows, [cap], [policy], n_rows=n_rows, offsets=off, profile=profile)[0]
                n0 = len(built)
                got = simulate(rows, [cap], [policy], n_rows=n_rows, offsets=off, profile=profile, direct=d)[0]
                assert len(built) == n0 + 1  # one capacity: lru replays through the walk too
                key = (kind, profiled, cap)
                assert (got.hits, got.misses, got.insertions, got.evictions) == \
                       (want.hits, want.misses, want.insertions, want.evictions), key
    assert built


def test_direct_index_state_matches_the_hashed_index_after_a_replay():
    """Past the counters: the same rows in the same slots (the original ids through the
    renumbering), for default with a profile whose ranked rows are partly absent."""
    rows = _zipf(20_000, 3000, 0.9, 5)
    prof = _zipf(20_000, 3000, 0.9, 6)
    n_rows = int(max(rows.max(), prof.max())) + 1
    seen, cnt = np.unique(prof, return_counts=True)
    profile = TopProfile.from_pairs(seen, cnt, n_rows)
    cap = 700
    d = ranked(direct_trace(rows, dense_ids(rows)), profile, n_rows, cap)
    from tierstore.analysis.simulate import replay, batch_bounds
    from tierstore.cache import CacheIndex

    a = CacheIndex(n_rows, cap, "default", profile=profile)
    b = direct_index(d, cap, "default", profiled=True)
    assert is_direct(b.state[1]) and is_direct(b.state[10])
    bounds = batch_bounds(rows.size, None)
    replay(a, rows, bounds)
    replay(b, d.rows, bounds)
    # the original row of each direct id: the trace's, and the ranked rows' (hot_rows)
    orig_of = np.full(d.universe, -1, np.int64)
    orig_of[d.rows] = rows
    orig_of[d.profile.rows] = hot_rows(profile, cap)
    held = b.row_of_slot >= 0
    np.testing.assert_array_equal(a.row_of_slot >= 0, held)
    np.testing.assert_array_equal(a.row_of_slot[held], orig_of[b.row_of_slot[held]])


def test_usable_only_where_the_decisions_cannot_change():
    rows = np.arange(10, dtype=np.int64)
    d = direct_trace(rows, dense_ids(rows))
    assert usable(d, "lfu", 5, False, 0)
    assert not usable(d, "wtinylfu", 5, False, 0)  # its sketch hashes the row
    assert not usable(d, "default", 5, False, 2)  # hints: the hint table hashes the row
    assert not usable(d, "default", 5, True, 0)  # a profile the renumbering did not rank
    profile = TopProfile.from_pairs(np.arange(20), np.arange(20, 0, -1), 20)
    dp = ranked(d, profile, 20, 4)
    assert usable(dp, "default", 4, True, 0) and not usable(dp, "default", 5, True, 0)


def test_policy_hit_ratios_direct_gives_the_hashed_results(monkeypatch):
    """The profiler end to end (every policy, 3 capacities, a profile): the same results as
    with the direct replays switched off."""
    from tierstore.ranking import TopProfile as TP

    rows = _zipf(40_000, 6000, 0.9, 8)
    off = np.arange(0, rows.size, 24, dtype=np.int64)
    prof = _zipf(40_000, 6000, 0.9, 9)
    n_rows = 10**6
    seen, cnt = np.unique(prof, return_counts=True)
    t = hr.TracedTable("t", TableTrace(rows, off, n_rows), n_rows, "table rows", n_rows, None,
                       TP.from_pairs(seen, cnt, n_rows))
    pols = ["lru", "lfu", "s3fifo", "wtinylfu", "arc", "static", "default", "opt"]
    caps = [40, 400, 4000]
    built = []
    real_index = direct_mod.direct_index
    monkeypatch.setattr("tierstore.analysis.simulate.direct_index",
                        lambda *a, **k: built.append(a[2]) or real_index(*a, **k))
    on = hr.policy_hit_ratios(t, caps, pols, workers=2)
    assert sorted(set(built)) == ["arc", "default", "lfu", "s3fifo", "static"]  # lru, opt: no replays
    monkeypatch.setattr(hr, "DIRECT_POLICIES", frozenset())
    off_ = hr.policy_hit_ratios(t, caps, pols, workers=2)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in on]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in off_]
    assert len(on) == len(pols) * len(caps)
