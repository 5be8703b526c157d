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
from tierstore.cache.layout import CACHED, M_EPOCH, M_HLAST, M_HLIVE, M_HORIZON, M_TICK, NM, NONE
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


_MASK = (1 << 64) - 1


def _bucket_py(r: int, nb: int) -> int:
    """hints._bucket_of in Python integers (splitmix64's finaliser, seed 11, top 32 bits scaled)."""
    x = (r * 0x9E3779B97F4A7C15 + 11) & _MASK
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 32
    return ((x >> 32) * nb) >> 32


class _HintModel:
    """The hint table as the module docstring defines it, in plain Python: a hint batch is
    ``hint_add`` of its distinct rows in ascending order; each access consumes one hint of
    its row (after the idle clear) and advances the tick."""

    def __init__(self, buckets: int, horizon: int, tick: int):
        self.row, self.count, self.stamp = [0] * buckets, [0] * buckets, [0] * buckets
        self.live = self.last = 0
        self.horizon, self.tick = horizon, tick

    def _fresh(self, h: int) -> bool:
        return self.tick - self.stamp[h] <= self.horizon

    def hint(self, rows) -> None:
        for r in sorted(set(int(r) for r in rows)):
            h = _bucket_py(r, len(self.row))
            c = self.count[h]
            fresh = c > 0 and self._fresh(h)
            same = fresh and self.row[h] == r
            if fresh and not same:
                continue  # a lost hint, never a false one
            if c == 0:
                self.live += 1
            self.row[h], self.count[h] = r, min(c, 254) + 1 if same else 1
            self.stamp[h] = self.last = self.tick

    def access(self, rows) -> None:
        for r in (int(r) for r in rows):
            if self.live > 0 and self.tick - self.last > self.horizon:
                self.count = [0] * len(self.count)
                self.live = 0
            h = _bucket_py(r, len(self.row))
            if self.live > 0 and self.count[h] > 0 and self.row[h] == r:
                self.count[h] = self.count[h] - 1 if self._fresh(h) else 0
                self.live -= self.count[h] == 0
            self.tick += 1

    def table(self) -> np.ndarray:
        key = [(r << 8) | c for r, c in zip(self.row, self.count)]
        return np.array([key, self.stamp], np.int64)


@pytest.mark.parametrize("dist", ["uniform", "zipf"])
@pytest.mark.parametrize("horizon", [None, 150])
def test_store_hint_path_equals_the_plain_model_and_the_sorted_walk(dist, horizon):
    """A decode loop's hint + lookup sequence through the path the store takes (``hint_rows``
    via ``walk.announce_one_checked``; all-hit lookups by the policy's ``all_hits``, the rest
    by the walk) against (1) the plain-Python model of the hint table above, after every step,
    and (2) a second index run the old way, ``hint_add`` per distinct row in ascending order
    and every lookup through the walk: the same state arrays, so the same decisions. Batches
    repeat ids within a hint, hint rows never looked up, hint nothing at times; Zipf lookups
    miss, so hints steer admissions and evictions."""
    from tierstore.cache import make_policy
    from tierstore.cache.walk import announce_one_checked

    rng = np.random.default_rng(7 if dist == "zipf" else 8)
    params = {} if horizon is None else {"hint_horizon": horizon}
    new, old = (CacheIndex(3000, 300, make_policy("default", 300, **params)) for _ in range(2))
    for idx in (new, old):
        idx.hint_table()
    M, HT = new.state[0], new.state[9]
    model = _HintModel(HT.shape[1], int(M[M_HORIZON]), int(M[M_TICK]))

    def batch() -> np.ndarray:
        n = int(rng.choice([1, 3, 17, 64, 150]))
        if dist == "zipf":
            return (rng.zipf(1.2, n) - 1) % 3000
        return rng.integers(0, 600, n)

    fast = walked = 0
    for step in range(600):
        ids = batch().astype(np.int64)
        future = ids if step % 7 else np.concatenate([ids, ids[: ids.size // 2]])  # repeats in one hint
        if step % 5 == 0:
            future = np.concatenate([future, rng.integers(3000, 9000, 4)])  # hints never used
        if step % 11 != 10:  # some steps hint nothing
            assert announce_one_checked(M, HT, future, 9000) == -1
            old_M, old_HT = old.state[0], old.state[9]
            for r in np.unique(future):
                hint_add(old_M, old_HT, r)
            model.hint(future)
        if step % 13 == 0:  # a second hint at the same tick: it sees the first one's stamps
            again = np.concatenate([batch(), ids[:3]]).astype(np.int64)
            assert announce_one_checked(M, HT, again, 9000) == -1
            for r in np.unique(again):
                hint_add(old.state[0], old.state[9], r)
            model.hint(again)
        slots = np.empty(ids.size, np.int64)
        if new.all_hits(new.state, ids, slots):
            fast += 1
        else:
            new.lookup(ids)
            walked += 1
        old.lookup(ids)
        model.access(ids)
        assert np.array_equal(HT, model.table()), f"step {step}: hint table differs from the plain model"
        assert (M[M_HLIVE], M[M_HLAST], M[M_TICK]) == (model.live, model.last, model.tick), f"step {step}: counters"
        for k, (a, b) in enumerate(zip(new.state, old.state)):
            if k == 0:  # lookups started: the all-hit path takes no lease, so it starts no epoch
                a, b = np.delete(a, M_EPOCH), np.delete(b, M_EPOCH)
            elif k == 4:  # the slots' lease epochs (the same reason)
                continue
            assert np.array_equal(a, b), f"step {step}: state array {k} differs from the sorted walk's at {np.flatnonzero(a != b)[:5]}"
    assert fast > 20 and walked > 20, (fast, walked)
    assert model.live > 0 or horizon is not None
