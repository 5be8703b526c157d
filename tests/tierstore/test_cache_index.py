"""CacheIndex: the row <-> slot bookkeeping every cache tier runs."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache_index import CacheIndex
from tierstore.errors import IdTypeError, InvalidIdError, TierStoreError
from tierstore.policy import LRUPolicy


def test_counts_each_batch_against_the_state_before_it():
    idx = CacheIndex(100, 4, "lru", pinned_rows=[])
    slots = idx.lookup(np.array([5, 6, 5, 5, 7]))
    assert (slots == -1).all()
    # 5 misses three times in one batch but is fetched once: one miss, two hits
    assert (idx.hits, idx.misses) == (2, 2 + 1)
    ins, ins_slots, ev = idx.admit(np.array([5, 6, 5, 7]))  # repeats are ignored
    assert ins.tolist() == [5, 6, 7] and ev.size == 0
    assert ins_slots.tolist() == [0, 1, 2]  # lowest free slots first
    assert idx.lookup(np.array([7, 5])).tolist() == [2, 0]
    assert (idx.hits, idx.misses) == (4, 3)
    assert idx.hit_ratio == pytest.approx(4 / 7)


def test_pinned_rows_stay_in_first_slots():
    idx = CacheIndex(1000, 5, "lru", pinned_rows=np.array([10, 20]))
    assert idx.n_pinned == 2 and idx.row_of_slot[:2].tolist() == [10, 20]
    rng = np.random.default_rng(0)
    for _ in range(100):
        b = rng.integers(0, 1000, 30)
        s = idx.lookup(b)
        idx.admit(b[s < 0])
    assert idx.slot_of_row[[10, 20]].tolist() == [0, 1]
    assert idx.size == 5


def test_admit_skips_resident_rows_and_respects_capacity():
    idx = CacheIndex(100, 3, "lru", pinned_rows=[])
    idx.admit(np.array([1, 2]))
    ins, _, ev = idx.admit(np.array([2, 3, 4, 5, 6]))
    assert 2 not in ins.tolist()
    assert idx.size == 3 and ins.size == 3 and ev.size == 2


def test_lease_release_refcounts():
    idx = CacheIndex(100, 2, "lru", pinned_rows=[])
    idx.admit(np.array([1, 2]))
    s1 = idx.slot_of_row[1]
    idx.lease(np.array([s1, s1]))  # two outstanding prefetches
    idx.release(np.array([s1]))
    _, _, ev = idx.admit(np.array([3]))
    assert ev.tolist() == [2]  # 1 is still leased once, though least recent
    idx.release(np.array([s1]))
    with pytest.raises(TierStoreError, match="holds no lease"):
        idx.release(np.array([s1]))
    assert idx.refcount[s1] == 0


def test_everything_leased_admits_nothing():
    idx = CacheIndex(100, 2, "lru", pinned_rows=[])
    _, slots, _ = idx.admit(np.array([1, 2]))
    idx.lease(slots)
    ins, _, ev = idx.admit(np.array([3, 4]))
    assert ins.size == 0 and ev.size == 0
    assert set(idx.row_of_slot.tolist()) == {1, 2}


def test_input_errors_name_the_problem():
    idx = CacheIndex(10, 2, "lru", pinned_rows=[])
    with pytest.raises(InvalidIdError, match="10 is outside"):
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
        CacheIndex(10, 3, LRUPolicy(4))
    with pytest.raises(TierStoreError, match="one count per row"):
        CacheIndex(10, 3, "static", profile=np.ones(9, dtype=np.int64))
    with pytest.raises(InvalidIdError):
        idx.lease(np.array([2]))
    assert idx.lookup(np.array([], dtype=np.float32)).size == 0  # empty batches of any dtype


def test_zero_capacity_and_full_pinning():
    idx = CacheIndex(10, 0, "default")
    assert idx.lookup(np.array([1, 2])).tolist() == [-1, -1]
    assert idx.admit(np.array([1, 2]))[0].size == 0
    idx = CacheIndex(10, 2, "lru", pinned_rows=np.array([3, 4]))
    assert idx.admit(np.array([1]))[0].size == 0
    assert idx.lookup(np.array([3])).tolist() == [0]


def policy_bytes(obj, depth: int = 0) -> int:
    """numpy bytes held by a policy and its helper objects (not the index it points to)."""
    total = 0
    for k, v in vars(obj).items():
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif k != "index" and depth < 2 and hasattr(v, "__dict__") and not isinstance(v, type):
            total += policy_bytes(v, depth + 1)
    return total


def test_metadata_per_table_row_is_four_bytes():
    """The 8 B/row budget covers two tiers: one int32 per table row each, nothing more.
    Per-slot state (policy queues, sketch) scales with capacity, not with the table."""
    n_rows, cap = 2_000_000, 1000
    for name in ("lru", "lfu", "s3fifo", "wtinylfu", "static", "default"):
        rng = np.random.default_rng(1)
        profile = np.bincount(rng.zipf(1.2, 100_000) % n_rows, minlength=n_rows)
        idx = CacheIndex(n_rows, cap, name, profile=profile)
        assert idx.slot_of_row.dtype == np.int32 and idx.slot_of_row.nbytes == 4 * n_rows
        per_slot = policy_bytes(idx.policy)
        assert per_slot < 400 * cap, f"{name}: {per_slot / cap:.0f} B per slot"
        assert per_slot < n_rows, f"{name} keeps per-table-row state"


def test_stats_and_reset():
    idx = CacheIndex(10, 2, "lru", pinned_rows=[])
    idx.lookup(np.array([1]))
    idx.admit(np.array([1]))
    st = idx.stats()
    assert st["misses"] == 1 and st["insertions"] == 1 and st["size"] == 1 and st["policy"] == "lru"
    assert idx.maxsize == 2 and idx.currsize == 1
    idx.reset_stats()
    assert idx.hits == idx.misses == idx.insertions == idx.evictions == 0
    assert idx.resident(np.array([1, 2])).tolist() == [True, False]
