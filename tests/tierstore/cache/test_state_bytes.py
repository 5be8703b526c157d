"""A tier's bookkeeping per slot (issue 19: policy state in O(budget), at most 32 bytes a
slot, ghosts included, where the policy's design allows): int32 wherever the values fit,
uint16 leases, the hint table only once a hint arrives (16 bytes a dynamic slot), lease
markers that wrap instead of growing and also mark pending fills, free slots as a counter,
free ghost entries chained through their links, a row map of 1.25 x entries buckets (10
bytes an entry), the frequency row only where a policy counts, W-TinyLFU's 4-bit counters
two to a byte, its uint8 leases, int16 lease markers and one queue byte a slot (the queue and
the saturation bit; no queue-id row in L), no leases or queues for a policy that admits
nothing (static).
``state_bytes`` is the most an index holds, which a store's budget pays for
(``slots_within``)."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache import CacheIndex, PolicySpec, policy_names
from tierstore.cache.index import MAX_SLOTS, slots_within, state_bytes
from tierstore.cache.layout import BELOW, CACHED, FILL, HIT, M_EPOCH, M_EPWRAP, M_HLIVE, M_REFMAX, NONE, REF_MAX
from tierstore.errors import CapacityError
from tierstore.cache.lookup import Walker
from tierstore.cache.walk import EPOCH_WRAP

CAP = 4096
# bytes per slot at 4,096 slots with a profile, ghosts and the row map included (this
# morning: lru 60, lfu 92, s3fifo 112, wtinylfu 65, arc 116, static 60, default 248; then
# 44, 76, 78, 49, 80, 44, 98, default 194 once hinted; then 41, 73, 77, 46, 77, 41, 97 and
# 112 hinted)
PER_SLOT = {"lru": 33, "lfu": 65, "s3fifo": 60, "wtinylfu": 32, "arc": 59, "static": 15, "default": 82}
HINTED = {"default": 97}  # once a hint arrived (the hint table: 16 B per dynamic slot); default +2 since
# its ranking is a hash table (cache/rankmap.py: 10 B a ranked row, was 8)

# issue 19's bound: at most 32 bytes of state per slot, ghosts and the row map included,
# whatever the capacity (plus a fixed part: the scalars, the queues' sentinels). The policies
# not listed keep more by design (docs of test_the_others_shrank).
BOUND, FIXED = 32, 1024
WITHIN_BOUND = ("lru", "static", "wtinylfu")
# the others' most per slot (state_bytes at any capacity, ghosts at their largest, the hint
# table allocated): lfu keeps a 64-bit key, a 64-bit lazy key and a heap position per slot;
# s3fifo, arc and default exact ghosts (0.9-1 entry per slot, 14 bytes each and their map
# entry); default's ranking is a hash table (10 bytes
# a ranked row, 8 when it was binary-searched: 98 -> 100, for O(1) rank lookups on a miss)
MOST = {"lfu": 64, "s3fifo": 59.5, "arc": 58, "default": 100}
CAPS = (1, 100, 4096, 5000, 2**20, 2**20 + 1, 10**7 + 3)


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


@pytest.mark.parametrize("name", ["lru", "default", "wtinylfu"])
def test_lease_markers_wrap(name):
    """The lease markers are int32 (int16 for wtinylfu): the lookup counter restarts below
    half their range, and a row admitted earlier in the same lookup is still that lookup's
    FILL across the wrap."""
    idx = _index(name)
    wrap = int(idx.state[0][M_EPWRAP])
    assert wrap == (EPOCH_WRAP if name != "wtinylfu" else 2**14)
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
        assert 0 < idx.state[0][M_EPOCH] < wrap
        idx.state[0][M_EPOCH] = wrap - 1  # the next lookup wraps


@pytest.mark.parametrize("name", ["lru", "default", "wtinylfu"])
def test_a_pending_fill_stays_pending_across_the_wrap(name):
    """A row admitted by a lookup that has not ended (its bytes not yet written) is BELOW
    for every other lookup, also one that starts the epochs again."""
    idx = _index(name)
    a = np.array([950_001], dtype=np.int64)
    slots, codes, leased_a = idx.access(a)
    assert codes.tolist() == [FILL]
    idx.state[0][M_EPOCH] = idx.state[0][M_EPWRAP] - 1  # the next lookup wraps
    _, codes_b, leased_b = idx.access(a)
    assert codes_b.tolist() == [BELOW], "a concurrent lookup would read a slot whose bytes are not written"
    idx.finish(leased_b)
    idx.finish(leased_a)  # now its bytes are in place
    _, codes_c, leased_c = idx.access(a)
    assert codes_c.tolist() == [HIT]
    idx.finish(leased_c)
    assert (idx.refcount == 0).all()


@pytest.mark.parametrize("name", WITHIN_BOUND)
def test_policy_state_is_at_most_32_bytes_a_slot(name):
    """Issue 19: a tier's state is at most 32 bytes per slot (row map, ghosts, every array),
    at every capacity, for the policies whose design allows it; an index holds what
    ``state_bytes`` says (test_state_bytes_is_the_most_an_index_holds)."""
    for cap in CAPS:
        got = state_bytes(name, cap)
        assert got <= BOUND * cap + FIXED, f"{name}: {(got - FIXED) / cap:.2f} B per slot at {cap} slots"
    idx = _index(name)
    assert idx.nbytes <= BOUND * CAP + FIXED, f"{name}: {idx.nbytes / CAP:.2f} B per slot"


@pytest.mark.parametrize("name", sorted(MOST))
def test_the_others_shrank(name):
    """The policies past 32 bytes a slot: no more than their figures after issue 19's
    shrink (lfu 72 -> 64, s3fifo 76.4 -> 59.4, arc 76 -> 58 (wtinylfu 45-50 -> 35-38 -> 32:
    test_policy_state_is_at_most_32_bytes_a_slot),
    default 116 -> 98, hint table included; 100 since its rank map, cache/rankmap.py)."""
    for cap in CAPS[2:]:
        got = state_bytes(name, cap)
        assert got <= MOST[name] * cap + FIXED, f"{name}: {(got - FIXED) / cap:.2f} B per slot at {cap} slots"


def test_static_keeps_no_leases_or_queues():
    """``static`` admits nothing, so no slot past the pinned ones is ever leased, marked or
    queued: one-entry stand-ins (4 bytes a slot and the row map), and its rows still hit."""
    idx = _index("static")
    M, RM, ros, ref, ep, K, L = idx.state[:7]
    assert ref.size == ep.size == 1 and L.shape[1] == 1 and ros.size == CAP
    held = idx.row_of_slot[idx.row_of_slot >= 0]
    assert held.size == CAP
    rows = np.concatenate([held[:50], np.arange(999_000, 999_050)])
    slots = idx.lookup(rows)
    assert (slots[:50] == np.arange(50)).all() and (slots[50:] == -1).all()
    assert idx.hits == 50 and idx.misses == 50 and ref[0] == 0 and ep[0] == 0


@pytest.mark.parametrize("name", ["lru", "wtinylfu"])
def test_leases_saturate_instead_of_overflowing(name):
    """Leases are uint16 (uint8 for wtinylfu): a slot held by the type's most lookups in
    flight is served from below (BELOW, no lease), never wrapped to 0 (which would let it be
    evicted under a reader)."""
    idx = CacheIndex(1000, 4, name, pinned_rows=[])
    top = int(idx.state[0][M_REFMAX])
    assert top == (REF_MAX if name == "lru" else 255) == np.iinfo(idx.refcount.dtype).max
    idx.lookup(np.array([7]))
    s = int(idx.slots_of(np.array([7]))[0])
    idx.refcount[s] = top - 1  # one more lease still fits
    slots, codes, leased = idx.access(np.array([7]))
    assert codes.tolist() == [HIT] and idx.refcount[s] == top
    slots, codes, leased2 = idx.access(np.array([7]))
    assert codes.tolist() == [BELOW] and slots.tolist() == [-1] and leased2.size == 0
    assert idx.refcount[s] == top
    idx.finish(leased2)
    idx.finish(leased)
    assert idx.refcount[s] == top - 1
    idx.refcount[s] = 0
    slots, codes, leased = idx.access(np.array([7]))
    assert codes.tolist() == [HIT] and slots.tolist() == [s] and idx.refcount[s] == 1
    idx.finish(leased)


def test_capacity_past_int32_slots_is_refused():
    with pytest.raises(CapacityError, match="smaller budget"):
        CacheIndex(10, MAX_SLOTS + 1, "lru")
    assert slots_within(1 << 50, 1, "lru") == MAX_SLOTS  # never more slots than an index takes
