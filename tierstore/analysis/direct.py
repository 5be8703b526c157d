"""The profiler's replays over direct maps: the trace renumbered densely, one bucket per id.

A replay knows every row it will meet before it starts: the trace's and the ranked rows a
policy can place. So it can renumber them 0..D-1 and give its tier a *direct* row map
(tierstore.cache.rowmap.direct_map: bucket r holds row r) instead of the store's hashed one
at a load of 0.8, where an absent row reads ~13 buckets and a delete shifts the entries after
it: a miss does 7-12 map lookups and 2-4 deletes (ghosts included), most of a replay's time
at DeepSeek-V4.1 scale (docs/benchmarks.md, "The profiler at DeepSeek-V4.1 scale").

Dense ids: the trace's rows, most accessed first (the hottest share cache lines), then the
profile's ranked rows that the trace never reads (numbered once the ranking is known, so
the replays that ignore it start before it). Default's rank map is direct too. Memory: 8
bytes a replay per id of that universe for each direct map (sized by the trace and the
capacities, never by the table), plus the renumbered trace (8 bytes an access, shared) and
12 bytes a distinct row of the trace (the original ids, to place ranked rows).

Exact: a policy whose decisions never read a row id's value decides the same on any
renumbering (ties are broken by slot, the ranking by rank): ``DIRECT_POLICIES``, checked
replay against replay in tests/tierstore/analysis/test_direct.py. ``wtinylfu`` hashes the
row into its count-min sketch and is replayed with the original ids; so is any replay with
hints (``lookahead``: the hint table hashes rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cache import CacheIndex
from ..cache.rowmap import to_direct
from ..ranking import Profile, TopProfile, as_profile, hot_rows

__all__ = ["DIRECT_POLICIES", "DirectTrace", "direct_trace", "ranked", "usable", "direct_index"]

# policies whose decisions do not depend on the values of row ids (only on their equality)
DIRECT_POLICIES = frozenset({"lru", "lfu", "s3fifo", "arc", "static", "default"})


@dataclass
class DirectTrace:
    """A trace renumbered for direct-map replays."""

    rows: np.ndarray  # int64: the trace's accesses as dense ids
    universe: int  # D: dense ids are 0..D-1
    profile: TopProfile | None  # the ranking in dense ids (None: no profile)
    keys: np.ndarray  # int32: the trace's distinct original rows, ascending
    ids: np.ndarray  # int64: the dense id of each of ``keys``


def direct_trace(rows: np.ndarray, dense: tuple[np.ndarray, int]) -> DirectTrace:
    """``rows`` (the trace, original ids < 2**31) renumbered for direct replays: its distinct
    rows, most accessed first (the hot ones share cache lines), get ids 0..T-1. No profile:
    ``ranked`` adds one (the ranking is not needed to start the replays that ignore it).

    ``dense``: ``stack_distance.dense_ids(rows)`` (a renumbering that keeps equal ids equal and
    the order of ids: it saves a sort of the trace). Cost: O(trace + ids of ``dense``), one
    argsort of the distinct rows' counts."""
    d32, d0 = dense
    rows = np.asarray(rows).reshape(-1)
    counts = np.bincount(d32, minlength=d0)
    present = np.flatnonzero(counts)  # the ids of dense that occur (dense_ids may leave gaps)
    orig = np.empty(d0, np.int32)  # rows < 2**31 (CacheIndex's bound)
    orig[d32] = rows  # the original row of each id of dense
    keys = orig[present]  # ascending: dense_ids keeps the order of rows
    del orig
    by_count = np.argsort(-counts[present], kind="stable")  # the most accessed first
    ids = np.empty(present.size, np.int64)
    ids[by_count] = np.arange(present.size, dtype=np.int64)
    new = np.full(d0, -1, np.int64)  # id of dense -> direct id
    new[present] = ids
    del counts, present, by_count
    return DirectTrace(new[d32], int(ids.size), None, keys, ids)


def ranked(d: DirectTrace, profile: Profile | None, n_rows: int, ranked_rows: int) -> DirectTrace:
    """``d`` with ``profile``'s ranking (of a table of ``n_rows`` rows): its ``ranked_rows``
    hottest rows (the largest capacity of a policy that reads it) in dense ids, those not in
    the trace numbered after the trace's. The same renumbered trace (shared)."""
    if profile is None:
        return d
    top = hot_rows(as_profile(profile, n_rows), ranked_rows)
    at = np.minimum(np.searchsorted(d.keys, top), max(0, d.keys.size - 1))
    known = d.keys[at] == top if d.keys.size else np.zeros(top.size, bool)
    top_ids = np.empty(top.size, np.int64)
    top_ids[known] = d.ids[at[known]]
    extra = int(top.size - np.count_nonzero(known))
    top_ids[~known] = d.universe + np.arange(extra, dtype=np.int64)
    universe = d.universe + extra
    dprof = TopProfile(top_ids, None, universe, _complete(int(top.size), ranked_rows))
    return DirectTrace(d.rows, universe, dprof, d.keys, d.ids)


def _complete(m: int, ranked_rows: int) -> bool:
    """Whether the dense ranking lists every ranked row: the source ranked fewer than were
    asked for (``hot_rows`` returns all it has, or refuses). Exactly ``ranked_rows``: there
    may be more, and a replay that ranks more is not ``usable``."""
    return m < ranked_rows


def usable(d: DirectTrace, policy: str, capacity: int, profiled: bool, lookahead: int) -> bool:
    """Whether a replay of ``policy`` at ``capacity`` runs exactly over ``d``: a policy of
    ``DIRECT_POLICIES``, no hints, and ``d`` ranks every row the policy may rank (its ranking
    holds ``capacity`` rows or all there are)."""
    if policy not in DIRECT_POLICIES or lookahead > 0:
        return False
    if not profiled:
        return True
    return d.profile is not None and (d.profile.complete or d.profile.rows.size >= capacity)


def direct_index(d: DirectTrace, capacity: int, policy: str, *, profiled: bool,
                 rng: np.random.Generator | int | None = None) -> CacheIndex:
    """A tier of ``capacity`` slots for ``policy`` over ``d``'s dense ids, with direct row and
    rank maps: built as the simulator builds it (the same prefill, the same state), then its
    maps moved into direct ones holding the same entries."""
    idx = CacheIndex(d.universe, capacity, policy, profile=d.profile if profiled else None, rng=rng,
                     pinned_rows=None if profiled else np.empty(0, np.int64))
    M, RM, *mid, RK = idx.state
    RM = to_direct(RM, d.universe)
    if RK.size:  # the ranked rows' ranks by dense id
        RK = to_direct(RK, d.universe)
    idx.state = (M, RM, *mid, RK)
    idx.row_map = RM
    return idx
