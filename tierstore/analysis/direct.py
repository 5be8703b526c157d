"""The profiler's replays over direct maps: the trace renumbered densely, one bucket per id.

A replay knows every row it will meet before it starts: the trace's and the ranked rows a
policy can place. So it can renumber them 0..D-1 and give its tier a *direct* row map
(tierstore.cache.rowmap.direct_map: bucket r holds row r) instead of the store's hashed one
at a load of 0.8, where an absent row reads ~13 buckets and a delete shifts the entries after
it: a miss does 7-12 map lookups and 2-4 deletes (ghosts included), most of a replay's time
at DeepSeek-V4.1 scale (docs/benchmarks.md, "The profiler at DeepSeek-V4.1 scale").

Dense ids: the profile's ranked rows first, in rank order (id = rank, so default's rank map
is direct too and the hottest rows share cache lines), then the trace's other rows, most
accessed first. Memory: 8 bytes a replay per id of that universe (sized by the trace and the
capacities, never by the table), plus the renumbered trace (8 bytes an access, shared).

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
from ..cache.layout import M_RANKM
from ..cache.rowmap import to_direct
from ..ranking import Profile, TopProfile, as_profile, hot_rows

__all__ = ["DIRECT_POLICIES", "DirectTrace", "direct_trace", "usable", "direct_index"]

# policies whose decisions do not depend on the values of row ids (only on their equality)
DIRECT_POLICIES = frozenset({"lru", "lfu", "s3fifo", "arc", "static", "default"})


@dataclass
class DirectTrace:
    """A trace renumbered for direct-map replays."""

    rows: np.ndarray  # int64: the trace's accesses as dense ids
    universe: int  # D: dense ids are 0..D-1
    profile: TopProfile | None  # the ranking in dense ids: rank i is id i (None: no profile)


def direct_trace(rows: np.ndarray, dense: tuple[np.ndarray, int], profile: Profile | None, n_rows: int,
                 ranked_rows: int) -> DirectTrace:
    """``rows`` (the trace, original ids < ``n_rows``) renumbered for direct replays.

    ``dense``: ``stack_distance.dense_ids(rows)`` (any renumbering that keeps equal ids equal:
    it saves a sort of the trace). ``profile``: the ranking's source; its ``ranked_rows``
    hottest rows (the largest capacity of a policy that reads it) get ids 0.. in rank order.
    Cost: O(trace + D) with one argsort of the trace's distinct rows' counts."""
    d32, d0 = dense
    rows = np.asarray(rows).reshape(-1)
    top = hot_rows(as_profile(profile, n_rows), ranked_rows) if profile is not None else np.empty(0, np.int64)
    m = int(top.size)
    counts = np.bincount(d32, minlength=d0)
    present = np.flatnonzero(counts)  # the ids of dense that occur (dense_ids may leave gaps)
    orig = np.empty(d0, np.int32)  # rows < 2**31 (CacheIndex's bound)
    orig[d32] = rows  # the original row of each id of dense
    new = np.full(d0, -1, np.int64)  # id of dense -> direct id
    rest = present
    if m:
        order = np.argsort(top, kind="stable")
        ts = top[order]
        at = np.minimum(np.searchsorted(ts, orig[present]), m - 1)
        hit = ts[at] == orig[present]
        new[present[hit]] = order[at[hit]]  # a ranked row's id is its rank
        rest = present[~hit]
    del orig
    by_count = rest[np.argsort(-counts[rest], kind="stable")]  # the most accessed first (locality)
    new[by_count] = m + np.arange(by_count.size, dtype=np.int64)
    universe = m + int(by_count.size)
    del counts, rest, by_count
    direct_rows = new[d32]
    dprof = None
    if profile is not None:
        dprof = TopProfile(np.arange(m, dtype=np.int64), None, universe, _complete(m, ranked_rows))
    return DirectTrace(direct_rows, universe, dprof)


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
    if RK.size:  # the ranked ids are 0..m-1 (id = rank): a direct map of those only
        RK = to_direct(RK, int(M[M_RANKM]))
    idx.state = (M, RM, *mid, RK)
    idx.row_map = RM
    return idx
