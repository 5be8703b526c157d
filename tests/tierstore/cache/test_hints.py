"""The hint table's batch add (tierstore.cache.hints.hint_rows, what ``Store.hint`` runs)
against its definition: ``hint_add`` of the batch's distinct rows in ascending order.

``hint_rows`` does not sort: it remembers the buckets a batch touched, so duplicates count
once and the smaller of two rows sharing a bucket wins it, as the sorted walk decides. The
tables here are small (64-256 buckets) so batches collide often, with outstanding, stale
and expired hints already in the table, batches in random and in sorted order.
"""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache import CacheIndex
from tierstore.cache.hints import H_KEY, hint_add, hint_rows
from tierstore.cache.layout import CACHED, M_HLAST, M_HLIVE, M_HORIZON, M_TICK, NM, NONE
from tierstore.cache.walk import announce


def _fresh_state(buckets: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    M = np.zeros(NM, np.int64)
    M[M_HORIZON] = horizon
    return M, np.zeros((2, buckets), np.int64)


def _sorted_reference(M, HT, rows) -> None:
    """The definition (and main's ``walk.announce`` before this change): np.unique, then
    ``hint_add`` per row in ascending order."""
    for r in np.unique(rows):
        hint_add(M, HT, r)


@pytest.mark.parametrize("buckets", [64, 256])
@pytest.mark.parametrize("order", ["random", "sorted", "descending"])
def test_hint_rows_equals_sorted_hint_add(buckets, order):
    rng = np.random.default_rng(buckets)
    M1, HT1 = _fresh_state(buckets, horizon=40)
    M2, HT2 = M1.copy(), HT1.copy()
    collided = 0
    for step in range(300):
        n = int(rng.choice([1, 2, 5, 24, 64, 200]))
        # few distinct rows over few buckets: duplicates and shared buckets in most batches
        rows = rng.integers(0, 3 * buckets, n).astype(np.int64)
        if order == "sorted":
            rows = np.unique(rows)
        elif order == "descending":
            rows = np.sort(rows)[::-1].copy()
        _sorted_reference(M1, HT1, rows)
        hint_rows(M2, HT2, rows)
        assert np.array_equal(HT1, HT2), f"step {step}: hint tables differ (batch of {n}, {order})"
        assert np.array_equal(M1, M2), f"step {step}: counters differ (batch of {n}, {order})"
        collided += np.unique(rows).size > np.unique(HT1[H_KEY] >> 8).size
        # time passes: some hints expire (horizon 40), and some are used
        tick = int(rng.integers(0, 30))
        M1[M_TICK] += tick
        M2[M_TICK] += tick
    assert M1[M_HLIVE] > 0 and M1[M_HLAST] > 0  # the table was in use throughout
    assert collided > 0  # batches had more rows than buckets they could hold: collisions resolved


def test_announce_equals_the_sorted_walk_with_a_host_tier():
    """walk.announce: the device tier hears every id, the host tier the ids the device tier
    does not hold, each as hint_add of the distinct rows in ascending order."""
    rng = np.random.default_rng(3)
    dev = CacheIndex(5000, 200, "default")
    host = CacheIndex(5000, 600, "default")
    dev.hint_table()
    host.hint_table()
    dev.lookup(rng.permutation(5000)[:150].astype(np.int64))  # rows the device tier holds
    ref_d = tuple(a.copy() for a in dev.state)
    ref_h = tuple(a.copy() for a in host.state)
    held = dev.slots_of(np.arange(5000)) >= 0
    for _ in range(50):
        rows = rng.integers(0, 5000, int(rng.integers(1, 400))).astype(np.int64)
        announce(CACHED, dev.state, CACHED, host.state, rows)
        _sorted_reference(ref_d[0], ref_d[9], rows)
        u = np.unique(rows)
        _sorted_reference(ref_h[0], ref_h[9], u[~held[u]])
        ref_d[0][M_TICK] += 7
        ref_h[0][M_TICK] += 7
        dev.state[0][M_TICK] += 7
        host.state[0][M_TICK] += 7
    for a, b in zip(ref_d, dev.state):
        assert np.array_equal(a, b), "device tier's state differs from the sorted walk"
    for a, b in zip(ref_h, host.state):
        assert np.array_equal(a, b), "host tier's state differs from the sorted walk"
    assert host.state[0][M_HLIVE] > 0 and dev.state[0][M_HLIVE] > 0


def test_announce_to_the_host_tier_alone():
    """No device tier (NONE): the host tier hears every id."""
    rng = np.random.default_rng(4)
    host = CacheIndex(5000, 600, "default")
    host.hint_table()
    ref = tuple(a.copy() for a in host.state)
    for _ in range(20):
        rows = rng.integers(0, 5000, 300).astype(np.int64)
        announce(NONE, host.state, CACHED, host.state, rows)
        _sorted_reference(ref[0], ref[9], rows)
    assert np.array_equal(ref[9], host.state[9]) and np.array_equal(ref[0], host.state[0])


@pytest.mark.parametrize("horizon", [None, 60])
def test_the_all_hit_path_consumes_hints_as_the_walk(horizon):
    """The decode path (the policy's ``all_hits``: walk.all_hits_with) consumes hints exactly
    as the walk's ``access`` does: the same hint table and counters after every lookup. With
    hints live and no expiry due it takes ``hint_use`` (no call per row); where the horizon
    passes inside a lookup, ``hint_consume`` with its idle clear: both are exercised."""
    from tierstore.cache import make_policy

    rng = np.random.default_rng(5)
    params = {} if horizon is None else {"hint_horizon": horizon}
    fast, walk = (CacheIndex(5000, 400, make_policy("default", 400, **params)) for _ in range(2))
    held = rng.permutation(5000)[:300].astype(np.int64)
    for idx in (fast, walk):
        idx.lookup(held)
    batches = [held[rng.integers(0, 300, int(rng.integers(1, 40)))] for _ in range(400)]
    quick = slow = 0
    for i, b in enumerate(batches):
        if i % 50 < 40:  # hints for the next batches and for rows never looked up; then a pause
            future = np.concatenate([batches[(i + 1) % 400], batches[(i + 2) % 400], rng.integers(1000, 5000, 5)])
            for idx in (fast, walk):
                idx.hint(future)
        M = fast.state[0]
        if M[M_HLIVE] > 0:
            if M[M_TICK] + b.size - 1 - M[M_HLAST] <= M[M_HORIZON]:
                quick += 1
            else:
                slow += 1
        slots = np.empty(b.size, np.int64)
        assert fast.all_hits(fast.state, b, slots), f"batch {i}: not all hits"
        walk.lookup(b)
        assert np.array_equal(fast.state[9], walk.state[9]), f"batch {i}: hint tables differ"
        for k, name in [(M_HLIVE, "live hints"), (M_HLAST, "latest hint"), (M_TICK, "ticks")]:
            assert fast.state[0][k] == walk.state[0][k], f"batch {i}: {name} differ"
    assert quick > 100
    assert slow > 0 or horizon is None
