"""The ghost's free entries (structs.g_init / g_add / g_remove): freed entries on a stack,
then the never-used ones [M_GNEW, GCAP) in order, so open writes no entry (8 bytes an entry
of fresh memory before: the whole free list 0, 1, ..., gcap - 1 linked at open). Entries are
taken in the very order the old single free list gave them (the last freed first, then the
lowest never used), so every ghost decision is unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache import CacheIndex
from tierstore.cache.default import Default
from tierstore.cache.layout import M_GCAP, M_GFREE, NG, NM, NQ
from tierstore.cache.rowmap import new_map
from tierstore.cache.structs import g_add, g_init, g_of, g_remove
from tierstore.ranking import TopProfile


def test_a_new_index_writes_no_ghost_entry():
    n_rows, cap = 50_000, 8_000
    top = np.random.default_rng(1).choice(n_rows, size=10_000, replace=False)
    idx = CacheIndex(n_rows, cap, Default(cap), profile=TopProfile(top, None, n_rows, complete=True))
    M, GH = idx.state[0], idx.state[7]
    gcap = int(M[M_GCAP])
    assert gcap > 7_000 and int(M[M_GFREE]) == gcap
    # main linked every entry into the free list at open (G_NEXT = g + 1, G_QID = -1)
    assert not GH[:, :gcap].any(), "open wrote ghost entries"


def _old_list(ops, gcap):
    """The entry each add takes with one free list 0, 1, ..., gcap - 1 that freed entries
    are pushed in front of (the old g_init / g_remove)."""
    free = list(range(gcap))
    took = []
    for op, x in ops:
        if op == "add":
            took.append(free.pop(0))
        else:
            free.insert(0, x)
    return took


def _fifo_reuse(ops, gcap):
    """A different order (freed entries reused oldest first): the negative control."""
    free = list(range(gcap))
    took = []
    for op, x in ops:
        if op == "add":
            took.append(free.pop(0))
        else:
            free.append(x)
    return took


def _run(seed, gcap=64, steps=3_000):
    """Random adds and removes through the kernels; (ops, the entry each add took)."""
    rng = np.random.default_rng(seed)
    M = np.zeros(NM, np.int64)
    M[M_GCAP] = gcap
    GH = np.zeros((NG, gcap + NQ), np.int32)
    RM = new_map(gcap)
    g_init(M, GH)
    live: dict[int, int] = {}  # entry -> row
    ops, took = [], []
    row = 0
    for _ in range(steps):
        if M[M_GFREE] > 0 and (not live or rng.random() < 0.55):
            row += 1
            g_add(M, GH, RM, int(rng.integers(0, 3)), row, gcap + 1)
            g = int(g_of(RM, row))
            assert g >= 0 and g not in live
            live[g] = row
            ops.append(("add", None))
            took.append(g)
        else:
            g = int(rng.choice(list(live)))
            g_remove(M, GH, RM, g)
            assert g_of(RM, live.pop(g)) == -1
            ops.append(("remove", g))
        assert int(M[M_GFREE]) == gcap - len(live)
    return ops, took


@pytest.mark.parametrize("seed", range(4))
def test_entries_are_taken_in_the_old_free_lists_order(seed):
    ops, took = _run(seed)
    assert took == _old_list(ops, 64)
    assert took != _fifo_reuse(ops, 64)  # the check tells orders apart


def test_every_entry_is_used_and_reused():
    ops, took = _run(9, gcap=8, steps=400)
    assert sorted(set(took)) == list(range(8)) and len(took) > 8
