"""Cache policies: one shared contract test over every policy, plus hand-worked eviction
orders per policy (batches of one access: each miss is admitted before the next access)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from tierstore.cache_index import CacheIndex
from tierstore.errors import TierStoreError
from tierstore.policy import POLICIES, FrequencySketch, hot_rows, make_policy, policy_names


def run_one_by_one(idx: CacheIndex, trace) -> list[bool]:
    """Sequential replay; returns hit flags."""
    hits = []
    for r in trace:
        s = idx.lookup(np.array([r]))
        hits.append(bool(s[0] >= 0))
        if s[0] < 0:
            idx.admit(np.array([r]))
    return hits


def resident(idx: CacheIndex) -> set[int]:
    return set(idx.row_of_slot[idx.row_of_slot >= 0].tolist())


def check_invariants(idx: CacheIndex) -> None:
    occ = np.flatnonzero(idx.row_of_slot >= 0)
    assert idx.size == occ.size <= idx.capacity
    assert (idx.slot_of_row[idx.row_of_slot[occ]] == occ).all(), "row_of_slot and slot_of_row disagree"
    assert np.count_nonzero(idx.slot_of_row >= 0) == occ.size


# --- shared contract ------------------------------------------------------------------------
@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("capacity", [1, 7, 300])
def test_contract_every_policy(name, capacity):
    """Random batches with duplicates: maps stay consistent, capacity holds, counters add
    up, and a lookup right after admit finds exactly the inserted rows."""
    rng = np.random.default_rng(5)
    n_rows = 2000
    profile = np.bincount(rng.zipf(1.2, 20000) % n_rows, minlength=n_rows)
    idx = CacheIndex(n_rows, capacity, name, profile=profile, rng=1)
    total = 0
    for _ in range(150):
        b = (rng.zipf(1.2, int(rng.integers(1, 200))) % n_rows).astype(np.int64)
        before = idx.slot_of_row[b] >= 0
        slots = idx.lookup(b)
        assert ((slots >= 0) == before).all()
        total += b.size
        ins, ins_slots, evicted = idx.admit(b[slots < 0])
        assert len(set(ins.tolist())) == ins.size
        assert not (set(ins.tolist()) & set(evicted.tolist()))
        assert (idx.slot_of_row[ins] == ins_slots).all()
        assert (idx.lookup(ins) == ins_slots).all()
        total += ins.size
        check_invariants(idx)
    assert idx.hits + idx.misses == total


@pytest.mark.parametrize("name", [n for n in policy_names() if n != "static"])
def test_leased_slots_are_never_evicted(name):
    """A test that fails if a leased row could be evicted: lease half the cache, then flood
    it with new rows; every leased row must still be where it was."""
    idx = CacheIndex(10_000, 64, name, pinned_rows=[])
    rows = np.arange(64, dtype=np.int64)
    for r in rows:  # fill (one by one so every policy admits)
        idx.lookup(np.array([r]))
        idx.admit(np.array([r]))
    # policies with admission filters may not hold all 64: lease whatever is resident
    held = rows[idx.slot_of_row[rows] >= 0][:32]
    slots = idx.slot_of_row[held].astype(np.int64)
    idx.lease(slots)
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = rng.integers(64, 10_000, 50)
        idx.lookup(b)
        idx.lookup(b)  # seen twice: admission filters let them in
        idx.admit(b)
        assert (idx.slot_of_row[held] == slots).all(), "a leased row was evicted"
    idx.release(slots)
    for _ in range(50):
        b = rng.integers(64, 10_000, 200)
        idx.lookup(b)
        idx.lookup(b)
        idx.admit(b)
    assert (idx.slot_of_row[held] != slots).any() or name == "default", "released rows never leave"


# --- hand-worked eviction orders -----------------------------------------------------------------
def test_lru_eviction_order_by_hand():
    idx = CacheIndex(100, 3, "lru", pinned_rows=[])
    # A B C fill; A hit -> order B C A; D evicts B; C hit -> A D C; E evicts A
    hits = run_one_by_one(idx, [1, 2, 3, 1, 4, 3, 5])
    assert hits == [False, False, False, True, False, True, False]
    assert resident(idx) == {3, 4, 5}
    ins, slots, ev = (None, None, None)
    idx.lookup(np.array([6]))
    ins, slots, ev = idx.admit(np.array([6]))
    assert ev.tolist() == [4]  # D is now least recent


def test_lru_matches_reference_on_random_trace():
    """Exact LRU for batches of one: compare with an OrderedDict LRU, several capacities."""
    rng = np.random.default_rng(2)
    trace = (rng.zipf(1.15, 6000) % 400).tolist()
    for cap in (1, 2, 5, 33, 150):
        ref, ref_hits = OrderedDict(), []
        for r in trace:
            ref_hits.append(r in ref)
            if r in ref:
                ref.move_to_end(r)
            else:
                if len(ref) >= cap:
                    ref.popitem(last=False)
                ref[r] = True
        idx = CacheIndex(400, cap, "lru", pinned_rows=[])
        got = run_one_by_one(idx, trace)
        mismatch = sum(a != b for a, b in zip(got, ref_hits))
        assert mismatch == 0, f"cap {cap}: {mismatch} accesses differ from reference LRU"
        assert resident(idx) == set(ref)


def test_lru_batch_semantics_last_occurrence_counts():
    idx = CacheIndex(100, 3, "lru", pinned_rows=[])
    run_one_by_one(idx, [1, 2, 3])
    idx.lookup(np.array([1, 2, 1]))  # 1 was used last in the batch, 3 least recently
    _, _, ev = idx.admit(np.array([9]))
    assert ev.tolist() == [3]
    _, _, ev = idx.admit(np.array([8]))
    assert ev.tolist() == [2]


def test_lfu_eviction_order_by_hand():
    idx = CacheIndex(100, 3, "lfu", pinned_rows=[])
    # counts: 1 -> 3, 2 -> 1, 3 -> 2; 4 evicts 2 (least frequent)
    run_one_by_one(idx, [1, 2, 3, 1, 1, 3])
    _, _, ev = idx.admit(np.array([4]))
    assert ev.tolist() == [2]
    # now 4 has count 1 (newest); 5 evicts 4; tie among count-1 rows goes to the least recent
    _, _, ev = idx.admit(np.array([5]))
    assert ev.tolist() == [4]
    run_one_by_one(idx, [5, 5, 5])  # 5 -> 4 hits; 3 (count 2) is now least frequent
    _, _, ev = idx.admit(np.array([6]))
    assert ev.tolist() == [3]


def test_s3fifo_eviction_order_by_hand():
    # capacity 10: small queue 1 slot, main 9; ghost remembers rows evicted from small
    idx = CacheIndex(100, 10, "s3fifo", pinned_rows=[])
    run_one_by_one(idx, list(range(10)))  # 0..9 all in small (FIFO order), all freq 0
    run_one_by_one(idx, [0, 1])  # 0 and 1 accessed again
    # inserting 10: small is over its target, head 0 has freq 1 -> main; 1 -> main; 2 evicted
    _, _, ev = idx.admit(np.array([10]))
    assert ev.tolist() == [2]
    assert resident(idx) == set(range(12)) - {2, 11}
    # 2 is in the ghost: coming back, it goes straight to main
    idx.lookup(np.array([2]))
    _, _, ev = idx.admit(np.array([2]))
    assert ev.tolist() == [3]  # next small head with freq 0
    pol = idx.policy
    assert idx.slot_of_row[2] in pol.main.buf[(pol.main.head + np.arange(pol.main.len)) % pol.main.buf.size]


def test_static_admits_nothing_and_keeps_top_rows():
    profile = np.zeros(50, dtype=np.int64)
    profile[[7, 3, 9, 1]] = [10, 8, 8, 1]
    idx = CacheIndex(50, 3, "static", profile=profile)
    assert resident(idx) == {7, 3, 9}  # ties (3 and 9) both fit
    hits = run_one_by_one(idx, [7, 1, 1, 3, 40])
    assert hits == [True, False, False, True, False]
    assert resident(idx) == {7, 3, 9}


def test_hot_rows_deterministic_ties():
    profile = np.array([0, 5, 5, 5, 1, 0, 9])
    assert hot_rows(profile, 2).tolist() == [6, 1]
    assert hot_rows(profile, 3).tolist() == [6, 1, 2]
    assert hot_rows(profile, 10).tolist() == [6, 1, 2, 3, 4]  # zero counts never
    assert hot_rows(None, 3).size == 0


def test_wtinylfu_admission_prefers_frequent_rows():
    """A row seen many times beats a one-off scan when both compete for main."""
    idx = CacheIndex(10_000, 100, "wtinylfu", pinned_rows=[])
    hot = np.arange(50, dtype=np.int64)
    for _ in range(20):
        idx.lookup(hot)
        idx.admit(hot)
    scan = np.arange(1000, 9000, dtype=np.int64)
    for i, b in enumerate(np.array_split(scan, 80)):
        idx.lookup(hot)  # the hot rows stay in use
        idx.lookup(b)
        idx.admit(b)
    assert np.count_nonzero(idx.slot_of_row[hot] >= 0) >= 45, "a one-off scan flushed the hot rows"
    lru = CacheIndex(10_000, 100, "lru", pinned_rows=[])  # the contrast: LRU loses them
    for _ in range(20):
        lru.lookup(hot)
        lru.admit(hot)
    for i, b in enumerate(np.array_split(scan, 80)):
        lru.lookup(hot)
        lru.lookup(b)
        lru.admit(b)
    assert np.count_nonzero(lru.slot_of_row[hot] >= 0) < 20


def test_default_policy_pins_core_and_uses_hints():
    rng = np.random.default_rng(3)
    n = 5000
    profile = np.bincount(rng.zipf(1.3, 50_000) % n, minlength=n)
    idx = CacheIndex(n, 100, "default", profile=profile)
    top = hot_rows(profile, 10)
    assert idx.n_pinned == 10 and set(top.tolist()) == set(idx.row_of_slot[:10].tolist())
    # the ranked core is prefilled from the profile too
    assert np.count_nonzero(idx.slot_of_row[hot_rows(profile, 55)] >= 0) == 55  # 10 + half of 90
    # a row with an outstanding hint (a prefetch for a later step) survives a flood of
    # one-off rows; the same row without the hint is flushed out of the small queue
    for hinted in (True, False):
        idx = CacheIndex(n, 100, "default", profile=profile)
        idx.lookup(np.array([4999]))
        idx.admit(np.array([4999]))
        if hinted:
            idx.hint(np.array([4999]))
        for b in np.array_split(np.arange(3000, 3400), 20):
            idx.hint(b)  # every prefetch hints its own ids: these cancel at lookup
            idx.lookup(b)
            idx.admit(b)
        assert (idx.slot_of_row[4999] >= 0) == hinted, f"hinted={hinted}"


def test_make_policy_errors():
    with pytest.raises(TierStoreError, match="unknown cache policy 'nope'"):
        make_policy("nope", 10)
    with pytest.raises(TierStoreError):
        make_policy("lru", -1)
    assert set(policy_names()) == set(POLICIES) >= {"lru", "lfu", "s3fifo", "wtinylfu", "static", "default"}


def test_frequency_sketch_counts_and_ages():
    sk = FrequencySketch(1000, rng=np.random.default_rng(0), sample_factor=1000)
    rows = np.array([5, 5, 5, 9, 123456789], dtype=np.int64)
    sk.add(rows)
    est = sk.estimate(np.array([5, 9, 77, 123456789]))
    assert est[0] >= 3 and est[1] >= 1 and est[3] >= 1  # count-min never undercounts
    assert est[2] <= 1
    many = np.repeat(np.int64(42), 100)
    sk.add(many)
    assert sk.estimate(np.array([42]))[0] == 15  # 4-bit saturation


@pytest.mark.parametrize("name", ["s3fifo", "default"])
def test_many_hits_in_one_batch_do_not_wrap_the_frequency(name):
    """int8 frequency counters wrapped when a row was hit more than ~124 times in one batch,
    so the hottest row looked coldest and was evicted first. Counts saturate at 3: a batch
    hitting a row 200 times must decide exactly as one hitting it 3 times."""
    rng = np.random.default_rng(5)
    profile = np.bincount(rng.zipf(1.3, 20000) % 5000, minlength=5000)
    later = [rng.integers(0, 5000, size=64) for _ in range(60)]
    states = []
    for repeats in (3, 200):
        idx = CacheIndex(5000, 100, name, profile=profile, rng=0)
        warm = np.arange(1000, 1100)
        idx.lookup(warm)
        idx.admit(warm)  # fill the tier
        hot = int(idx.row_of_slot[idx.row_of_slot >= 0][-1])
        idx.lookup(np.full(repeats, hot))
        assert int(idx.policy.freq[idx.slot_of_row[hot]]) == 3, f"{repeats} hits left frequency " \
            f"{int(idx.policy.freq[idx.slot_of_row[hot]])}"
        if name == "default":  # its adaptation sees the batch's length: only the count must match
            continue
        for batch in later:
            slots = idx.lookup(batch)
            idx.admit(np.unique(batch[slots < 0]))
        states.append(idx.row_of_slot.copy())
    if states:
        assert np.array_equal(states[0], states[1]), "200 hits in one batch decided otherwise than 3"


def test_hint_table_counts_its_outstanding_buckets_and_expires_hints():
    """The hint table's `live` count (which lets lookups skip hashing when no hint is
    outstanding) equals a brute-force count of non-zero buckets after any add/consume mix;
    a hint older than the horizon is no longer outstanding, and once all are, none is."""
    from tierstore.policy import _HintTable

    rng = np.random.default_rng(9)
    t = _HintTable(64, horizon=10**9)
    now = 0
    for step in range(400):
        rows = rng.integers(0, 500, size=int(rng.integers(0, 40)))
        (t.add if rng.random() < 0.4 else t.consume)(rows, now)
        now += rows.size
        assert t.live == np.count_nonzero(t.count), step
    probe = np.arange(500)
    for _ in range(256):  # a call consumes each row's hint once: 255 calls empty any bucket
        t.consume(probe, now)
    assert t.live == np.count_nonzero(t.count) == 0
    assert not t.outstanding(probe, now).any()

    t = _HintTable(64, horizon=100)
    t.add(np.array([7, 8]), now=1000)
    assert t.outstanding(np.array([7, 8, 9]), now=1100).tolist() == [True, True, False]
    t.add(np.array([9]), now=1050)
    assert t.outstanding(np.array([7, 9]), now=1101).tolist() == [False, True]  # 7 expired
    t.add(np.array([7]), now=1101)  # an expired hint's bucket is free again
    assert t.outstanding(np.array([7]), now=1150).tolist() == [True]
    assert t.outstanding(np.array([7, 9]), now=5000).tolist() == [False, False]
    assert t.live == 0 and not t.count.any(), "all hints stale: the table is cleared"


def test_default_without_a_profile_admits_into_the_dynamic_part():
    """prefill() set a flag that the next insert cleared: with nothing to prefill (no
    profile) the first rows ever admitted joined the ranked core, whose target is 0, and
    were evicted first."""
    idx = CacheIndex(1000, 50, "default")
    first = np.arange(10)
    idx.lookup(first)
    idx.admit(first)
    assert idx.policy.n_core == 0
    assert (idx.policy.seg[idx.slot_of_row[first]] >= 2).all()
