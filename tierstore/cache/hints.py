"""The known future: rows an announced lookup will read, not yet read (``Store.hint``).

A direct-mapped table (O(capacity) memory, ``HT``, allocated on the first hint: one empty
bucket until then, see ``CacheIndex.hint_table``): per bucket a row, a count (+1 per hint,
-1 when the row is looked up) and the time (tick) of its latest hint. A hint not used
within ``M_HORIZON`` accesses expires, so a serving loop that announced a request it then
dropped does not protect those rows forever; once every hint is older than that, the table
is cleared in one pass and lookups skip hint work entirely (``M_HLIVE == 0``). A collision
with an outstanding hint of another row drops the new hint: a lost hint, never a false one.
"""

from __future__ import annotations

from ..jit import kernel
from .layout import M_HLAST, M_HLIVE, M_HORIZON, M_HSHIFT, M_TICK
from .structs import bucket

_SEED = 11
H_ROW = 0
H_COUNT = 1
H_STAMP = 2


@kernel(inline=True)
def _bucket(M, HT, r):  # pragma: no cover - compiled
    # masked by the table's own size: a state tuple still holding the one-bucket table of
    # before the first hint (CacheIndex.hint_table) reads bucket 0, never past the end
    return bucket(r, _SEED, M[M_HSHIFT]) & (HT.shape[1] - 1)


@kernel
def _fresh(M, HT, h, now):  # pragma: no cover - compiled
    return now - HT[H_STAMP, h] <= M[M_HORIZON]


@kernel
def _idle(M, HT, now):  # pragma: no cover - compiled
    if M[M_HLIVE] > 0 and now - M[M_HLAST] > M[M_HORIZON]:
        HT[H_COUNT, :] = 0
        M[M_HLIVE] = 0
    return M[M_HLIVE] == 0


@kernel
def hint_add(M, HT, r):  # pragma: no cover - compiled
    now = M[M_TICK]
    h = _bucket(M, HT, r)
    c = HT[H_COUNT, h]
    fresh = c > 0 and _fresh(M, HT, h, now)
    same = fresh and HT[H_ROW, h] == r
    if fresh and not same:
        return
    if c == 0:
        M[M_HLIVE] += 1
    HT[H_COUNT, h] = min(c, 254) + 1 if same else 1
    HT[H_ROW, h] = r
    HT[H_STAMP, h] = now
    M[M_HLAST] = now


@kernel
def hint_consume(M, HT, r):  # pragma: no cover - compiled
    """Row r is being looked up: one of its hints is used (a stale one is dropped)."""
    now = M[M_TICK]
    if _idle(M, HT, now):
        return
    h = _bucket(M, HT, r)
    c = HT[H_COUNT, h]
    if c > 0 and HT[H_ROW, h] == r:
        new = c - 1 if _fresh(M, HT, h, now) else 0
        HT[H_COUNT, h] = new
        if new == 0:
            M[M_HLIVE] -= 1


@kernel
def hint_outstanding(M, HT, r):  # pragma: no cover - compiled
    if M[M_HLIVE] == 0:
        return False
    h = _bucket(M, HT, r)
    return HT[H_COUNT, h] > 0 and HT[H_ROW, h] == r and _fresh(M, HT, h, M[M_TICK])
