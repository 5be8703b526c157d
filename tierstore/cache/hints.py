"""The known future: rows an announced lookup will read, not yet read (``Store.hint``).

A direct-mapped table (``HT``, allocated on the first hint: one empty bucket until then, see
``CacheIndex.hint_table``): per bucket a row and a count (+1 per hint, -1 when the row is
looked up; at most 255), packed in one int64 as ``row << 8 | count``, and the time (tick)
of its latest hint. One bucket per dynamic slot, at least 64: 16 bytes a slot (it was 4-8
buckets of 24 bytes, at least 1,024, 96-192 bytes a slot; a budget pays for it, so a floor
of 24 KiB left a small tier no slot; outstanding hints are normally a few lookups'
ids, far fewer than the slots, and a hint lost to a collision costs at most one miss).
A hint not used within ``M_HORIZON`` accesses expires, so a serving loop that announced a
request it then dropped does not protect those rows forever; once every hint is older than
that, the table is cleared in one pass and lookups skip hint work entirely (``M_HLIVE ==
0``). A collision with an outstanding hint of another row drops the new hint: a lost hint,
never a false one.

A batch of hints (``hint_rows``, what ``Store.hint`` runs) is defined as ``hint_add`` of its
distinct rows in ascending order, the order that decides which of two rows sharing a bucket
wins it (the smaller). It is computed without sorting the batch and without a per-call set:
a bucket the batch has hinted is told by its stamp (``hint_rows`` says how), so a
row's later duplicates are ignored and a smaller row displaces a larger one that took a free
bucket earlier in the same batch: the same table, counters and ticks as the sorted walk
(tests/tierstore/cache/test_hints.py holds it against ``hint_add`` in sorted order). The
table's lines are prefetched ``AHEAD`` rows ahead (a bucket is two lines: the key and the
stamp rows of ``HT``). Measured at 1,024 ids on a tier of ~100K slots, load ~4: the sorted
walk (``np.unique`` then ``hint_add``) 31 us, this with a per-call set of the touched buckets
8-9 us (np.unique alone was 13 us); the marks in the stamps replaced the set (2026-12-07).

A lookup consumes one hint per access (``hint_consume``). The all-hit path (the decode
step after its ``Store.hint``) consumes a whole lookup's in one call, ``hint_use_rows``,
when no expiry can fall inside it (``hints_stay_live``): at 1,024 ids on the same tier the
consumption went from ~20 us (a kernel call per row) to ~4.
"""

from __future__ import annotations

import numpy as np

from ..jit import kernel, prefetch
from .layout import M_HLAST, M_HLIVE, M_HORIZON, M_TICK
from .structs import mix64

_SEED = 11
H_KEY = 0  # row << 8 | count
H_STAMP = 1
_CMASK = 0xFF
AHEAD = 8  # rows whose bucket lines hint_rows (and the all-hit path: walk.all_hits_with) prefetch ahead
_MARK = -1  # hint_rows' stamp of the buckets a batch hinted, where ``now`` would not tell them (never a tick)


@kernel(inline=True)
def _count(HT, h):  # pragma: no cover - compiled
    return HT[H_KEY, h] & _CMASK


@kernel(inline=True)
def _row(HT, h):  # pragma: no cover - compiled
    return HT[H_KEY, h] >> 8


@kernel(inline=True)
def _set(HT, h, r, c):  # pragma: no cover - compiled
    HT[H_KEY, h] = (np.int64(r) << 8) | np.int64(c)


@kernel(inline=True)
def _bucket_of(r, nb):  # pragma: no cover - compiled
    """Row r's bucket in a table of ``nb`` (np.uint64) buckets: the hash's top 32 bits
    scaled to the table's own size: any size, and a state tuple still holding the one-bucket
    table of before the first hint (CacheIndex.hint_table) reads bucket 0, never past the
    end. Scalars only: the batch loops call it per row without binding an array (see
    ``hint_use_rows``)."""
    return np.int64(((mix64(r, _SEED) >> np.uint64(32)) * nb) >> np.uint64(32))


@kernel(inline=True)
def _bucket(M, HT, r):  # pragma: no cover - compiled
    return _bucket_of(r, np.uint64(HT.shape[1]))


@kernel(inline=True)
def _fresh(M, HT, h, now):  # pragma: no cover - compiled
    return now - HT[H_STAMP, h] <= M[M_HORIZON]


@kernel
def _idle(M, HT, now):  # pragma: no cover - compiled
    if M[M_HLIVE] > 0 and now - M[M_HLAST] > M[M_HORIZON]:
        for h in range(HT.shape[1]):
            HT[H_KEY, h] &= ~np.int64(_CMASK)  # every count 0
        M[M_HLIVE] = 0
    return M[M_HLIVE] == 0


@kernel
def hint_add(M, HT, r):  # pragma: no cover - compiled
    now = M[M_TICK]
    h = _bucket(M, HT, r)
    c = _count(HT, h)
    fresh = c > 0 and _fresh(M, HT, h, now)
    same = fresh and _row(HT, h) == r
    if fresh and not same:
        return
    if c == 0:
        M[M_HLIVE] += 1
    _set(HT, h, r, min(c, 254) + 1 if same else 1)
    HT[H_STAMP, h] = now
    M[M_HLAST] = now


@kernel
def hint_rows(M, HT, rows):  # pragma: no cover - compiled
    """``hint_add`` of ``rows``' distinct values in ascending order (module docstring), in
    one pass over ``rows`` as given (any order, repeats allowed), with no sort and no per-call
    set: per row one hash (kept in a ring for the row's turn, its bucket's two lines
    prefetched ``AHEAD`` rows ahead) and a read of its bucket.

    A bucket the batch has hinted (taken, or its row's count raised) carries ``mark`` as its
    stamp; its count tells which: 1 taken (a smaller row of the batch takes it over: sorted
    order would have hinted that one first), 2 or more raised (nothing else in the batch
    changes it). A bucket whose fresh hint of another row dropped the batch's row is left as
    it was, and a later row of the batch in it is handled as the first was: counted if it is
    the row that holds it, else dropped too, as sorted order decides. ``mark`` is ``now``
    when no hint was stamped at this tick yet (``M_HLAST < now``: no other bucket has that
    stamp), which a lookup between two hints makes the rule; two batches at one tick (the
    second sees the first's stamps) mark with ``_MARK`` (never a tick) and write ``now`` over
    it at the end. Written out with the counters in locals and no helper taking an array per
    row (``hint_use_rows`` says why). 1,024 rows on a ~100K-bucket table: 6.8 us with the
    per-call set (and 7.2 through helpers); this: docs/benchmarks.md."""
    n = rows.size
    if n == 0:
        return
    now = M[M_TICK]
    mark = now if M[M_HLAST] < now else _MARK
    fix = mark != now
    touched = np.empty(n if fix else 0, np.int64)  # the buckets stamped ``_MARK``
    k = 0
    ring = np.empty(AHEAD, np.int64)  # the buckets of rows[i .. i + AHEAD - 1], at i % AHEAD
    horizon = M[M_HORIZON]
    live = M[M_HLIVE]
    added = False
    nb = np.uint64(HT.shape[1])
    for i in range(min(AHEAD, n)):
        h = _bucket_of(rows[i], nb)
        ring[i] = h
        prefetch(HT, h)
        prefetch(HT, HT.shape[1] + h)
    for i in range(n):
        h = ring[i % AHEAD]
        if i + AHEAD < n:  # the bucket's key and stamp lines, AHEAD rows ahead
            ha = _bucket_of(rows[i + AHEAD], nb)
            ring[i % AHEAD] = ha
            prefetch(HT, ha)
            prefetch(HT, HT.shape[1] + ha)
        r = rows[i]
        key = HT[H_KEY, h]
        c = key & _CMASK
        stamp = HT[H_STAMP, h]
        if stamp == mark:  # hinted by this batch
            if c == 1 and r < key >> 8:  # taken: in ascending order r would have come first
                HT[H_KEY, h] = (np.int64(r) << 8) | np.int64(1)
            continue
        if c > 0 and now - stamp <= horizon:  # a fresh hint
            if key >> 8 != r:
                continue  # of another row: r's hint is dropped (the bucket stays as it was)
            HT[H_KEY, h] = (np.int64(r) << 8) | np.int64(min(c, 254) + 1)
        else:
            if c == 0:
                live += 1
            HT[H_KEY, h] = (np.int64(r) << 8) | np.int64(1)
        HT[H_STAMP, h] = mark
        added = True
        if fix:
            touched[k] = h
            k += 1
    for j in range(k):
        HT[H_STAMP, touched[j]] = now
    M[M_HLIVE] = live
    if added:
        M[M_HLAST] = now


@kernel
def hint_consume(M, HT, r):  # pragma: no cover - compiled
    """Row r is being looked up: one of its hints is used (a stale one is dropped)."""
    now = M[M_TICK]
    if _idle(M, HT, now):
        return
    hint_use(M, HT, r, now)


@kernel(inline=True)
def hints_stay_live(M, n):  # pragma: no cover - compiled
    """No hint expires as a whole table within the next ``n`` accesses: ``hint_consume``'s
    idle clear cannot fire in them (M_HLAST moves only with a hint, which no lookup adds)."""
    return M[M_TICK] + n - 1 - M[M_HLAST] <= M[M_HORIZON]


@kernel(inline=True)
def hint_use(M, HT, r, now):  # pragma: no cover - compiled
    """``hint_consume`` at tick ``now`` without its idle check."""
    h = _bucket(M, HT, r)
    c = _count(HT, h)
    if c > 0 and _row(HT, h) == r:
        new = c - 1 if _fresh(M, HT, h, now) else 0
        _set(HT, h, r, new)
        if new == 0:
            M[M_HLIVE] -= 1


@kernel
def hint_use_rows(M, HT, rows):  # pragma: no cover - compiled
    """``hint_consume`` of ``rows[i]`` at tick ``M[M_TICK] + i``, for a lookup of these rows
    that ``hints_stay_live`` covers and whose other work reads no hint state (the all-hit
    path: walk.all_hits_with). One call per lookup; the loop is written out with the
    counters in locals: per row a kernel call (``hint_consume``, ``_idle``) or inlined
    helpers taking the state arrays pay numba's reference counting (an inlined helper binds
    its array arguments anew, and numba pairs each binding with an atomic increment and
    decrement that it prunes only within one basic block), and 1,024 rows cost
    20 us one call each, 11.6 us through the inlined helpers, 3.3 us written out (4.3 with
    the prefetch, which pays where the table is larger than the CPU caches; measured,
    standalone variants). Helpers here take scalars only (``_bucket_of``). Bucket lines are prefetched ``AHEAD`` rows ahead. Ticks are the
    caller's to advance."""
    now = M[M_TICK]
    horizon = M[M_HORIZON]
    live = M[M_HLIVE]
    n = rows.size
    nb = np.uint64(HT.shape[1])
    ring = np.empty(AHEAD, np.int64)  # the buckets of rows[i .. i + AHEAD - 1], at i % AHEAD: one hash a row
    for i in range(min(AHEAD, n)):
        h = _bucket_of(rows[i], nb)
        ring[i] = h
        prefetch(HT, h)
        prefetch(HT, HT.shape[1] + h)
    for i in range(n):
        if live == 0:  # no lookup adds a hint: it stays 0 for the rest of this one
            break
        h = ring[i % AHEAD]
        if i + AHEAD < n:
            ha = _bucket_of(rows[i + AHEAD], nb)
            ring[i % AHEAD] = ha
            prefetch(HT, ha)
            prefetch(HT, HT.shape[1] + ha)
        r = rows[i]
        key = HT[H_KEY, h]
        c = key & _CMASK
        if c > 0 and key >> 8 == r:
            new = c - 1 if now + i - HT[H_STAMP, h] <= horizon else 0
            HT[H_KEY, h] = (np.int64(r) << 8) | np.int64(new)
            if new == 0:
                live -= 1
    M[M_HLIVE] = live


@kernel
def hint_outstanding(M, HT, r):  # pragma: no cover - compiled
    if M[M_HLIVE] == 0:
        return False
    h = _bucket(M, HT, r)
    return _count(HT, h) > 0 and _row(HT, h) == r and _fresh(M, HT, h, M[M_TICK])
