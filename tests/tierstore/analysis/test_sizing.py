"""Tier sizing (tierstore/analysis/sizing.py) against brute force over every capacity.

The search (a geometric bracket then bisection) is checked against a scan of every
capacity, and the whole sizing against textbook LRU: a move-to-front list gives each
access's stack distance, so the hits of every capacity come from one pass (Mattson), for
the device tier over the trace and for the host tier over the device tier's misses.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from tierstore.analysis.simulate import simulate_tiers
from tierstore.analysis.sizing import size_tiers, smallest_capacity
from tierstore.errors import TierStoreError

from ...conftest import real_text_trace


def first_reaching(ratio: np.ndarray, target: float) -> int | None:
    """Brute force: the first capacity c >= 1 with ratio[c] >= target (ratio[0] unused)."""
    ok = np.flatnonzero(ratio[1:] >= target)
    return int(ok[0]) + 1 if ok.size else None


def lru_hits_every_capacity(trace: list[int], max_cap: int) -> np.ndarray:
    """hits[c] of a textbook LRU of c rows, c = 0..max_cap: an access hits every cache larger
    than its stack distance (its position in a move-to-front list)."""
    stack: list[int] = []
    at_distance = np.zeros(max_cap + 1, np.int64)
    for r in trace:
        if r in stack:
            d = stack.index(r)
            stack.pop(d)
            if d < max_cap:
                at_distance[d + 1] += 1  # hits in caches of d + 1 rows or more
        stack.insert(0, r)
    return np.cumsum(at_distance)


def lru_misses(trace: list[int], cap: int) -> list[int]:
    """The rows a textbook LRU of ``cap`` rows does not serve, in order."""
    d: OrderedDict[int, None] = OrderedDict()
    out = []
    for r in trace:
        if r in d:
            d.move_to_end(r)
            continue
        out.append(r)
        if cap > 0:
            d[r] = None
            if len(d) > cap:
                d.popitem(last=False)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_smallest_capacity_matches_a_scan(seed):
    """On random non-decreasing curves: rel=0 finds the first capacity reaching the target,
    rel>0 one within the promised distance, None when even the largest misses it, and the
    search takes O(log n) evaluations, not n."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    ratio = np.r_[0.0, np.sort(rng.random(n))]  # ratio[c] for c = 1..n
    calls: list[int] = []

    def f(c: int) -> float:
        calls.append(c)
        return float(ratio[c])

    for target in (0.0, float(ratio[1]), float(rng.random()), float(ratio[n]), float(ratio[n]) + 1e-9):
        calls.clear()
        want = first_reaching(ratio, target)
        assert smallest_capacity(f, 1, n, target, rel=0) == want, (n, target)
        assert len(calls) <= 2 * np.log2(n + 1) + 4, (n, len(calls))
        got = smallest_capacity(f, 1, n, target, rel=0.05)
        if want is None:
            assert got is None
        else:
            assert ratio[got] >= target and 0 <= got - want < max(1, int(0.05 * got)), (want, got)


def test_smallest_capacity_on_a_dip_returns_a_crossing():
    """A curve that dips (as FIFO-like policies can) still yields a capacity where the ratio
    crosses the target: reached at c, missed at c - 1."""
    ratio = np.r_[0.0, np.linspace(0, 1, 400)]
    ratio[200:260] = 0.2  # a dip below the target, after it was reached first at 151
    target = 0.4
    c = smallest_capacity(lambda k: float(ratio[k]), 1, 400, target, rel=0)
    assert ratio[c] >= target and ratio[c - 1] < target


@pytest.fixture(scope="module")
def trace() -> np.ndarray:
    return real_text_trace(6000) % 700  # real, Zipfian word ids over 700 rows


@pytest.mark.parametrize("device_hit,total_hit", [(0.3, 0.6), (0.5, 0.8), (0.62, 0.9), (0.0, 0.0), (1.0, 1.0)])
def test_size_tiers_lru_matches_textbook_lru(trace, device_hit, total_hit):
    """With LRU, one access at a time and rel=0, the sizes are exactly the smallest ones a
    textbook LRU needs: device first, then the host tier over the device tier's misses."""
    n_rows, rows = 700, trace.tolist()
    dev_ratio = lru_hits_every_capacity(rows, n_rows) / len(rows)
    dev_ratio[n_rows:] = 1.0  # a tier of every row is resident: every lookup hits
    d = first_reaching(dev_ratio, device_hit)
    misses = lru_misses(rows, d) if d < n_rows else []  # a resident device tier serves every lookup
    host_hits = lru_hits_every_capacity(misses, n_rows)
    total_ratio = 1 - (len(misses) - host_hits) / len(rows)
    total_ratio[n_rows:] = 1.0
    h = first_reaching(total_ratio, total_hit)

    got = size_tiers(trace, n_rows=n_rows, policy="lru", device_hit=device_hit, total_hit=total_hit, rel=0,
                     table="t")
    assert (got.device_rows, got.host_rows) == (d, h), (device_hit, total_hit)
    assert got.device_hit_ratio == pytest.approx(dev_ratio[d]) and got.total_hit_ratio == pytest.approx(total_ratio[h])
    assert got.to_dict() == {"table": "t", "policy": "lru", "device_rows": d, "device_hit_ratio": got.device_hit_ratio,
                             "host_rows": h, "total_hit_ratio": got.total_hit_ratio}


def test_size_tiers_default_policy_against_a_scan(trace):
    """The store's default policy (what `tierstore size` sizes by default), with its profile
    and batches of 16: the answer is a crossing of the brute-force curve of simulate_tiers
    (reached at c, missed at c - 1), and the first capacity reaching the target wherever
    that curve does not dip below it; the default tolerance (2 %) lands within 2 % of it.
    Each (device, host) pair is replayed once, O(log n) of them."""
    n_rows, offsets = 700, np.arange(0, trace.size, 16)
    profile = np.bincount(real_text_trace(20000)[6000:] % 700, minlength=n_rows)  # other text
    kw = dict(n_rows=n_rows, offsets=offsets, profile=profile)
    sims: list[int] = []
    got = size_tiers(trace, policy="default", device_hit=0.4, total_hit=0.6, rel=0,
                     on_simulation=lambda: sims.append(1), **kw)
    assert len(sims) <= 4 * np.log2(n_rows) + 8  # not one replay per capacity
    # brute force up to the answer: the first capacity reaching the target is never above it
    d, h = got.device_rows, got.host_rows
    dev = np.r_[0.0, [simulate_tiers(trace, c, 0, "default", **kw)["device"]["hit_ratio"] for c in range(1, d + 1)]]
    assert dev[d] >= 0.4 and dev[d - 1] < 0.4 and got.device_hit_ratio == dev[d]
    assert d == first_reaching(dev, 0.4) or np.any(np.diff(dev[1:]) < 0)
    total = np.r_[0.0, [1 - simulate_tiers(trace, d, c, "default", **kw)["host"]["misses"] / trace.size
                        for c in range(1, h + 1)]]
    assert total[h] >= 0.6 and total[h - 1] < 0.6 and got.total_hit_ratio == total[h]
    assert h == first_reaching(total, 0.6) or np.any(np.diff(total[1:]) < 0)

    approx = size_tiers(trace, policy="default", device_hit=0.4, total_hit=0.6, **kw)
    assert approx.device_hit_ratio >= 0.4 and approx.device_rows - d < max(1, int(0.02 * approx.device_rows))


@pytest.mark.parametrize("bad", [{"device_hit": 1.5}, {"total_hit": -0.1}, {"total_hit": 2.0}])
def test_size_tiers_refuses_targets_that_are_not_hit_ratios(trace, bad):
    kw = {"device_hit": 0.5, "total_hit": 0.8, **bad}
    name, value = next(iter(bad.items()))
    with pytest.raises(TierStoreError, match=f"{name}={value} is not a hit ratio"):
        size_tiers(trace, n_rows=700, policy="lru", **kw)


def test_unreachable_target_on_a_v41_sized_table_answers_the_whole_table():
    """A target the trace cannot reach short of the whole table: the search stops at the
    rows the trace reads (a tier that never evicts), then answers the resident table. It
    bracketed up to the table's 384M rows, simulating tiers of 67M and 268M slots (tens of
    GB of policy state) on the way."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 384_006_168, size=4000)  # almost all distinct: 0% hits below the whole table
    rows[::4] = rows[0]  # a quarter of the lookups hit one row: ~25% at any capacity >= 1
    for policy, profile in (("lru", None), ("default", (np.unique(rows)[:10], np.arange(10, 0, -1)))):
        got = size_tiers(rows, n_rows=384_006_168, policy=policy, device_hit=0.2, total_hit=0.9, profile=profile)
        assert 1 <= got.device_rows <= 4 and got.device_hit_ratio >= 0.2
        assert got.host_rows == 384_006_168 and got.total_hit_ratio == 1.0
