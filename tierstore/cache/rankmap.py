"""A profile's ranking (row -> hotness rank) as a hash table: one probe run per lookup.

The default policy reads a row's rank on every miss (is it core-worthy? does it count as
``gain``?). It kept the ranked rows sorted by id (``int32[2, m]``, 8 bytes a ranked row)
and binary-searched them: ~22 scattered reads per miss at DeepSeek-V4.1 scale (3.8M ranked
rows at a capacity of 1% of 384M rows), 300-650 ns a miss, most of a profile's replay time.

This is the row map's table (tierstore.cache.rowmap) with the rank as the value: one int64
bucket ``row << 32 | rank`` per key, ``buckets(m)`` = 1.25 x m buckets (a load of 0.8): 10
bytes a ranked row (2 more than the sorted arrays), built once and never changed. A ranked
row is found in ~3 buckets on average, an unranked one (a miss of a row outside the
profile: most misses) in ~13, contiguous: one or two cache lines instead of ~22 lines.
Ranks are < capacity < 2**31, rows < 2**31 (CacheIndex checks it), so a bucket never
reads as the map's EMPTY.
"""

from __future__ import annotations

import numpy as np

from ..jit import kernel
from .mapbuild import build_map, empty_map
from .rowmap import map_bytes, rm_get

__all__ = ["rank_map", "rank_map_bytes", "ranked_map", "rk_get", "rk_get_many", "sort_ranking"]


def rank_map_bytes(m: int) -> int:
    """Bytes of the rank map of ``m`` ranked rows (0 for none)."""
    return map_bytes(m) if m > 0 else 0


def rank_map(rows: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The rank map of ``rows`` (distinct, < 2**31) with ``ranks`` (>= 0, < 2**31)."""
    return ranked_map(rows, ranks)[0]


def ranked_map(rows: np.ndarray, ranks: np.ndarray | None) -> tuple[np.ndarray, int]:
    """The rank map of ``rows`` (< 2**31) in any order, with ``ranks`` (None: a row's rank is
    its position, i.e. ``rows`` is a ranking hottest first), and how many rows repeat an
    earlier one (a repeated row keeps its last rank, as inserting the rows one by one in
    this order keeps it). Built by ``mapbuild.build_map``: threads, no random writes, and
    the same map whatever the order of ``rows`` (rows sorted first, as ``Default`` did, give
    the same bytes)."""
    rows = _ints(rows)
    if rows.size == 0:  # nothing ranked: never read (a miss reads it only when M[M_RANKM] > 0)
        return np.zeros(0, np.int64), 0
    RK = empty_map(rows.size)
    dups = build_map(RK, rows, None if ranks is None else _ints(ranks))
    return RK, dups


def _ints(a: np.ndarray) -> np.ndarray:
    """``a`` as it is when int32 or int64 (``Default.ranking``'s int32 arrays: no int64 copy,
    16 bytes a ranked row of fresh memory at open, paid in page faults), else int64."""
    a = np.asarray(a)
    if a.dtype in (np.int32, np.int64) and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.int64)


@kernel(inline=True)
def rk_get(RK, r, m):  # pragma: no cover - compiled
    """Hotness rank of row r (0 = hottest); ``m`` (the ranked rows) when r is not ranked."""
    v = rm_get(RK, r)
    return m if v < 0 else v


@kernel
def rk_get_many(RK, rows, m, out):  # pragma: no cover - compiled
    """``out[i]`` = the rank of ``rows[i]`` (a vectorised ``rk_get``)."""
    for i in range(rows.size):
        out[i] = rk_get(RK, rows[i], m)


def sort_ranking(top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ranking ``top`` (rows hottest first: position = rank; rows in [0, 2**31)) sorted
    by row: (rows, ranks) as int32, equal rows in rank order: exactly a stable argsort
    (``rows = top[order]``, ``ranks = order``), the order ``rank_map`` inserts them in.
    A least-significant-digit radix sort (11-bit digits, a digit every row shares skipped):
    O(rows), ~4x faster than sorting packed (row, rank) int64 values at millions of rows,
    and its temporaries are int32."""
    n = top.size
    rows, ranks = np.empty(n, np.int32), np.empty(n, np.int32)
    if n:
        _radix_ranking(np.ascontiguousarray(top, dtype=np.int64), rows, ranks, np.empty(n, np.int32),
                       np.empty(n, np.int32))
    return rows, ranks


@kernel
def _radix_ranking(top, rows, ranks, rows2, ranks2):  # pragma: no cover - compiled
    n = top.size
    H = np.zeros((3, 2048), np.int64)
    for i in range(n):
        r = top[i]
        rows[i] = r
        ranks[i] = i
        H[0, r & 2047] += 1
        H[1, (r >> 11) & 2047] += 1
        H[2, (r >> 22) & 2047] += 1
    a_rows, a_ranks, b_rows, b_ranks = rows, ranks, rows2, ranks2
    passes = 0
    for d in range(3):
        shift = 11 * d
        if H[d, (a_rows[0] >> shift) & 2047] == n:  # every row has this digit: already in order
            continue
        at = np.empty(2048, np.int64)
        acc = 0
        for k in range(2048):
            at[k] = acc
            acc += H[d, k]
        for i in range(n):  # stable: rows with equal digits keep their order
            r = a_rows[i]
            k = (r >> shift) & 2047
            j = at[k]
            at[k] = j + 1
            b_rows[j] = r
            b_ranks[j] = a_ranks[i]
        a_rows, a_ranks, b_rows, b_ranks = b_rows, b_ranks, a_rows, a_ranks
        passes += 1
    if passes % 2 == 1:  # an odd number of passes: the result is in the second pair
        rows[:] = a_rows
        ranks[:] = a_ranks
