"""The row -> slot map of a cache tier: an open-addressing hash table sized to the cache.

Each cached tier maps the table rows it holds to their slots, and the rows its ghosts
remember to their ghost entries. A dense array over the table (one int32 per row, as this
map was) costs 1.5 GB per tier at DeepSeek-V4.1's 384M rows before a single row is cached;
this table costs 8 bytes per bucket, with ``buckets(entries)`` = 1.25 x (slots + ghost
entries) buckets, rounded up to a multiple of 8: 10 bytes per slot or ghost entry, whatever
the table's size (a power of two, as before, cost 16-32: a budget just past one paid twice;
2 x entries, as before issue 19's 32-byte bound, cost 16).

One bucket is one int64: ``row << 32 | (value & 0xffffffff)``, ``EMPTY`` (-1) when unused.
A value is a slot (>= 0) or ``-2 - g`` for ghost entry g (the map's old encoding), so
``rm_get`` returns exactly what ``sor[r]`` did: -1 absent, >= 0 a slot, <= -2 a ghost.
Rows are < 2**31 (CacheIndex checks it), so a key never collides with EMPTY.

Linear probing from a splitmix64 hash's top 32 bits scaled to the table's size (``(h32 x
buckets) >> 32``: any size, no modulo) at a load factor of at most 0.8 (every entry is a
slot's row or a ghost entry's, so the table can never fill): a hit reads ~3 buckets on
average when the tier is full, a miss ~13 (Knuth's (1 + 1/(1-a)) / 2 and (1 + 1/(1-a)^2) /
2); eight buckets share a 64-byte cache line, so that is still one or two lines per
access. At a load of 1/2 (16 bytes per entry) it was ~1.5 and ~2.5 buckets; the lookup
benchmark did not tell the two apart (benchmarks/bench_lookup.py, issue 19). Deletion shifts the
following entries back (no tombstones), so the probe lengths never degrade with churn.
The hash is seeded with a constant: the shared host tier's map, built by one process, is
read by every other one.

A *direct* map (``direct_map``) is the profiler's, never the store's: its rows are dense ids
0..n-1 (a replay renumbers its trace, tierstore.analysis.direct) and bucket r holds row r,
so a lookup reads one bucket and a delete empties it, no probing and no shifting. Its size
is never a multiple of 8 (``buckets`` always is), which is how every kernel here tells the
two apart: one predictable branch, taken in ``_home`` and ``_remove_at`` only (a lookup of
a store's map pays nothing else: a bounds check in ``rm_get`` cost 2-6% on bench_lookup's
1,024-id all-hit lookups). Every row given to a direct map must be below its size (the
replay's universe holds every row it can meet; nothing checks it).
"""

from __future__ import annotations

import numpy as np

from ..errors import TierStoreError
from ..jit import kernel, prefetch

__all__ = ["EMPTY", "AHEAD", "buckets", "map_bytes", "new_map", "direct_map", "is_direct", "to_direct", "rm_get", "rm_set", "rm_del", "rm_del_if",
           "rm_build", "rm_prefetch", "rm_get_many", "rm_items"]

EMPTY = -1
_SEED = 0x5EED0F0A  # fixed: every process must hash a row to the same bucket
_LO = 0xFFFFFFFF
# how many rows ahead a bulk insert prefetches its home bucket (rm_build, walk.prefill): at
# open, millions of rows each land in a random bucket of a map far larger than the caches;
# with the next rows' lines already on their way, ~1.7x faster (8M rows), the same map
AHEAD = 16


def buckets(entries: int) -> int:
    """Buckets for a map of at most ``entries`` keys: 1.25 x entries (a load of at most 0.8)
    rounded up to a multiple of 8; always more than ``entries``, so a probe run ends."""
    return -(-(5 * max(8, int(entries))) // 32) * 8


def map_bytes(entries: int) -> int:
    """Bytes of a map able to hold ``entries`` keys."""
    return buckets(entries) * 8


def new_map(entries: int) -> np.ndarray:
    """An empty map able to hold ``entries`` keys."""
    return np.full(buckets(entries), EMPTY, dtype=np.int64)


def direct_map(n: int) -> np.ndarray:
    """An empty direct map of rows 0..n-1: n buckets, one more when n is a multiple of 8 (a
    direct map's size never is: that marks it). 8 bytes a row of the universe."""
    n = max(0, int(n))
    return np.full(n + (1 if n % 8 == 0 else 0), EMPTY, dtype=np.int64)


def is_direct(RM: np.ndarray) -> bool:
    """Whether ``RM`` is a direct map (``direct_map``), not a hashed one."""
    return bool(RM.size & 7)


@kernel(inline=True)
def _home(RM, r):  # pragma: no cover - compiled
    """Row r's first bucket: a splitmix64 finaliser's top 32 bits scaled to the size
    (structs.mix64's hash; not imported from there, which imports this module); in a
    direct map, r itself."""
    if RM.size & 7:
        return np.int64(r)
    x = np.uint64(r) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(_SEED)
    x ^= x >> np.uint64(29)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(32)
    return np.int64(((x >> np.uint64(32)) * np.uint64(RM.size)) >> np.uint64(32))


@kernel(inline=True)
def _key(e):  # pragma: no cover - compiled
    return e >> 32  # arithmetic: EMPTY -> -1


@kernel(inline=True)
def _val(e):  # pragma: no cover - compiled
    return ((e & _LO) ^ 0x80000000) - 0x80000000  # the low 32 bits, sign-extended


@kernel(inline=True)
def _find(RM, r):  # pragma: no cover - compiled
    """The bucket of row r's probe run that holds r, or the empty bucket that ends the run
    (where r would go): the one probe loop of get, set and delete."""
    n = RM.size
    i = _home(RM, r)
    while True:
        e = RM[i]
        if e == EMPTY or _key(e) == r:
            return i
        i += 1
        if i == n:
            i = 0


@kernel(inline=True)
def rm_get(RM, r):  # pragma: no cover - compiled
    """Row r's value: its slot (>= 0), ``-2 - g`` (ghost entry g) or -1 (absent)."""
    e = RM[_find(RM, r)]
    return -1 if e == EMPTY else _val(e)


@kernel(inline=True)
def rm_set(RM, r, v):  # pragma: no cover - compiled
    """Row r now maps to v (inserted or replaced)."""
    RM[_find(RM, r)] = (np.int64(r) << 32) | (np.int64(v) & _LO)


@kernel(inline=True)
def _remove_at(RM, i):  # pragma: no cover - compiled
    """Empty bucket i, shifting back the entries of its probe run that would be lost (a
    direct map has no probe runs)."""
    n = RM.size
    if n & 7:
        RM[i] = EMPTY
        return
    j = i
    while True:
        j += 1
        if j == n:
            j = 0
        e = RM[j]
        if e == EMPTY:
            break
        k = _home(RM, _key(e))
        # e may move to i when its home is not in the cyclic range (i, j]
        if (j > i and (k <= i or k > j)) or (j < i and k <= i and k > j):
            RM[i] = e
            i = j
    RM[i] = EMPTY


@kernel(inline=True)
def rm_del_if(RM, r, v):  # pragma: no cover - compiled
    """Forget row r if it maps to v (``v`` = -1: whatever it maps to). Returns whether it did."""
    i = _find(RM, r)
    e = RM[i]
    if e == EMPTY or (v != -1 and _val(e) != v):
        return False
    _remove_at(RM, i)
    return True


@kernel(inline=True)
def rm_del(RM, r):  # pragma: no cover - compiled
    """Forget row r (nothing if absent)."""
    rm_del_if(RM, r, -1)


@kernel
def rm_build(RM, rows, vals):  # pragma: no cover - compiled
    """Map ``rows[i]`` to ``vals[i]`` for each i, in order (the map is the one the inserts
    make one by one; each row's home bucket is prefetched ``AHEAD`` rows early)."""
    n = rows.size
    for i in range(min(AHEAD, n)):
        rm_prefetch(RM, rows[i])
    for i in range(n):
        if i + AHEAD < n:
            rm_prefetch(RM, rows[i + AHEAD])
        rm_set(RM, rows[i], vals[i])


@kernel(inline=True)
def rm_prefetch(RM, r):  # pragma: no cover - compiled
    """Start loading row r's home bucket (a hint: no effect on the map)."""
    prefetch(RM, _home(RM, r))


@kernel
def rm_get_many(RM, rows, out):  # pragma: no cover - compiled
    """``out[i]`` = the value of ``rows[i]`` (a vectorised ``rm_get``)."""
    for i in range(rows.size):
        out[i] = rm_get(RM, rows[i])


def to_direct(RM: np.ndarray, n: int) -> np.ndarray:
    """A direct map of rows 0..n-1 holding every (row, value) of ``RM`` (every row < n)."""
    D = direct_map(n)
    e = RM[RM != EMPTY]
    if e.size and int((e >> 32).max()) >= n:
        raise TierStoreError(f"a direct map of {n} rows cannot hold row {int((e >> 32).max())}: size it to the "
                             f"replay's universe (every row the tier can hold)")
    D[e >> 32] = e
    return D


def rm_items(RM: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, value) of the map, sorted by row. O(buckets)."""
    e = RM[RM != EMPTY]
    rows = e >> 32
    vals = (e & _LO).astype(np.uint32).view(np.int32).astype(np.int64)
    order = np.argsort(rows, kind="stable")
    return rows[order], vals[order]
