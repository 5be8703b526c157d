"""ARC, the adaptive replacement cache (Megiddo & Modha, FAST'03).

Two slot queues, T1 (rows seen once recently) and T2 (rows seen at least twice), and two
exact ghost queues, B1 and B2, remembering the rows recently evicted from T1 and T2
(the row map holds ``-2 - g`` for row r, structs.g_*). A target ``p`` for T1's length adapts: a miss that
finds its row in B1 raises it (by max(1, |B2|/|B1|)), one in B2 lowers it (by
max(1, |B1|/|B2|)). REPLACE evicts T1's LRU row into B1 when |T1| > p (or |T1| == p and
the row came from B2), else T2's LRU row into B2 (T1's when T2 is empty). Case IV of the
paper keeps |T1| + |B1| <= c and the four lists <= 2c, c being the dynamic slots.

``p`` is a real number, as in the paper (and libCacheSim): its float64 bits are kept in
the int64 M param ``P_P``. Before the tier is full nothing is evicted and no ghost exists.

Leases: REPLACE takes the least recent *unleased* slot of the queue it chooses, else of
the other queue; when every slot is leased the miss bypasses the tier (-1) and changes
nothing (not p, not the ghosts). Slots left as holes by an aborted fill are evicted
without a ghost. With one id per lookup (no leases) this is the paper's ARC, hit for hit
equal to libCacheSim's ARC on the tests' traces (tests/tierstore/cache/test_wtinylfu_arc.py).
"""

from __future__ import annotations

import numpy as np

from ..jit import kernel
from .layout import L_QID, M_GQLEN, M_PARAM, M_QLEN
from .policy import Policy
from .structs import (g_add, g_front, g_of, g_queue, g_remove, place, q_first_free, q_push, q_to_back, q_unlink,
                      take_free, unmap)
from .walk import all_hits_with


T1 = 0  # slot queues: front = least recent
T2 = 1
B1 = 0  # ghost queues (rows evicted from T1 / T2), front = oldest
B2 = 1
P_C = M_PARAM + 0  # c: the dynamic slots (and each ghost queue's bound)
P_P = M_PARAM + 1  # the adaptive target for |T1|, float64 bits


@kernel
def get_p(M):  # pragma: no cover - compiled
    return M[P_P:P_P + 1].view(np.float64)[0]


@kernel
def set_p(M, p):  # pragma: no cover - compiled
    M[P_P:P_P + 1].view(np.float64)[0] = p


@kernel(inline=True)
def hit(T, s):  # pragma: no cover - compiled
    q_to_back(T[0], T[6], T2, s)


@kernel
def all_hits(T, rows, slots):  # pragma: no cover - compiled
    """The decode path's all-hit accesses (walk.all_hits_with) with this module's ``hit``
    inlined."""
    return all_hits_with(hit, T, rows, slots)


@kernel
def replace_victim(T, p, from_b2):  # pragma: no cover - compiled
    """REPLACE's choice (not yet evicted): the least recent unleased slot of T1 or T2;
    -1 if every slot is leased."""
    M, ref, L = T[0], T[3], T[6]
    t1 = M[M_QLEN + T1]
    if (t1 > 0 and (t1 > p or (t1 == p and from_b2))) or M[M_QLEN + T2] == 0:
        first, other = T1, T2
    else:
        first, other = T2, T1
    s = q_first_free(M, L, ref, first)
    if s < 0:
        s = q_first_free(M, L, ref, other)
    return s


@kernel
def evict(T, s, ghost):  # pragma: no cover - compiled
    """Evict slot s; remember its row in B1/B2 (by s's queue) when ``ghost``."""
    M, RM, ros, L, GH = T[0], T[1], T[2], T[6], T[7]
    q = L[L_QID, s]
    q_unlink(M, L, s)
    r = unmap(M, RM, ros, s)
    if ghost and r >= 0:
        g_add(M, GH, RM, B1 if q == T1 else B2, r, M[P_C])


@kernel(inline=True)
def miss(T, r):  # pragma: no cover - compiled
    M, RM, ros, L, GH = T[0], T[1], T[2], T[6], T[7]
    c = M[P_C]
    g = g_of(RM, r)
    s = take_free(M, L)
    if s >= 0:  # not full yet: nothing to evict (and no ghost can exist)
        if g >= 0:
            g_remove(M, GH, RM, g)
        place(M, RM, ros, s, r)
        q_push(M, L, T2 if g >= 0 else T1, s)
        return s
    p = get_p(M)
    b1 = M[M_GQLEN + B1]
    b2 = M[M_GQLEN + B2]
    if g >= 0:  # cases II and III: a ghost hit adapts p, then REPLACE, then r joins T2
        in_b2 = g_queue(GH, g) == B2
        if in_b2:
            p = max(p - max(b1 / b2, 1.0), 0.0)
        else:
            p = min(p + max(b2 / b1, 1.0), float(c))
        s = replace_victim(T, p, in_b2)
        if s < 0:
            return -1
        set_p(M, p)
        g_remove(M, GH, RM, g)
        evict(T, s, True)
        place(M, RM, ros, s, r)
        q_push(M, L, T2, s)
        return s
    # case IV: r is in no list
    if M[M_QLEN + T1] + b1 >= c:  # (A) L1 = T1 + B1 holds c rows
        if b1 > 0:
            s = replace_victim(T, p, False)
            if s < 0:
                return -1
            g_remove(M, GH, RM, g_front(M, GH, B1))
            evict(T, s, True)
        else:  # T1 holds the whole cache: its LRU goes, unremembered
            s = q_first_free(M, L, T[3], T1)
            if s < 0:
                s = q_first_free(M, L, T[3], T2)
                if s < 0:
                    return -1
            evict(T, s, False)
    else:  # (B)
        s = replace_victim(T, p, False)
        if s < 0:
            return -1
        if M[M_QLEN + T1] + M[M_QLEN + T2] + b1 + b2 >= 2 * c and b2 > 0:
            g_remove(M, GH, RM, g_front(M, GH, B2))
        evict(T, s, True)
    place(M, RM, ros, s, r)
    q_push(M, L, T1, s)
    return s


@kernel
def prefill(T, s, r, rank):  # pragma: no cover - compiled
    q_push(T[0], T[6], T1, s)


class ARC(Policy):
    """Adaptive replacement cache: recency (T1) and frequency (T2) lists, ghosts of both,
    and a self-tuning split between them."""

    name = "arc"

    def ghost_size(self, n_dyn: int) -> int:
        return max(1, n_dyn)

    def configure(self, M, n_dyn: int) -> None:
        M[P_C] = n_dyn
        M[P_P:P_P + 1].view(np.float64)[0] = 0.0
