"""A tier's bookkeeping per slot (issue 19: policy state in O(budget), as small as is safe):
int32 wherever the values fit, the hint table only once a hint arrives (16 bytes a dynamic
slot), lease markers that wrap instead of growing and also mark pending fills, free slots as
a counter, a row map of 2 x entries buckets (not the next power of two), the frequency row
only where a policy counts. ``state_bytes`` is the most an index holds, which a store's
budget pays for (``slots_within``)."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache import CacheIndex, PolicySpec, policy_names
from tierstore.cache.index import slots_within, state_bytes
from tierstore.cache.layout import BELOW, CACHED, FILL, HIT, M_EPOCH, M_HLIVE, NONE
from tierstore.cache.lookup import Walker
from tierstore.cache.walk import EPOCH_WRAP

CAP = 4096
# bytes per slot at 4,096 slots with a profile, ghosts and the row map included (this
# morning: lru 60, lfu 92, s3fifo 112, wtinylfu 65, arc 116, static 60, default 248; then
# 44, 76, 78, 49, 80, 44, 98; default 194 once hinted)
PER_SLOT = {"lru": 41, "lfu": 73, "s3fifo": 77, "wtinylfu": 46, "arc": 77, "static": 41, "default": 97}
HINTED = {"default": 112}  # once a hint arrived (the hint table: 16 B per dynamic slot)


def _index(name: str, n_rows: int = 10**6) -> CacheIndex:
    rng = np.random.default_rng(7)
    hot = rng.choice(n_rows, size=3 * CAP, replace=False)
    return CacheIndex(n_rows, CAP, name, profile=(hot, np.maximum(1, 10**6 // np.arange(1, hot.size + 1))))


@pytest.mark.parametrize("name", policy_names())
def test_state_bytes_per_slot(name):
    idx = _index(name)
    per_slot = idx.nbytes / CAP
    assert per_slot <= PER_SLOT[name], f"{name}: {per_slot:.1f} B per slot (bound {PER_SLOT[name]})"
    assert idx.nbytes == sum(a.nbytes for a in idx.state)
    idx.hint(np.arange(10))
    hinted = idx.nbytes / CAP
    assert hinted <= HINTED.get(name, PER_SLOT[name]), f"{name}: {hinted:.1f} B per slot once hinted"


@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("cap", [1, 100, 4096, 5000])
def test_state_bytes_is_the_most_an_index_holds(name, cap):
    """``state_bytes`` (what a budget sets aside) equals the index's bytes when nothing is
    pinned and the hint table is allocated, and bounds them otherwise: a budget never
    under-counts the bookkeeping (the store's memory bound rests on it)."""
    spec = PolicySpec(name, {"pin_fraction": 0.0} if name == "default" else {})
    rng = np.random.default_rng(3)
    hot = rng.choice(10**6, size=2 * cap, replace=False)
    prof = (hot, np.arange(hot.size, 0, -1))
    full = CacheIndex(10**6, cap, spec, profile=prof, pinned_rows=None if name in ("default", "static") else [])
    full.hint_table()
    assert full.nbytes == state_bytes(spec, cap) == full.max_nbytes, name
    pinned = CacheIndex(10**6, cap, name, profile=prof)  # default pins a tenth: fewer ghosts
    pinned.hint_table()
    assert pinned.nbytes <= state_bytes(name, cap)


@pytest.mark.parametrize("name", policy_names())
def test_budgets_buy_rows_and_their_bookkeeping(name):
    """A tier's slots: the most whose rows and state fit in the budget."""
    for budget, row_bytes in ((16 << 20, 264), (4 << 20, 32), (1 << 20, 4096), (64 << 10, 64), (100, 64)):
        c = slots_within(budget, row_bytes, name)
        assert c == 0 or c * row_bytes + state_bytes(name, c) <= budget, (budget, row_bytes, c)
        assert (c + 1) * row_bytes + state_bytes(name, c + 1) > budget, (budget, row_bytes, c)
    assert slots_within(16 << 20, 264, name) > 0.6 * (16 << 20) // 264  # the bookkeeping is a fraction


def test_default_allocates_its_hint_table_on_the_first_hint():
    """No hint, no table: 16 bytes per dynamic slot saved. A Walker built before the first hint takes
    up the new state (its lookups consume the hints: M_HLIVE back to 0), whichever way the
    hint came (the index's own ``hint`` or the Walker's ``announce``)."""
    for via_walker in (False, True):
        idx = _index("default")
        w = Walker(idx, CACHED, None, NONE)
        before = idx.nbytes
        rows = np.arange(100, 164, dtype=np.int64)  # rows past the ranked core: dynamic misses
        if via_walker:
            w.announce(rows)
        else:
            idx.hint(rows)
        # 16 B per dynamic slot, less the one-bucket placeholder it replaces
        assert idx.nbytes - before == 16 * (CAP - idx.n_pinned - 1), "the hint table was not allocated"
        # one bucket per dynamic slot: 64 rows over 3,687 buckets may share one (a lost hint)
        assert rows.size - 2 <= idx.state[0][M_HLIVE] <= rows.size
        lk = w.begin(rows)
        w.end(lk)
        assert idx.state[0][M_HLIVE] == 0, "the walker looked the rows up in a stale hint table"
        assert w.dstate is idx.state


@pytest.mark.parametrize("name", ["lru", "default"])
def test_lease_markers_wrap(name):
    """The lease markers are int32: the lookup counter restarts below 2**31, and a row
    admitted earlier in the same lookup is still that lookup's FILL across the wrap."""
    idx = _index(name)
    idx.state[0][M_EPOCH] = 2**31 + 5  # as if 2**31 lookups had run (past int32 without the wrap)
    for i in range(3):
        a, b = 900_001 + 2 * i, 900_002 + 2 * i  # new rows each time, unranked: misses
        rows = np.array([a, a, b, a], dtype=np.int64)
        slots, codes, leased = idx.access(rows)
        admitted = codes[0] == FILL
        if admitted:
            assert codes.tolist() == [FILL, FILL, FILL, FILL], codes
            assert slots[0] == slots[1] == slots[3] != slots[2]
        else:
            assert (codes == BELOW).all()
        assert leased.size == len(set(slots[codes != BELOW].tolist())), "a slot leased twice in one lookup"
        idx.finish(leased)
        assert (idx.refcount == 0).all()
        assert 0 < idx.state[0][M_EPOCH] < EPOCH_WRAP
        idx.state[0][M_EPOCH] = EPOCH_WRAP - 1  # the next lookup wraps


@pytest.mark.parametrize("name", ["lru", "default"])
def test_a_pending_fill_stays_pending_across_the_wrap(name):
    """A row admitted by a lookup that has not ended (its bytes not yet written) is BELOW
    for every other lookup, also one that starts the epochs again."""
    idx = _index(name)
    a = np.array([950_001], dtype=np.int64)
    slots, codes, leased_a = idx.access(a)
    assert codes.tolist() == [FILL]
    idx.state[0][M_EPOCH] = EPOCH_WRAP - 1  # the next lookup wraps
    _, codes_b, leased_b = idx.access(a)
    assert codes_b.tolist() == [BELOW], "a concurrent lookup would read a slot whose bytes are not written"
    idx.finish(leased_b)
    idx.finish(leased_a)  # now its bytes are in place
    _, codes_c, leased_c = idx.access(a)
    assert codes_c.tolist() == [HIT]
    idx.finish(leased_c)
    assert (idx.refcount == 0).all()
