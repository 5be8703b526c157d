"""``TierWarmth``'s state at open (tiers/warm.py): the placed rows as the index keeps them
(int32) and, for a new index, no array of slots at all (they are [0, size)): 5 bytes of fresh
memory a slot, not 17 (int64 slots and rows, and ``pending``). What it answers is unchanged:
the placed slots and rows of ``placed_slots``, in slot order, int64."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tierstore.cache import CacheIndex
from tierstore.cache.default import Default
from tierstore.ranking import TopProfile
from tierstore.tiers.hotset import placed_run, placed_slots
from tierstore.tiers.warm import TierWarmth


def _index(policy: str, n_rows: int = 20_000, cap: int = 3_000, hot: int = 2_500) -> CacheIndex:
    top = np.random.default_rng(1).choice(n_rows, size=hot, replace=False)
    p = Default(cap) if policy == "default" else policy
    return CacheIndex(n_rows, cap, p, profile=TopProfile(top, None, n_rows, complete=True))


def _arrays_bytes(obj) -> int:
    return sum(v.nbytes for v in vars(obj).values() if isinstance(v, np.ndarray))


def _check(w: TierWarmth, ros: np.ndarray, size: int) -> None:
    slots, rows = placed_slots(ros, size)
    assert w.slots.dtype == w.rows.dtype == np.int64
    assert np.array_equal(w.slots, slots) and np.array_equal(w.rows, rows)
    assert w.placed == w.left == slots.size
    want = np.zeros(ros.size, np.uint8)
    want[slots] = 1
    assert np.array_equal(w.pending, want)
    idx = np.random.default_rng(2).integers(0, max(1, slots.size), size=min(50, slots.size))
    assert np.array_equal(w.slots_at(idx), slots[idx]) and np.array_equal(w.rows_at(idx), rows[idx])
    assert w.slots_at(idx).dtype == w.rows_at(idx).dtype == np.int64


@pytest.mark.parametrize("policy", ["default", "static"])
def test_warmth_of_a_new_index_keeps_5_bytes_a_slot(policy):
    idx = _index(policy)
    ros = idx.row_of_slot
    assert placed_run(ros, idx.size) and idx.size > 2_000
    w = TierWarmth(SimpleNamespace(index=idx, capacity=idx.capacity))
    # pending (1 byte a slot) and the placed rows (int32); main kept int64 slots and rows too: 17
    assert _arrays_bytes(w) <= 5 * idx.capacity
    _check(w, ros, idx.size)


def test_warmth_of_slots_with_holes_finds_them_by_a_scan():
    idx = _index("default")
    ros = idx.row_of_slot
    ros[[3, 700]] = -1  # holes (as an aborted fill leaves): not a run
    size = idx.size
    assert not placed_run(ros, size)
    w = TierWarmth(SimpleNamespace(index=idx, capacity=idx.capacity))
    _check(w, ros, size)
    assert w.placed == size - 2 and 3 not in w.slots.tolist()


def test_placed_run_is_the_scan():
    for ros, size, want in (([5, 7, 9, -1, -1], 3, True), ([5, -1, 9, -1], 3, False), ([5, 7, -1, 8], 2, False),
                            ([-1, -1], 0, True), ([4, 4], 2, True), ([4, 4], 3, False), ([], 0, True),
                            ([1, 2], -1, False)):
        a = np.array(ros, np.int32)
        assert placed_run(a, size) == want, (ros, size)
        if 0 <= size <= a.size:
            scan = bool((a[:size] >= 0).all()) and not bool((a[size:] >= 0).any())
            assert scan == want
