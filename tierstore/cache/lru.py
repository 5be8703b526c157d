"""Least recently used: one queue, a hit moves the slot to the back, the front goes first.
Exact LRU one access at a time (checked against OrderedDict, cachetools and libCacheSim)."""

from __future__ import annotations

from ..jit import kernel
from .policy import Policy
from .structs import place, q_first_free, q_push, q_to_back, q_unlink, take_free, unmap
from .walk import all_hits_with


Q = 0  # the one queue: front = least recent


@kernel(inline=True)
def hit(T, s):  # pragma: no cover - compiled
    M, L = T[0], T[6]
    q_to_back(M, L, Q, s)


@kernel
def all_hits(T, rows, slots):  # pragma: no cover - compiled
    """The decode path's all-hit accesses (walk.all_hits_with) with this module's ``hit``
    inlined."""
    return all_hits_with(hit, T, rows, slots)


@kernel(inline=True)
def miss(T, r):  # pragma: no cover - compiled
    M, RM, ros, ref, L = T[0], T[1], T[2], T[3], T[6]
    s = take_free(M, L)
    if s < 0:
        s = q_first_free(M, L, ref, Q)
        if s < 0:
            return -1
        q_unlink(M, L, s)
        unmap(M, RM, ros, s)
    place(M, RM, ros, s, r)
    q_push(M, L, Q, s)
    return s


@kernel
def prefill(T, s, r, rank):  # pragma: no cover - compiled
    q_push(T[0], T[6], Q, s)


class LRU(Policy):
    """Least recently used: every missed row is admitted, the least recent unleased row goes."""

    name = "lru"
