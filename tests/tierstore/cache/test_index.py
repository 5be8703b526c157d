"""CacheIndex and the policy contract: maps stay consistent, leases hold, counters add up,
errors are typed; hand-worked eviction orders for the simple policies."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache import CacheIndex, make_policy, policy_names
from tierstore.cache.layout import BELOW, FILL, HIT, M_HEAPN, M_QLEN, NQ
from tierstore.cache.lru import LRU
from tierstore.errors import IdTypeError, InvalidIdError, TierStoreError

from .helpers import dense_map, slot_of_row


def one_by_one(idx: CacheIndex, trace) -> list[bool]:
    """Sequential replay, one access per lookup; returns hit flags."""
    hits = []
    for r in trace:
        before = idx.hits
        idx.lookup(np.array([r]))
        hits.append(idx.hits > before)
    return hits


def resident(idx: CacheIndex) -> set[int]:
    return set(idx.row_of_slot[idx.row_of_slot >= 0].tolist())


def check_invariants(idx: CacheIndex) -> None:
    occ = np.flatnonzero(idx.row_of_slot >= 0)
    assert occ.size <= idx.size <= idx.capacity
    sor = dense_map(idx)
    assert (sor[idx.row_of_slot[occ]] == occ).all(), "row_of_slot and slot_of_row disagree"
    assert np.count_nonzero(sor >= 0) == occ.size
    assert (idx.refcount == 0).all(), "a finished lookup left a lease behind"
    M = idx.state[0]
    held = int(M[M_QLEN:M_QLEN + NQ].sum()) + int(M[M_HEAPN])  # queues and the heap
    if idx.policy.name != "static":  # every dynamic slot in use sits in exactly one of them
        assert held == idx.size - idx.n_pinned, (held, idx.size, idx.n_pinned)


# --- shared contract ------------------------------------------------------------------------
@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("capacity", [1, 7, 300])
def test_contract_every_policy(name, capacity):
    """Random batches with duplicates through access/finish: codes agree with the map,
    capacity holds, counters add up, every FILL slot now maps its row."""
    rng = np.random.default_rng(5)
    n_rows = 2000
    profile = np.bincount(rng.zipf(1.2, 20000) % n_rows, minlength=n_rows)
    idx = CacheIndex(n_rows, capacity, name, profile=profile, rng=1)
    total = 0
    for _ in range(150):
        b = (rng.zipf(1.2, int(rng.integers(1, 200))) % n_rows).astype(np.int64)
        slots, codes, leased = idx.access(b)
        assert (idx.refcount[leased] > 0).all() and np.unique(leased).size == leased.size
        assert ((codes == BELOW) == (slots < 0)).all()
        ok = codes != BELOW
        assert (slot_of_row(idx)[b[ok]] == slots[ok]).all(), "a returned slot does not hold its row"
        assert set(np.flatnonzero(idx.refcount).tolist()) <= set(leased.tolist()) | set(range(idx.n_pinned))
        idx.finish(leased)
        total += b.size
        check_invariants(idx)
    assert idx.hits + idx.misses == total


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "static"])
def test_a_lookup_never_evicts_its_own_rows(name):
    """A batch with more distinct rows than slots: the rows it touched first stay until it
    ends; the extra misses bypass the tier (BELOW) instead of evicting them."""
    idx = CacheIndex(10_000, 16, name, pinned_rows=[])
    b = np.arange(100, 140, dtype=np.int64)
    slots, codes, leased = idx.access(b)
    got = slots[codes != BELOW]
    assert np.unique(got).size == got.size, "two rows of one lookup share a slot"
    assert (codes[:16] != BELOW).sum() >= 1 and (codes == BELOW).sum() >= 40 - 16
    idx.finish(leased)
    check_invariants(idx)


def test_repeats_inside_one_lookup_follow_the_rule():
    idx = CacheIndex(100, 4, "lru", pinned_rows=[])
    slots, codes, leased = idx.access(np.array([5, 6, 5, 5, 7]))
    # 5 misses and is admitted; its repeats are hits on the slot being filled (FILL)
    assert codes.tolist() == [FILL, FILL, FILL, FILL, FILL]
    assert slots.tolist() == [0, 1, 0, 0, 2]  # lowest free slots first
    assert (idx.hits, idx.misses) == (2, 3)
    idx.finish(leased)
    slots, codes, leased = idx.access(np.array([7, 5]))
    assert slots.tolist() == [2, 0] and codes.tolist() == [HIT, HIT]
    idx.finish(leased)
    assert idx.hit_ratio == pytest.approx(4 / 7)


def test_another_lookups_pending_fill_is_read_from_below():
    idx = CacheIndex(100, 4, "lru", pinned_rows=[])
    _, _, lease_a = idx.access(np.array([5]))  # admitted, bytes not written yet
    slots, codes, lease_b = idx.access(np.array([5, 6]))
    assert codes.tolist() == [BELOW, FILL] and slots[0] == -1
    idx.finish(lease_b)
    idx.abort(lease_a)  # the first lookup failed: its admitted row is dropped
    assert slot_of_row(idx)[5] == -1
    check_invariants(idx)
    assert one_by_one(idx, [5, 5, 1, 2, 3, 4, 5]) == [False, True, False, False, False, False, False]
    check_invariants(idx)


def test_pinned_rows_stay_in_first_slots():
    idx = CacheIndex(1000, 5, "lru", pinned_rows=np.array([10, 20]))
    assert idx.n_pinned == 2 and idx.row_of_slot[:2].tolist() == [10, 20]
    rng = np.random.default_rng(0)
    for _ in range(100):
        idx.lookup(rng.integers(0, 1000, 30))
    assert slot_of_row(idx)[[10, 20]].tolist() == [0, 1]
    assert idx.size == 5


def test_input_errors_name_the_problem():
    idx = CacheIndex(10, 2, "lru", pinned_rows=[])
    with pytest.raises(InvalidIdError, match="id 10 at flat position 1 is out of range for a cache index with 10 rows"):
        idx.lookup(np.array([1, 10]))
    with pytest.raises(InvalidIdError):
        idx.lookup(np.array([-1]))
    with pytest.raises(IdTypeError, match="float"):
        idx.lookup(np.array([1.5]))
    with pytest.raises(TierStoreError, match="duplicates"):
        CacheIndex(10, 3, "lru", pinned_rows=np.array([1, 1]))
    with pytest.raises(TierStoreError, match="capacity"):
        CacheIndex(10, -1, "lru")
    with pytest.raises(TierStoreError, match="built for capacity"):
        CacheIndex(10, 3, LRU(4))
    with pytest.raises(TierStoreError, match="one count per row"):
        CacheIndex(10, 3, "static", profile=np.ones(9, dtype=np.int64))
    with pytest.raises(TierStoreError, match="unknown cache policy 'nope'"):
        make_policy("nope", 10)
    with pytest.raises(TierStoreError, match="no parameter"):
        make_policy("lru", 10, bogus=1)
    assert idx.lookup(np.array([], dtype=np.float32)).size == 0  # empty batches of any dtype


def test_zero_capacity_and_full_pinning():
    idx = CacheIndex(10, 0, "lru")
    assert idx.lookup(np.array([1, 2])).tolist() == [-1, -1]
    assert idx.bypassed == 2
    idx = CacheIndex(10, 2, "lru", pinned_rows=np.array([3, 4]))
    assert idx.lookup(np.array([1, 3])).tolist() == [-1, 0]


def _state_bytes(idx: CacheIndex) -> int:
    return sum(a.nbytes for a in idx.state)


@pytest.mark.parametrize("name", policy_names())
def test_state_is_sized_by_the_cache_not_the_table(name):
    """No array of a tier's state grows with the table: the same capacity and the same
    sparse profile give the same state bytes for a table of 10**6 and of 10**9 rows (a
    dense map was 4 GB there), under a bound per slot; lookups spread over the whole id
    range still hit what they admitted."""
    cap = 4096
    rng = np.random.default_rng(7)
    hot = rng.choice(10**6, size=3 * cap, replace=False)  # rows valid in both tables
    counts = np.maximum(1, 10**6 // np.arange(1, hot.size + 1))
    sizes = {}
    for n_rows in (10**6, 10**9):
        idx = CacheIndex(n_rows, cap, name, profile=(hot, counts))
        sizes[n_rows] = _state_bytes(idx)
        assert sizes[n_rows] < 400 * cap + (64 << 10), f"{name}: {sizes[n_rows] / cap:.0f} B per slot at {n_rows} rows"
        ids = np.concatenate([hot[:100], rng.integers(0, n_rows, 200)])
        idx.lookup(ids)
        again = idx.lookup(ids)
        assert (slot_of_row(idx)[ids] == again).all()
    assert sizes[10**6] == sizes[10**9], f"{name}: state bytes depend on the table's rows: {sizes}"


@pytest.mark.parametrize("name", policy_names())
def test_ids_up_to_the_largest_table(name):
    """Ids of DeepSeek-V4.1's larger table (384,016,682 rows) and up to the largest row a
    cache index takes (2**31 - 1 rows: ids and slots are 32-bit in the row map and the
    ghosts) are mapped, evicted, remembered and hit like small ones; 2**31 rows are refused
    with a typed error."""
    for n_rows in (384_016_682, 2**31 - 1):
        top = n_rows - 1 - np.arange(0, 300 * 977, 977, dtype=np.int64)  # the top of the range
        idx = CacheIndex(n_rows, 64, name, profile=(top[:64], np.arange(64, 0, -1)))
        rng = np.random.default_rng(5)
        for _ in range(6):  # misses past the capacity: evictions and ghosts at these ids
            idx.lookup(rng.choice(top, 96, replace=False))
        occ = np.flatnonzero(idx.row_of_slot >= 0)
        held = idx.row_of_slot[occ].astype(np.int64)
        assert held.size and np.isin(held, top).all(), f"{name}: rows that were never looked up are held"
        assert (idx.slots_of(held) == occ).all(), f"{name}: the map and the slots disagree at {n_rows} rows"
        assert (idx.lookup(held[:8]) == occ[:8]).all(), f"{name}: held rows did not hit"
        assert (idx.slots_of(np.array([0, n_rows // 3])) < 0).all()
    with pytest.raises(TierStoreError, match=r"2\*\*31"):
        CacheIndex(2**31, 64, name)


def test_sparse_and_dense_profiles_build_the_same_index():
    """A (rows, counts) pair, a TopProfile and the dense counts are one profile."""
    from tierstore.format.profile import TopProfile

    n_rows, cap = 5000, 300
    rng = np.random.default_rng(3)
    dense = np.zeros(n_rows, np.int64)
    hot = rng.choice(n_rows, size=700, replace=False)
    dense[hot] = rng.integers(1, 50, hot.size)  # many ties: broken by row id everywhere
    trace = rng.integers(0, n_rows, 3000)
    for name in policy_names():
        built = [CacheIndex(n_rows, cap, name, profile=p) for p in
                 (dense, (hot[::-1], dense[hot[::-1]]), TopProfile.from_pairs(hot, dense[hot], n_rows))]
        slots = [idx.lookup(trace) for idx in built]
        for idx, sl in zip(built[1:], slots[1:]):
            assert np.array_equal(sl, slots[0]), name
            assert np.array_equal(idx.row_of_slot, built[0].row_of_slot), name
    with pytest.raises(TierStoreError, match="twice"):
        CacheIndex(n_rows, cap, "static", profile=(np.array([1, 1]), np.array([2, 3])))
    with pytest.raises(TierStoreError, match="lie in"):
        CacheIndex(n_rows, cap, "static", profile=(np.array([n_rows]), np.array([2])))


def test_stats_and_reset():
    idx = CacheIndex(10, 2, "lru", pinned_rows=[])
    idx.lookup(np.array([1]))
    st = idx.stats()
    assert st["misses"] == 1 and st["insertions"] == 1 and st["size"] == 1 and st["policy"] == "lru"
    assert idx.maxsize == 2 and idx.currsize == 1
    idx.reset_stats()
    assert idx.hits == idx.misses == idx.insertions == idx.evictions == 0
    assert idx.resident(np.array([1, 2])).tolist() == [True, False]


# --- hand-worked eviction orders -----------------------------------------------------------------
def test_lru_eviction_order_by_hand():
    idx = CacheIndex(100, 3, "lru", pinned_rows=[])
    # A B C fill; A hit -> order B C A; D evicts B; C hit -> A D C; E evicts A
    assert one_by_one(idx, [1, 2, 3, 1, 4, 3, 5]) == [False, False, False, True, False, True, False]
    assert resident(idx) == {3, 4, 5}
    one_by_one(idx, [6])
    assert resident(idx) == {3, 5, 6}  # 4 (D) was least recent


def test_lfu_eviction_order_by_hand():
    idx = CacheIndex(100, 3, "lfu", pinned_rows=[])
    one_by_one(idx, [1, 2, 3, 1, 1, 3])  # counts: 1 -> 3, 2 -> 1, 3 -> 2
    one_by_one(idx, [4])
    assert resident(idx) == {1, 3, 4}  # 2 was least frequent
    one_by_one(idx, [5])  # 4 has count 1 and is the only such row
    assert resident(idx) == {1, 3, 5}
    one_by_one(idx, [5, 5, 5, 6])  # 5 -> 4 uses; 3 (count 2) is now least frequent
    assert resident(idx) == {1, 5, 6}


def test_s3fifo_eviction_order_by_hand():
    # capacity 10: small queue 1 slot, main 9; the ghost remembers rows evicted from small
    idx = CacheIndex(100, 10, "s3fifo", pinned_rows=[])
    one_by_one(idx, list(range(10)))  # 0..9 in small (FIFO order), frequency 0
    one_by_one(idx, [0, 1])
    # inserting 10: small is over its target; 0 and 1 were used -> main; 2 is evicted
    one_by_one(idx, [10])
    assert resident(idx) == set(range(11)) - {2}
    assert slot_of_row(idx)[2] <= -2, "2 should be remembered by the ghost"
    one_by_one(idx, [2])  # back from the ghost: straight to main; 3 (small head) goes
    assert resident(idx) == set(range(11)) - {3}
    from tierstore.cache.layout import L_QID
    from tierstore.cache.s3fifo import MAIN
    assert idx.state[6][L_QID, slot_of_row(idx)[2]] == MAIN


def test_static_admits_nothing_and_keeps_top_rows():
    profile = np.zeros(50, dtype=np.int64)
    profile[[7, 3, 9, 1]] = [10, 8, 8, 1]
    idx = CacheIndex(50, 3, "static", profile=profile)
    assert resident(idx) == {7, 3, 9}  # ties (3 and 9) both fit
    assert one_by_one(idx, [7, 1, 1, 3, 40]) == [True, False, False, True, False]
    assert resident(idx) == {7, 3, 9}


@pytest.mark.parametrize("name", ["s3fifo"])
def test_many_hits_in_one_lookup_saturate_the_frequency(name):
    """The old int8 counters wrapped when a row was hit more than ~124 times in one batch,
    so the hottest row looked coldest. Counts saturate at 3: 200 hits decide as 3 do."""
    rng = np.random.default_rng(5)
    later = [rng.integers(0, 5000, size=64) for _ in range(60)]
    states = []
    for repeats in (3, 200):
        idx = CacheIndex(5000, 100, name, rng=0, pinned_rows=[])
        idx.lookup(np.arange(1000, 1100))  # fill the tier
        hot = int(idx.row_of_slot[idx.row_of_slot >= 0][-1])
        idx.lookup(np.full(repeats, hot))
        from tierstore.cache.layout import L_FREQ
        assert int(idx.state[6][L_FREQ, slot_of_row(idx)[hot]]) == 3
        for batch in later:
            idx.lookup(batch)
        states.append(idx.row_of_slot.copy())
    assert np.array_equal(states[0], states[1])
