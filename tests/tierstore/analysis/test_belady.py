"""Belady's MIN with bypass against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.analysis.belady import OptTrace, belady_hits, dedupe_batches, next_use
from tierstore.cache import CacheIndex, policy_names
from tierstore.errors import IdTypeError
from tierstore.analysis.simulate import batch_bounds, replay


def brute_force_opt(trace: list[int], cap: int) -> int:
    """Plain MIN with bypass: on a miss with a full cache, of the cached rows and the new
    one, drop the one used farthest ahead (scanning the future each time)."""
    cache: set[int] = set()
    hits = 0
    for i, r in enumerate(trace):
        if r in cache:
            hits += 1
            continue
        if cap == 0:
            continue
        if len(cache) < cap:
            cache.add(r)
            continue

        def nxt(x: int) -> int:
            for j in range(i + 1, len(trace)):
                if trace[j] == x:
                    return j
            return 1 << 60

        far = max([*cache, r], key=nxt)
        if far != r:
            cache.remove(far)
            cache.add(r)
    return hits


def test_matches_brute_force_on_small_traces():
    rng = np.random.default_rng(0)
    worst = 0
    for _ in range(300):
        n, k = int(rng.integers(1, 60)), int(rng.integers(1, 12))
        trace = rng.integers(0, k, n)
        for cap in range(0, 6):
            got, ref = belady_hits(trace, cap), brute_force_opt(trace.tolist(), cap)
            worst = max(worst, abs(got - ref))
    assert worst == 0, f"max difference from brute force: {worst} hits"


def test_hand_worked_example():
    # cap 2: a b c a b: at c, a (next 3) and b (next 4) are cached, c is never used again:
    # c bypasses, then a and b hit
    assert belady_hits(np.array([1, 2, 3, 1, 2]), 2) == 2
    # without bypass the new row would have to enter: only 1 hit
    assert belady_hits(np.array([1, 2, 3, 3, 1]), 1) == 1


def test_next_use():
    assert next_use(np.array([5, 6, 5, 5, 7])).tolist()[:3] == [2, np.iinfo(np.int64).max, 3]


@pytest.mark.slow
def test_opt_bounds_every_policy():
    rng = np.random.default_rng(1)
    trace = (rng.zipf(1.1, 2000) % 3000).astype(np.int64)
    profile = np.bincount(rng.zipf(1.1, 30_000) % 3000, minlength=3000)
    bounds = batch_bounds(trace.size, None, 1)
    for cap in (10, 100, 600):
        opt, warm = belady_hits(trace, cap), belady_hits(trace, cap, warm=True)
        assert warm >= opt
        for name in policy_names():
            idx = CacheIndex(3000, cap, name, profile=profile)
            # One bound for every policy: the optimum that starts with the same rows. static and
            # default preload rows from the profile (a prefix of those distinct rows loads them
            # without a hit); the others start empty, so theirs is the cold optimum.
            start = idx.row_of_slot[idx.row_of_slot >= 0].copy()
            bound = belady_hits(np.concatenate([start, trace]), cap)
            assert bound <= warm and (bound == opt if start.size == 0 else bound >= opt)
            replay(idx, trace, bounds)
            assert idx.hits <= bound, f"{name} at {cap} beat the optimum from its start: {idx.hits} > {bound}"


def test_warm_start_matches_brute_force():
    """Brute force over every initial cache content on tiny traces."""
    from itertools import combinations

    rng = np.random.default_rng(4)
    for _ in range(60):
        trace = rng.integers(0, 6, int(rng.integers(1, 25)))
        for cap in (1, 2, 3):
            best = 0
            for start in combinations(range(6), cap):
                # a prefix that loads `start` (distinct, so no hits), then the trace
                best = max(best, brute_force_opt([*start, *trace.tolist()], cap))
            assert belady_hits(trace, cap, warm=True) == best


def test_batches_dedupe_repeats():
    trace = np.array([1, 2, 1, 3, 3, 1])
    d, rep = dedupe_batches(trace, np.array([0, 3]))
    assert d.tolist() == [1, 2, 3, 1] and rep == 2
    # cap 1: repeats inside a batch are free; across batches MIN decides
    assert belady_hits(trace, 1, offsets=np.array([0, 3])) == 2 + belady_hits(d, 1)
    with pytest.raises(IdTypeError):
        belady_hits(np.array([1.0]), 1)


def test_dedupe_batches_against_a_plain_reference():
    """Small batches (compared pairwise) and large ones (sorted) keep each row's first use."""
    rng = np.random.default_rng(7)
    trace = rng.integers(0, 40, size=3000)
    offsets = np.r_[0, np.sort(rng.choice(np.arange(1, 3000), size=60, replace=False))]
    want, seen = [], set()
    bounds = set(offsets.tolist())
    for i, r in enumerate(trace.tolist()):
        if i in bounds:
            seen = set()
        if r not in seen:
            want.append(r)
            seen.add(r)
    got, rep = dedupe_batches(trace, offsets)
    assert got.tolist() == want and rep == trace.size - len(want)
    assert max(np.diff(np.r_[offsets, 3000])) > 32 and min(np.diff(np.r_[offsets, 3000])) <= 32


def test_one_preparation_serves_every_capacity():
    rng = np.random.default_rng(3)
    trace = (rng.zipf(1.2, 5000) % 700).astype(np.int64)
    offsets = np.arange(0, trace.size, 7)
    prepared = OptTrace(trace, offsets=offsets)
    for cap in (0, 1, 10, 100, 1000):
        for warm in (False, True):
            assert prepared.hits(cap, warm=warm) == belady_hits(trace, cap, offsets=offsets, warm=warm)
    assert prepared.hits(10) < prepared.hits(100) <= prepared.hits(100, warm=True)


@pytest.mark.parametrize("offsets", [None, np.arange(0, 5000, 7)])
def test_dense_ids_give_the_same_optimum(offsets):
    """Next uses from one backward pass over dense ids (what the profiler shares with LRU)
    equal the argsort's, so every capacity gets the same hits."""
    from tierstore.analysis.stack_distance import dense_ids

    rng = np.random.default_rng(4)
    trace = (rng.zipf(1.2, 5000) % 700).astype(np.int64) * 548_609 + 3  # ids past 4 x the trace: renumbered
    plain, dense = OptTrace(trace, offsets=offsets), OptTrace(trace, offsets=offsets, dense=dense_ids(trace))
    assert np.array_equal(plain.nxt, dense.nxt) and np.array_equal(plain.firsts, dense.firsts)
    for cap in (0, 1, 10, 100, 1000):
        for warm in (False, True):
            assert dense.hits(cap, warm=warm) == plain.hits(cap, warm=warm)


@pytest.mark.slow
def test_speed_one_million_lookups():
    import time

    rng = np.random.default_rng(2)
    trace = (rng.zipf(1.1, 1_000_000) % 200_000).astype(np.int64)
    t0 = time.perf_counter()
    belady_hits(trace, 2000)
    assert time.perf_counter() - t0 < 12, "exact MIN over 1M lookups should take ~1 s"
