"""Least frequently used since insertion, ties to the least recent: a min-heap of slots
keyed by (hits since insertion, time of the latest access). Counts live per slot, so a
row's count restarts when it is re-admitted (no per-table-row state). Hit for hit equal
to cachetools' LFUCache and libCacheSim's LFU (tests).

Leases: a lookup's own rows are its newest (count 1, latest stamps) and, once older
count-1 rows are gone, the heap's smallest keys: searching past them for every miss of a
1,024-id lookup cost O(batch^2) (0.1-0.4M accesses/s on 64-stream traces). A leased slot at
the top is instead *parked* (taken off the heap, structs.h_top_free) and put back when the
lookup ends; the victim is the same, the unleased slot with the smallest key."""

from __future__ import annotations

from ..jit import kernel
from .layout import K_AUX, K_HPOS, K_KEY, M_TICK
from .policy import Policy
from .structs import h_push, h_remove, h_top_free, h_update, place, take_free, unmap


_STAMP_BITS = 40  # time fits in 40 bits (1.1e12 accesses); the count sits above it


@kernel(inline=True)
def hit(T, s):  # pragma: no cover - compiled
    M, K = T[0], T[5]
    K[K_AUX, s] += 1
    key = (K[K_AUX, s] << _STAMP_BITS) | M[M_TICK]
    if K[K_HPOS, s] >= 0:
        h_update(M, K, s, key)
    else:  # parked: back on the heap with this key when the lookup ends
        K[K_KEY, s] = key


@kernel(inline=True)
def miss(T, r):  # pragma: no cover - compiled
    M, RM, ros, ref, K, L = T[0], T[1], T[2], T[3], T[5], T[6]
    s = take_free(M, L)
    if s < 0:
        s = h_top_free(M, K, L, ref)
        if s < 0:
            return -1
        h_remove(M, K, s)
        unmap(M, RM, ros, s)
    place(M, RM, ros, s, r)
    prefill(T, s, r)
    return s


@kernel
def prefill(T, s, r):  # pragma: no cover - compiled
    M, K = T[0], T[5]
    K[K_AUX, s] = 1
    h_push(M, K, s, (1 << _STAMP_BITS) | M[M_TICK])


class LFU(Policy):
    """Least frequently used since insertion (ties: least recent)."""

    name = "lfu"
    k_rows = 4
