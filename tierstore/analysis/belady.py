"""Belady's MIN with bypass: the exact offline optimum hit count for a cache of C rows.

Rule: on a hit the row stays; on a miss the row is cached if there is room; when full, of
the cached rows *and the new one*, the one whose next use lies farthest ahead leaves (so
a row with no future use, or one needed later than everything cached, bypasses). No
online policy can hit more often; ``tierstore profile`` plots it on top.

Speed: next uses come from one stable argsort (vectorized), or from one backward pass
over dense ids (``OptTrace(dense=...)``: the profiler shares them with LRU); the replay is a compiled loop
over accesses with a binary max-heap of next-use times (``tierstore.jit.kernel``, ~30 ns per access). Stale
heap entries need no cleanup: a hit leaves its old entry behind with a key in the past,
below every live key, so it never reaches the top while the cache is full.
:class:`OptTrace` prepares a trace once (batch dedupe, next uses, first uses) for any number
of capacities: a V4.1-scale trace (20M lookups) took ~20 s of CPU per capacity with the
former heapq loop over Python lists (~1 GB of int objects), ~1 s now.

Memory: O(trace), ~40 bytes per lookup while preparing, 17 per lookup per replay; never
the table's rows.

Batches: given batch offsets, repeats of a row within one batch count as hits and are
removed first, matching :class:`~tierstore.cache.index.CacheIndex`'s semantics (one
fetch serves every occurrence in a batch).
"""

from __future__ import annotations

import numpy as np
from ..errors import IdTypeError, TierStoreError
from ..jit import kernel

__all__ = ["next_use", "belady_hits", "dedupe_batches", "OptTrace"]

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
    Compiled, batch by batch (a lexsort of the whole trace by batch and row took ~5 s at 20M).
    An int32 trace (dense ids) stays int32; any other is int64.
    """
    trace = np.asarray(trace)
    if trace.dtype != np.int32:
        trace = trace.astype(np.int64, copy=False)
    if offsets is None or trace.size == 0:
        return trace, 0
    starts = np.asarray(offsets, dtype=np.int64)
    starts = starts[(starts > 0) & (starts < trace.size)]
    keep = _first_in_batch(trace, np.r_[0, starts, trace.size].astype(np.int64))
    out = trace[keep]
    return out, trace.size - out.size


@kernel
def _next_use_dense(ids: np.ndarray, n_distinct: int) -> np.ndarray:  # pragma: no cover - compiled
    """``next_use`` of a trace of dense ids (0..n_distinct-1): one backward pass."""
    never = np.iinfo(np.int64).max
    last = np.full(n_distinct, never, np.int64)
    out = np.empty(ids.size, np.int64)
    for i in range(ids.size - 1, -1, -1):
        r = ids[i]
        out[i] = last[r]
        last[r] = i
    return out


@kernel
def _first_in_batch(trace: np.ndarray, bounds: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """keep[i]: access i is the first of its row in its batch ``[bounds[k], bounds[k+1])``."""
    keep = np.ones(trace.size, np.bool_)
    for k in range(bounds.size - 1):
        a, b = bounds[k], bounds[k + 1]
        if b - a <= 32:  # a serving step of one token (24 ids): pairwise is cheapest
            for i in range(a + 1, b):
                for j in range(a, i):
                    if trace[j] == trace[i]:
                        keep[i] = False
                        break
        else:
            order = np.argsort(trace[a:b], kind="mergesort")  # stable: the first use leads
            for q in range(1, order.size):
                if trace[a + order[q]] == trace[a + order[q - 1]]:
                    keep[a + order[q]] = False
    return keep


def belady_hits(trace: np.ndarray, capacity: int, *, offsets: np.ndarray | None = None,
                warm: bool = False) -> int:
    """Hits of the optimal cache with bypass over ``trace`` (int row ids in access order).

    ``warm``: the cache may start full with any rows (as a store that preloads its hot set
    from a profile does); the best start holds the first ``capacity`` distinct rows of the
    trace (those used soonest). Without it the cache starts empty (demand caching only).
    Several capacities of one trace: :class:`OptTrace` prepares it once.
    """
    if not isinstance(capacity, (int, np.integer)) or capacity < 0:
        raise TierStoreError(f"capacity={capacity!r} must be a non-negative integer")
    return OptTrace(trace, offsets=offsets).hits(int(capacity), warm=warm)


class OptTrace:
    """A trace prepared for Belady's MIN at any capacity: repeats inside a batch removed,
    each access's next use, and the first use of each row (in access order).

    ``dense``: the trace's ids renumbered 0..D-1 (``stack_distance.dense_ids``, which
    ``tierstore profile`` computes once for LRU and the optimum): the next uses then come
    from one backward pass over the trace instead of a stable argsort, with the same result
    (only which accesses repeat a row matters)."""

    def __init__(self, trace: np.ndarray, *, offsets: np.ndarray | None = None,
                 dense: tuple[np.ndarray, int] | None = None):
        trace = np.asarray(trace)
        if trace.dtype.kind not in "iu":
            raise IdTypeError(f"trace has dtype {trace.dtype}; pass integer row ids")
        if dense is not None:
            ids, n_distinct = dense
            if ids.shape != (trace.size,):
                raise TierStoreError(f"dense ids of {ids.size} accesses for a trace of {trace.size}")
            trace, self.repeats = dedupe_batches(ids, offsets)
            self.n = int(trace.size)
            self.nxt = _next_use_dense(trace, int(n_distinct))
        else:
            trace, self.repeats = dedupe_batches(trace.astype(np.int64, copy=False).reshape(-1), offsets)
            self.n = int(trace.size)
            self.nxt = next_use(trace)
        del trace
        has_prev = np.zeros(self.n, dtype=bool)
        has_prev[self.nxt[self.nxt != _NEVER]] = True
        self.firsts = np.flatnonzero(~has_prev)  # first use of each row, in access order

    def hits(self, capacity: int, *, warm: bool = False) -> int:
        """Hits at ``capacity`` rows (``warm``: see :func:`belady_hits`)."""
        if capacity < 0:
            raise TierStoreError(f"capacity={capacity!r} must be a non-negative integer")
        if capacity == 0 or self.n == 0:
            return self.repeats
        start = self.firsts[:capacity] if warm else self.firsts[:0]
        return self.repeats + int(_replay(self.nxt, start, int(capacity)))


@kernel
def _replay(nxt: np.ndarray, start: np.ndarray, cap: int) -> int:  # pragma: no cover - compiled
    """MIN with bypass over accesses 0..n-1 whose next uses are ``nxt``; the cache starts
    holding the rows first used at positions ``start`` (a warm start), as if loaded just
    before access 0. ``heap``: a max-heap of the next uses of cached rows, plus stale
    entries (module docstring); at most one push per access."""
    never = np.iinfo(np.int64).max
    n = nxt.size
    cached = np.zeros(n, np.uint8)  # cached[t]: the row to be accessed at t is in the cache now
    heap = np.empty(n + start.size + 1, np.int64)
    hs = 0
    size = 0
    hits = 0
    for j in range(start.size):
        t = start[j]
        cached[t] = 1
        size += 1
        hs = _push(heap, hs, t)
    for i in range(n):
        t = nxt[i]
        if cached[i]:
            hits += 1
            if t == never:
                size -= 1  # never used again: free its place at once
            else:
                cached[t] = 1
                hs = _push(heap, hs, t)
        elif t == never:
            continue  # bypass: no future use
        elif size < cap:
            size += 1
            cached[t] = 1
            hs = _push(heap, hs, t)
        else:
            far = heap[0]
            if far > t:  # evict the farthest cached row, keep the new one
                cached[far] = 0
                cached[t] = 1
                _replace_top(heap, hs, t)
            # else: the new row is the farthest: it bypasses
    return hits


@kernel(inline=True)
def _push(heap: np.ndarray, hs: int, v: int) -> int:  # pragma: no cover - compiled
    i = hs
    heap[i] = v
    while i > 0:
        p = (i - 1) >> 1
        if heap[p] >= heap[i]:
            break
        heap[p], heap[i] = heap[i], heap[p]
        i = p
    return hs + 1


@kernel(inline=True)
def _replace_top(heap: np.ndarray, hs: int, v: int) -> None:  # pragma: no cover - compiled
    heap[0] = v
    i = 0
    while True:
        c = 2 * i + 1
        if c >= hs:
            break
        if c + 1 < hs and heap[c + 1] > heap[c]:
            c += 1
        if heap[i] >= heap[c]:
            break
        heap[i], heap[c] = heap[c], heap[i]
        i = c
