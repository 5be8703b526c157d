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
"""

from __future__ import annotations

import numpy as np

from ..jit import kernel
from .layout import M_HLAST, M_HLIVE, M_HORIZON, M_TICK
from .structs import mix64

_SEED = 11
H_KEY = 0  # row << 8 | count
H_STAMP = 1
_CMASK = 0xFF


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
def _bucket(M, HT, r):  # pragma: no cover - compiled
    # the hash's top 32 bits scaled to the table's own size: any size, and a state tuple
    # still holding the one-bucket table of before the first hint (CacheIndex.hint_table)
    # reads bucket 0, never past the end
    return np.int64(((mix64(r, _SEED) >> np.uint64(32)) * np.uint64(HT.shape[1])) >> np.uint64(32))


@kernel
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
def hint_consume(M, HT, r):  # pragma: no cover - compiled
    """Row r is being looked up: one of its hints is used (a stale one is dropped)."""
    now = M[M_TICK]
    if _idle(M, HT, now):
        return
    h = _bucket(M, HT, r)
    c = _count(HT, h)
    if c > 0 and _row(HT, h) == r:
        new = c - 1 if _fresh(M, HT, h, now) else 0
        _set(HT, h, r, new)
        if new == 0:
            M[M_HLIVE] -= 1


@kernel
def hint_outstanding(M, HT, r):  # pragma: no cover - compiled
    if M[M_HLIVE] == 0:
        return False
    h = _bucket(M, HT, r)
    return _count(HT, h) > 0 and _row(HT, h) == r and _fresh(M, HT, h, M[M_TICK])
