"""Building a row map (tierstore.cache.rowmap) of millions of keys at once, in parallel.

At open, a cache tier's rank map and pinned rows are millions of keys inserted into a map
far larger than the CPU caches: one random bucket per key (~100 ns each at 60M keys, the
largest part of open's index build, issue 19). ``build_map`` builds the same (row, value)
set without a random write into the map (the grouping's writes go to one stream per part):

1. the keys are grouped by *part*, a run of ``PART`` (4,096) consecutive home buckets (a
   counting sort, stable: input order within a part); chunks of the input in parallel;
2. each part's keys are sorted by home bucket (then row; equal rows keep input order and
   the last one's value is kept, as ``rm_build`` keeps it) and placed in that order, each
   at ``max(home, previous + 1)``, inside the part's own 32 KiB of buckets: parts in
   parallel, each thread writing its own buckets;
3. keys that run past their part's end (a run of full buckets crossing the boundary) are
   carried into the next part, which is placed again with them first: one sequential pass
   (a few parts: at a load of 0.8 most parts end with room), wrapping from the last part
   to the first as the probe does.

The result is a valid linear-probing map of exactly the keys ``rm_build`` would insert
(each key's buckets from home to its own are full, so ``rm_get`` finds it; a missing row's
probe ends at the same empty bucket): the *ordered* layout, a function of the (row, value)
set and the map's size alone, the same whatever the input order or the thread count
(tests/tierstore/cache/test_mapbuild.py). Its bytes differ from ``rm_build``'s (which
depends on the insertion order); the probe lengths are the same (linear probing's total
displacement does not depend on the order). Memory: 8 bytes a key of temporaries (the
grouped keys), per thread 4,096 counters and one part's keys. ``TIERSTORE_INDEX_THREADS``
sets the threads (``index_threads``). Measured (docs/benchmarks.md, 2 cores, loaded): a rank
map of 40M rows costs 1.6x less CPU than sorting the ranking and inserting it one key at a
time, and 2 threads cut its wall 1.3x; a whole open on 2 shared cores did not get faster.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..jit import kernel
from .rowmap import EMPTY, _home, _key, buckets, rm_build

__all__ = ["PART", "build_map", "empty_map", "index_threads"]

PART = 4096  # home buckets per part: 32 KiB of map, in the L1/L2 caches while it is placed
_LO = 0xFFFFFFFF
_MIN_PARALLEL = 1 << 16  # keys below which one thread builds (a pool costs more than it saves)


def index_threads() -> int:
    """Threads building an index at open: ``TIERSTORE_INDEX_THREADS`` if set (>= 1), else the
    CPUs this process may run on, at most 16."""
    env = os.environ.get("TIERSTORE_INDEX_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            from ..errors import TierStoreError
            raise TierStoreError(f"TIERSTORE_INDEX_THREADS={env!r} must be an integer >= 1 (or unset)")
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def build_map(RM: np.ndarray, rows: np.ndarray, vals: np.ndarray | None = None, *,
              threads: int | None = None, _part: int = 0) -> int:
    """Insert ``rows[i] -> vals[i]`` (``vals`` None: ``i``) into the *empty* map ``RM``, as
    ``rm_build`` would (a repeated row keeps its last value), in the ordered layout (module
    doc). Returns how many keys repeated an earlier row (0: the rows are distinct)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    n, N = rows.size, RM.size
    vals = _EMPTY if vals is None else np.ascontiguousarray(vals, dtype=np.int64)
    if n == 0:
        return 0
    T = max(1, int(threads)) if threads is not None else index_threads() if n >= _MIN_PARALLEL else 1
    W = _part if _part else PART
    P = -(-N // W)
    # 1. group by part: per chunk counts, then each chunk's start in each part (input order kept)
    cuts = [n * t // T for t in range(T + 1)]
    H = np.zeros((T, P + 1), np.int64)
    E = np.empty(n, np.int64)  # the keys as buckets (row << 32 | value), grouped by part
    _run(T, lambda t: _count(RM, rows, cuts[t], cuts[t + 1], H[t], W))
    per_part = H[:, :P].sum(axis=0)
    off = np.zeros(P + 1, np.int64)
    np.cumsum(per_part, out=off[1:])
    at = off[:P] + np.vstack([np.zeros((1, P), np.int64), np.cumsum(H[:-1, :P], axis=0)])  # (T, P)
    _run(T, lambda t: _scatter(RM, rows, vals, cuts[t], cuts[t + 1], at[t], E, W))
    # 2. sort and place each part in its own buckets (threads: contiguous runs of parts)
    kept = np.zeros(P, np.int64)  # keys of each part after dropping repeated rows
    over = np.zeros(P, np.int64)  # of those, how many run past the part's end
    dups = np.zeros(T, np.int64)
    pcuts = [P * t // T for t in range(T + 1)]
    _run(T, lambda t: _place_parts(RM, E, off, kept, over, pcuts[t], pcuts[t + 1], dups, t, W))
    # 3. carry what ran past a part's end into the next part, in order (one thread)
    if over.any():
        C = np.empty(int(kept.sum()), np.int64)
        if not _carry(RM, E, off, kept, over, C, np.empty_like(C), W):  # pragma: no cover - a map over its load
            RM.fill(EMPTY)
            rm_build(RM, rows, vals if vals.size else np.arange(n, dtype=np.int64))
    return int(dups.sum())


_EMPTY = np.zeros(0, np.int64)


def empty_map(entries: int, *, threads: int | None = None) -> np.ndarray:
    """``rowmap.new_map(entries)``, its buckets emptied by threads (a fresh map of millions of
    keys is first touched here: its page faults, ~60% of filling it, run in parallel)."""
    RM = np.empty(buckets(entries), np.int64)
    n = RM.size
    T = max(1, int(threads)) if threads is not None else index_threads() if n >= 8 * _MIN_PARALLEL else 1
    cuts = [n * t // T // 512 * 512 for t in range(T)] + [n]  # whole 4 KiB pages per thread
    _run(T, lambda t: _fill(RM, cuts[t], cuts[t + 1]))
    return RM


@kernel
def _fill(RM, a, b):  # pragma: no cover - compiled
    for i in range(a, b):
        RM[i] = EMPTY


def _run(T: int, fn) -> None:
    if T == 1:
        fn(0)
        return
    with ThreadPoolExecutor(max_workers=T, thread_name_prefix="tierstore-index") as pool:
        for f in [pool.submit(fn, t) for t in range(T)]:
            f.result()


@kernel
def _count(RM, rows, a, b, h, W):  # pragma: no cover - compiled
    for i in range(a, b):
        h[_home(RM, rows[i]) // W] += 1


@kernel
def _scatter(RM, rows, vals, a, b, at, E, W):  # pragma: no cover - compiled
    for i in range(a, b):
        r = rows[i]
        p = _home(RM, r) // W
        v = np.int64(i) if vals.size == 0 else vals[i]
        E[at[p]] = (np.int64(r) << 32) | (v & _LO)
        at[p] += 1


@kernel
def _place_parts(RM, E, off, kept, over, p0, p1, dups, t, W):  # pragma: no cover - compiled
    """Parts [p0, p1): sort each part's keys by (home, row), drop repeated rows (keeping the
    last), write them back at the part's start, place them in the part's buckets, each at
    ``max(home, previous + 1)``. Each key's home is hashed once (kept beside it)."""
    N = RM.size
    cnt = np.zeros(W + 1, np.int64)
    most = 0
    for p in range(p0, p1):
        most = max(most, off[p + 1] - off[p])
    buf = np.empty(most, np.int64)
    hb = np.empty(most, np.int64)  # home (from the part's start) of buf[x]
    hl = np.empty(most, np.int64)  # home of E[a + x]
    d = 0
    for p in range(p0, p1):
        a, b = off[p], off[p + 1]
        m = b - a
        base = p * W
        cnt[:] = 0
        for i in range(m):  # counting sort by home (stable)
            k = _home(RM, _key(E[a + i])) - base
            hl[i] = k
            cnt[k + 1] += 1
        for k in range(W):
            cnt[k + 1] += cnt[k]
        for i in range(m):
            k = hl[i]
            x = cnt[k]
            buf[x] = E[a + i]
            hb[x] = k
            cnt[k] += 1
        j = 0
        i = 0
        while i < m:  # each group of equal homes: sort by row (stable), keep each row's last
            h = hb[i]
            g = i + 1
            while g < m and hb[g] == h:
                g += 1
            for x in range(i + 1, g):
                e = buf[x]
                y = x - 1
                while y >= i and _key(buf[y]) > _key(e):
                    buf[y + 1] = buf[y]
                    y -= 1
                buf[y + 1] = e
            for x in range(i, g):
                if x + 1 < g and _key(buf[x + 1]) == _key(buf[x]):
                    d += 1
                    continue
                E[a + j] = buf[x]
                hl[j] = h
                j += 1
            i = g
        kept[p] = j
        end = min(N, base + W) - base
        prev = -1
        q = j
        for x in range(j):
            pos = max(hl[x], prev + 1)
            if pos >= end:
                q = x
                break
            RM[base + pos] = E[a + x]
            prev = pos
        over[p] = j - q
    dups[t] = d


@kernel
def _replace(RM, E, a, b, start, end, C, nc, C2):  # pragma: no cover - compiled
    """Place part [start, end) again: the carried keys C[:nc] first (their homes lie before
    the part, their runs reach its start), then its own keys E[a:b]; what does not fit goes
    to C2, in order. Returns how many did not fit."""
    RM[start:end] = EMPTY
    pos = start
    n2 = 0
    for k in range(nc):
        if pos < end:
            RM[pos] = C[k]
            pos += 1
        else:
            C2[n2] = C[k]
            n2 += 1
    prev = pos - 1
    for i in range(a, b):
        e = E[i]
        q = max(_home(RM, _key(e)), prev + 1)
        if n2 > 0 or q >= end:
            C2[n2] = e
            n2 += 1
            continue
        RM[q] = e
        prev = q
    return n2


@kernel
def _carry(RM, E, off, kept, over, C, C2, W):  # pragma: no cover - compiled
    """Step 3: from the first part with keys past its end, carry them into the next part,
    placing it again, until a part takes all it is given (wrapping from the last part to
    the first). False when it never settles (a map fuller than any ``buckets`` sizes)."""
    N = RM.size
    P = off.size - 1
    nc = 0
    steps = 0
    p = 0
    wrapped = False
    while True:
        if p == P:
            if nc == 0:
                return True
            p = 0
            wrapped = True
        if wrapped and nc == 0:
            return True
        a = off[p]
        b = a + kept[p]
        start = p * W
        end = min(N, start + W)
        if nc == 0:
            for k in range(over[p]):  # its own overflow, placed by step 2
                C[k] = E[b - over[p] + k]
            nc = over[p]
        else:
            nc = _replace(RM, E, a, b, start, end, C, nc, C2)
            C, C2 = C2, C
        p += 1
        steps += 1
        if steps > 3 * P + 3:
            return False
