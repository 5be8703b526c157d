"""S3-FIFO (Yang et al., SOSP'23): a small FIFO (10% of the slots) filters one-hit wonders,
a main FIFO with 2-bit reinsertion counters holds the rest, and a ghost queue of rows
evicted from the small FIFO (exact, as large as main) sends returning rows straight to
main. Within 0.005 of libCacheSim's S3FIFO with the same parameters (tests)."""

from __future__ import annotations

from ..jit import kernel
from .layout import L_FREQ, M_PARAM, M_QLEN, M_SCAN, NL
from .policy import Policy
from .structs import g_add, g_of, g_remove, place, q_first_free, q_push, q_to_back, q_unlink, take_free, unmap
from .walk import all_hits_with


SMALL = 0
MAIN = 1
P_SMALL = M_PARAM + 0  # target length of the small FIFO
P_MOVE = M_PARAM + 1  # hits in small that promote a row to main
P_GHOST = M_PARAM + 2  # rows the ghost remembers


@kernel(inline=True)
def hit(T, s):  # pragma: no cover - compiled
    L = T[6]
    if L[L_FREQ, s] < 3:
        L[L_FREQ, s] += 1


@kernel
def all_hits(T, rows, slots):  # pragma: no cover - compiled
    """The decode path's all-hit accesses (walk.all_hits_with) with this module's ``hit``
    inlined."""
    return all_hits_with(hit, T, rows, slots)


@kernel
def candidate(M, L, ref, small_target, small, main):  # pragma: no cover - compiled
    """The next S3-FIFO eviction candidate: the oldest unleased slot of the small FIFO when it
    is over ``small_target`` (or main is empty), else of main, else of the other queue when
    that one is all leased. Returns (slot or -1, whether it came from the small FIFO)."""
    from_small = M[M_QLEN + small] > small_target or M[M_QLEN + main] == 0
    s = q_first_free(M, L, ref, small if from_small else main)
    if s < 0:
        from_small = not from_small
        s = q_first_free(M, L, ref, small if from_small else main)
    return s, from_small


@kernel
def evict(T):  # pragma: no cover - compiled
    """Free one unleased slot the S3-FIFO way; -1 if every candidate is leased."""
    M, RM, ros, ref, L, GH = T[0], T[1], T[2], T[3], T[6], T[7]
    budget = 4 * (M[M_QLEN + SMALL] + M[M_QLEN + MAIN]) + 8
    while budget > 0:
        budget -= 1
        s, from_small = candidate(M, L, ref, M[P_SMALL], SMALL, MAIN)
        if s < 0:
            return -1
        if from_small:
            if L[L_FREQ, s] >= M[P_MOVE]:
                L[L_FREQ, s] = 0
                q_to_back(M, L, MAIN, s)
                M[M_SCAN] += 1  # a candidate re-queued
                continue
            q_unlink(M, L, s)
            r = unmap(M, RM, ros, s)
            if r >= 0:
                g_add(M, GH, RM, 0, r, M[P_GHOST])
            return s
        if L[L_FREQ, s] > 0:
            L[L_FREQ, s] -= 1
            q_to_back(M, L, MAIN, s)
            M[M_SCAN] += 1  # a candidate re-queued
            continue
        q_unlink(M, L, s)
        unmap(M, RM, ros, s)
        return s
    return -1


@kernel(inline=True)
def miss(T, r):  # pragma: no cover - compiled
    M, RM, ros, L, GH = T[0], T[1], T[2], T[6], T[7]
    s = take_free(M, L)
    if s < 0:
        s = evict(T)
        if s < 0:
            return -1
    g = g_of(RM, r)  # after the eviction, which may have pushed r out of the ghost
    if g >= 0:
        g_remove(M, GH, RM, g)
    place(M, RM, ros, s, r)
    L[L_FREQ, s] = 0
    q_push(M, L, MAIN if g >= 0 else SMALL, s)
    return s


@kernel
def prefill(T, s, r, rank):  # pragma: no cover - compiled
    L = T[6]
    L[L_FREQ, s] = 0
    q_push(T[0], L, SMALL, s)


class S3FIFO(Policy):
    """S3-FIFO with a small FIFO of ``small_fraction`` of the slots."""

    name = "s3fifo"
    l_rows = NL  # L_FREQ: 2-bit reinsertion counters

    defaults = {"small_fraction": 0.1, "move_threshold": 1}

    def _small(self, n_dyn: int) -> int:
        return max(1, int(self.params["small_fraction"] * n_dyn))

    def ghost_size(self, n_dyn: int) -> int:
        return max(1, n_dyn - self._small(n_dyn))

    def configure(self, M, n_dyn: int) -> None:
        M[P_SMALL] = self._small(n_dyn)
        M[P_MOVE] = int(self.params["move_threshold"])
        M[P_GHOST] = self.ghost_size(n_dyn)
