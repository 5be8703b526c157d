"""The row map's hash table against a dict: inserts, replacements and deletions (which
shift probe runs back, across the end of the table too) at the highest load it allows."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from tierstore.cache.rowmap import AHEAD, EMPTY, buckets, new_map, rm_build, rm_del_if, rm_get, rm_items, rm_set


@numba.njit
def _apply(RM, ops, rows, vals, out):
    """ops: 0 set, 1 delete if the value matches, 2 delete any; out: the value read after."""
    for i in range(ops.size):
        if ops[i] == 0:
            rm_set(RM, rows[i], vals[i])
        elif ops[i] == 1:
            rm_del_if(RM, rows[i], vals[i])
        else:
            rm_del_if(RM, rows[i], -1)
        out[i] = rm_get(RM, rows[i])


@pytest.mark.parametrize("entries", [1, 5, 64, 1000])
def test_rowmap_matches_a_dict(entries):
    rng = np.random.default_rng(entries)
    RM = new_map(entries)
    # a load of at most 0.8 (10 bytes per entry, issue 19), never full (a probe run ends)
    assert RM.size == buckets(entries) > entries and (RM == EMPTY).all()
    assert RM.size * 8 <= 10 * max(8, entries) + 64
    n = 20_000
    universe = rng.choice(2**31 - 1, size=3 * entries, replace=False)  # ids up to the largest row
    ref: dict[int, int] = {}
    ops = np.empty(n, np.int64)
    rows = np.empty(n, np.int64)
    vals = np.empty(n, np.int64)
    for i in range(n):  # a sequence that keeps at most `entries` keys, as the index does
        r = int(universe[rng.integers(universe.size)])
        op = int(rng.integers(3)) if (r in ref or len(ref) >= entries) else 0
        if op == 0 and r not in ref and len(ref) >= entries:
            op = 2
        v = int(rng.integers(-2 - entries, entries)) if op == 0 else (ref.get(r, 0) if rng.random() < 0.7 else 12345)
        if v == -1:
            v = 0
        ops[i], rows[i], vals[i] = op, r, v
        if op == 0:
            ref[r] = v
        elif op == 1 and ref.get(r) == v or op == 2:
            ref.pop(r, None)
    out = np.empty(n, np.int64)
    _apply(RM, ops, rows, vals, out)
    want = np.empty(n, np.int64)
    state: dict[int, int] = {}
    for i in range(n):
        if ops[i] == 0:
            state[int(rows[i])] = int(vals[i])
        elif ops[i] == 1 and state.get(int(rows[i])) == vals[i] or ops[i] == 2:
            state.pop(int(rows[i]), None)
        want[i] = state.get(int(rows[i]), -1)
    assert np.array_equal(out, want)
    got_rows, got_vals = rm_items(RM)
    assert dict(zip(got_rows.tolist(), got_vals.tolist())) == state == ref


@numba.njit
def _one_by_one(RM, rows, vals):
    for i in range(rows.size):
        rm_set(RM, rows[i], vals[i])


@pytest.mark.parametrize("n", [0, 1, AHEAD - 1, AHEAD, AHEAD + 1, 5_000])
def test_rm_build_prefetching_ahead_builds_the_map_one_insert_at_a_time_builds(n):
    """``rm_build`` prefetches each row's home bucket ``AHEAD`` rows early (open inserts
    millions of rows into maps far larger than the caches): the map, bucket for bucket, is
    the one the same inserts make in order, repeats and replacements included."""
    rng = np.random.default_rng(n)
    rows = rng.integers(0, 2**31 - 1, size=n).astype(np.int64)
    if n > 4:
        rows[n // 2:n // 2 + 3] = rows[:3]  # replacements: the later value stays
    vals = rng.integers(-2**31 + 2, 2**31 - 1, size=n).astype(np.int64)
    a, b = new_map(max(1, n)), new_map(max(1, n))
    rm_build(a, rows, vals)
    _one_by_one(b, rows, vals)
    assert np.array_equal(a, b)
