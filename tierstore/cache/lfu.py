"""Least frequently used since insertion, ties to the least recent: a min-heap of slots
keyed by (hits since insertion, time of the latest access). Counts live per slot, so a
row's count restarts when it is re-admitted (no per-table-row state). Hit for hit equal
to cachetools' LFUCache and libCacheSim's LFU (tests).

Leases: a lookup's own rows are its newest (count 1, latest stamps) and, once older
count-1 rows are gone, the heap's smallest keys: searching past them for every miss of a
1,024-id lookup cost O(batch^2) (0.1-0.4M accesses/s on 64-stream traces). A leased slot at
the top is instead *parked* (taken off the heap, structs.h_top_free) and put back when the
lookup ends; the victim is the same, the unleased slot with the smallest key.

Hits are lazy: a hit writes the slot's key (``K_AUX``: count << 40 | stamp) and leaves the
heap alone; the heap orders slots by the key they had when last placed in it (``K_KEY``),
never larger than their key now (counts and stamps only grow). A victim search takes the
unleased top; if its heap key is stale it goes down with its key now and the search
repeats, so the victim is exactly the slot with the smallest key (ties: the lower slot) as
before. A hit re-sifted the heap at once: O(log capacity) random reads per hit, 4.3x the
cost of a resident gather for a 1,024-id all-hit lookup at 104,857 slots (bench_lookup);
now a hit is O(1) and each stale key costs at most one sift, when it reaches the top."""

from __future__ import annotations

from ..jit import kernel
from .layout import K_AUX, K_KEY, M_TICK
from .policy import Policy
from .structs import h_push, h_remove, h_top_free, h_update, place, take_free, unmap
from .walk import all_hits_with


_STAMP_BITS = 40  # time fits in 40 bits (1.1e12 accesses); the count sits above it


@kernel(inline=True)
def hit(T, s):  # pragma: no cover - compiled
    M, K = T[0], T[5]
    K[K_AUX, s] = (((K[K_AUX, s] >> _STAMP_BITS) + 1) << _STAMP_BITS) | M[M_TICK]


@kernel
def all_hits(T, rows, slots):  # pragma: no cover - compiled
    """The decode path's all-hit accesses (walk.all_hits_with) with this module's ``hit``
    inlined."""
    return all_hits_with(hit, T, rows, slots)


@kernel(inline=True)
def _victim(M, K, L, ref):  # pragma: no cover - compiled
    """The unleased slot with the smallest key now, -1 if none: stale heap keys are brought
    up to date as they reach the top (a parked slot goes back with its heap key: stale is
    fine, it is corrected here)."""
    while True:
        s = h_top_free(M, K, L, ref)
        if s < 0 or K[K_KEY, s] == K[K_AUX, s]:
            return s
        h_update(M, K, s, K[K_AUX, s])


@kernel(inline=True)
def miss(T, r):  # pragma: no cover - compiled
    M, RM, ros, ref, K, L = T[0], T[1], T[2], T[3], T[5], T[6]
    s = take_free(M, L)
    if s < 0:
        s = _victim(M, K, L, ref)
        if s < 0:
            return -1
        h_remove(M, K, s)
        unmap(M, RM, ros, s)
    place(M, RM, ros, s, r)
    prefill(T, s, r, -1)
    return s


@kernel
def prefill(T, s, r, rank):  # pragma: no cover - compiled
    M, K = T[0], T[5]
    key = (1 << _STAMP_BITS) | M[M_TICK]
    K[K_AUX, s] = key
    h_push(M, K, s, key)


class LFU(Policy):
    """Least frequently used since insertion (ties: least recent)."""

    name = "lfu"
    k_rows = 4
