"""Belady's MIN with bypass: the exact offline optimum hit count for a cache of C rows.

Rule: on a hit the row stays; on a miss the row is cached if there is room; when full, of
the cached rows *and the new one*, the one whose next use lies farthest ahead leaves (so
a row with no future use, or one needed later than everything cached, bypasses). No
online policy can hit more often; ``tierstore profile`` plots it on top.

Speed: next uses come from one stable argsort (vectorized); the replay is a loop over
accesses with a binary heap of next-use times (heapq on plain ints, ~0.3 us per access),
and rows seen only once are dropped before the loop. Stale heap entries need no cleanup:
a hit leaves its old entry behind with a key in the past, below every live key, so it
never reaches the top while the cache is full. 10M lookups take seconds, not minutes.

Batches: given batch offsets, repeats of a row within one batch count as hits and are
removed first, matching :class:`~tierstore.cache.index.CacheIndex`'s semantics (one
fetch serves every occurrence in a batch).
"""

from __future__ import annotations

import heapq

import numpy as np

from ..errors import IdTypeError, TierStoreError

__all__ = ["next_use", "belady_hits", "dedupe_batches"]

_NEVER = np.iinfo(np.int64).max


def next_use(trace: np.ndarray) -> np.ndarray:
    """For each access i, the index of the next access to the same row, or int64 max."""
    trace = np.asarray(trace)
    n = trace.size
    out = np.full(n, _NEVER, dtype=np.int64)
    if n < 2:
        return out
    order = np.argsort(trace, kind="stable")  # equal rows stay in access order
    s = trace[order]
    same = s[1:] == s[:-1]
    out[order[:-1][same]] = order[1:][same]
    return out


def dedupe_batches(trace: np.ndarray, offsets: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Drop repeats of a row inside each batch; returns (first occurrences in order, repeats).

    ``offsets``: batch start positions (ascending, first 0), or None for batches of one.
    """
    trace = np.asarray(trace, dtype=np.int64)
    if offsets is None or trace.size == 0:
        return trace, 0
    batch = np.zeros(trace.size, dtype=np.int64)
    starts = np.asarray(offsets, dtype=np.int64)
    starts = starts[(starts > 0) & (starts < trace.size)]
    batch[starts] = 1
    batch = np.cumsum(batch)
    order = np.lexsort((np.arange(trace.size), trace, batch))  # by batch, row, position
    b, r = batch[order], trace[order]
    first = np.ones(trace.size, dtype=bool)
    first[1:] = (b[1:] != b[:-1]) | (r[1:] != r[:-1])
    keep = np.sort(order[first])
    return trace[keep], trace.size - keep.size


def belady_hits(trace: np.ndarray, capacity: int, *, offsets: np.ndarray | None = None,
                warm: bool = False) -> int:
    """Hits of the optimal cache with bypass over ``trace`` (int row ids in access order).

    ``warm``: the cache may start full with any rows (as a store that preloads its hot set
    from a profile does); the best start holds the first ``capacity`` distinct rows of the
    trace (those used soonest). Without it the cache starts empty (demand caching only).
    """
    trace = np.asarray(trace)
    if trace.dtype.kind not in "iu":
        raise IdTypeError(f"trace has dtype {trace.dtype}; pass integer row ids")
    if not isinstance(capacity, (int, np.integer)) or capacity < 0:
        raise TierStoreError(f"capacity={capacity!r} must be a non-negative integer")
    trace, repeats = dedupe_batches(trace.astype(np.int64, copy=False).reshape(-1), offsets)
    if capacity == 0 or trace.size == 0:
        return repeats
    if warm:
        _, first = np.unique(trace, return_index=True)
        start = trace[np.sort(first)[:capacity]]
        trace = np.concatenate([start, trace])  # a prefix of distinct rows: loads, no hits
    nxt = next_use(trace)
    has_prev = np.zeros(trace.size, dtype=bool)
    has_prev[nxt[nxt != _NEVER]] = True
    # Rows used once can neither hit nor be worth caching: skip them (most of a Zipf tail).
    live = np.flatnonzero(has_prev | (nxt != _NEVER))
    return repeats + _replay(live.tolist(), nxt[live].tolist(), int(capacity), trace.size)


def _replay(pos: list[int], nxt: list[int], cap: int, n: int) -> int:
    never = int(_NEVER)
    cached = bytearray(n)  # cached[t]: the row to be accessed at t is in the cache now
    heap: list[int] = []  # -next_use of cached rows (plus stale entries, see module doc)
    push, replace = heapq.heappush, heapq.heapreplace
    size = hits = 0
    for i, t in zip(pos, nxt):
        if cached[i]:
            hits += 1
            if t == never:
                size -= 1  # never used again: free its place at once
            else:
                cached[t] = 1
                push(heap, -t)
        elif t == never:
            continue  # bypass: no future use
        elif size < cap:
            size += 1
            cached[t] = 1
            push(heap, -t)
        else:
            far = -heap[0]
            if far > t:  # evict the farthest cached row, keep the new one
                cached[far] = 0
                replace(heap, -t)
                cached[t] = 1
            # else: the new row is the farthest: it bypasses
    return hits
