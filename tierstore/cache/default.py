"""The store's policy: a pinned core, an adaptive profile-ranked core and S3-FIFO with hints.

The per-access port of an earlier batch-vectorised policy of the same design. Three parts
share the tier:

- **Pinned core** (``pin_fraction`` of the slots): the profile's hottest rows, in slots
  [0, LO), never evicted; the walk never shows them to the policy (``prepare``). With
  ``pin_fraction`` 0 the whole profile is the ranked core, which shrinks from its cold end
  when its rows earn less than the dynamic part's (docs/v41_sizing.md, "Where default
  trails a classic policy": better with a profile of other text, worse on German/French).
- **Ranked core**: the next hottest rows (ranks ``rank_lo`` on, ``rank_lo`` = LO when there
  is a profile), prefilled into every free slot at construction, re-admitted on a miss
  when *core-worthy* (rank < ``rank_lo + int(target)``), evicted coldest rank first: the
  indexed min-heap ``K[K_HEAP]`` with key = -rank (``K[K_KEY, s]``, so a hit reads its
  slot's rank without a search; a miss finds the rank in the rank map ``RK``, a hash table). A
  lookup's leased core rows are parked off the heap until it ends (structs.h_top_free).
- **Dynamic part**: S3-FIFO over the other slots: a small FIFO (a target share of the
  dynamic rows held now, starting at ``small_fraction``) filters one-hit wonders, a main
  FIFO with 2-bit reinsertion counters, and an exact ghost of the rows the dynamic part
  dropped (both queues, and rows refused for want of room), ``n_dyn`` long, that sends a
  returning row straight to main. Each ghost entry keeps its origin (small or refused /
  main) in its queue id (``G_QID`` = ghost queue + 2 x origin).
- **Adaptive small FIFO** (``adapt_small``, off by default, ARC's rule for its p): a miss the ghost
  remembers, admitted to the dynamic part, moves the small FIFO's share (``P_SMALLQ``,
  ``SQ_BITS`` fixed point of the dynamic rows) by one dynamic slot's share times max(1,
  main-dropped / small-dropped ghost entries) up when the row was dropped from small
  (or refused), and by max(1, small-dropped / main-dropped) down when it was dropped from
  main, within [1%, 90%]. Under interleaved streams a row returns after it left a fixed
  small FIFO: the share grows; where main's rows return, it shrinks.

Admission, one miss of row r at a time:

- core-worthy r takes a free slot, else (core at or over target) the coldest unleased core
  row's slot if that row ranks after r, else (core under target) a dynamic victim, else
  the coldest core row ranked after r; none: r bypasses;
- any other r: if the core's target takes every dynamic slot, r bypasses (and is
  remembered by the ghost); else a free slot, else the coldest core row while the core is
  over target, else a dynamic victim; none: bypass. r joins main if the ghost remembers
  it or it has an outstanding hint (another announced use after this one), else small.

Hints (``uses_hints``): a dynamic row with an outstanding hint is not evicted while others
can go: small moves it to main, main re-queues it; once every unleased row of main has
been re-queued for a hint alone (``main`` consecutive times), the next one goes anyway.

Adaptive target (the per-access form of ``DefaultPolicy._adapt``): every access adds to
the current *window*'s tallies, and at the end of each window of ``WINDOW`` accesses
(``M_TICK // WINDOW`` changes; pinned hits count as accesses of their window) the batch
rule of ``_adapt`` moves ``target`` over the window, so the outcome depends only on the
access sequence, never on how lookups batch it. Over a margin of w = max(16, int(margin *
n_dyn)) slots and edge = rank_lo + target:

- ``gain``: misses on ranked rows with edge <= rank < edge + w (a bigger core would hit);
- ``loss``: hits on core rows with rank >= edge - w (a smaller core would miss);
- ``ghost``: misses on rows with rank >= edge that the ghost dropped within its last w
  entries (the ghost's newest w entries are its queue GQ_RECENT, the rest GQ_OLD);
- density mode: ``ema`` = 0.9 ema + 0.1 misses (per window), ``trust`` = min(1, n_dyn /
  (4 ema + 1)), ``dyn = max(ghost, trust * dyn_hits * w / (dyn rows + w))``; delta =
  gain - dyn if gain > dyn, else loss - dyn if loss < dyn, else 0;
- ghost mode: delta = gain - ghost;
- target = clip(target + adapt_step * delta, 0, n_dyn).

Windows without any policy call (only pinned hits) only decay ``ema``.

Fixed point (M is int64): target, ema, trust, dyn, adapt_step and small_fraction carry
``FP_BITS`` fractional bits; products are floored (``//`` on non-negative values).
The one deliberate change from the batch rule: unranked rows never count as ``gain`` (the
batch code gave them rank m, so with the edge within w of m every unranked miss looked
like one a bigger core would have hit).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import PolicyParamError
from . import s3fifo
from .hints import hint_outstanding
from ..jit import kernel
from .layout import (G_QID, G_ROW, K_HEAP, K_HPOS, K_KEY, L_FREQ, L_QID, M_CAP, M_GCAP, M_GFREE, M_GQLEN,
                     M_HEAPN, M_HLIVE, M_HORIZON, M_LO, M_NFREE, M_PARAM, M_QLEN, M_RANKM, M_SCAN, M_TICK, NL, Q_HPARK)
from ..ranking import TopProfile, hot_rows
from .policy import Policy
from .rankmap import rk_get, sort_ranking
from .rowmap import rm_get
from .structs import (g_add, g_front, g_next_free, g_of, g_queue, g_remove, h_push, h_remove, h_top_free, place,
                      q_push, q_to_back, q_unlink, take_free, unmap)
from .walk import all_hits_with


SMALL = 0  # slot queues of the dynamic part
MAIN = 1
GQ_RECENT = 0  # ghost queues: the newest w entries, then the older ones
GQ_OLD = 1

FP_BITS = 16
FP = 1 << FP_BITS
WINDOW = 64  # accesses per adaptation step

# M[M_PARAM + i]
P_NDYN = M_PARAM + 0  # dynamic (unpinned) slots
P_RANKLO = M_PARAM + 1  # first rank of the ranked core (ranks below are pinned)
P_ADAPT = M_PARAM + 2  # 1: adapt the target (there are ranked rows past rank_lo)
P_MODE = M_PARAM + 3  # 0 density, 1 ghost
P_W = M_PARAM + 4  # margin w, in slots
P_STEP = M_PARAM + 5  # adapt_step, fixed point
P_SMALLF = M_PARAM + 6  # small_fraction, fixed point
P_TARGET = M_PARAM + 7  # the ranked core's target size, fixed point
P_EMA = M_PARAM + 8  # misses per window, moving average, fixed point
P_WIN = M_PARAM + 9  # the window the tallies belong to
P_GAIN = M_PARAM + 10  # tallies of the current window
P_LOSS = M_PARAM + 11
P_GHOSTH = M_PARAM + 12
P_DYNH = M_PARAM + 13
P_WMISS = M_PARAM + 14
P_GREC = M_PARAM + 15  # length of GQ_RECENT (min(w, ghost size))
P_GOLD = M_PARAM + 16  # length of GQ_OLD (ghost size - P_GREC)
P_SMALLQ = M_PARAM + 17  # the small FIFO's target share of the dynamic rows, SQ_BITS fixed point
P_SADAPT = M_PARAM + 18  # 1: the small FIFO's share adapts to ghost hits (adapt_small)

SQ_BITS = 32  # the small FIFO's share: fine enough for one slot's step at 2**31 slots
SQ_MIN = (1 << SQ_BITS) // 100  # its bounds: 1% .. 90% of the dynamic rows
SQ_MAX = 9 * (1 << SQ_BITS) // 10
# a ghost entry's origin, kept in its queue id: G_QID = ghost queue + 2 * origin
GO_SMALL = 0  # dropped from the small FIFO (or refused: never admitted)
GO_MAIN = 1  # dropped from main


# ---------------------------------------------------------------------------------------------
# ranks, ghost, adaptation
# ---------------------------------------------------------------------------------------------


@kernel
def rank_of(M, RK, r):  # pragma: no cover - compiled
    """Hotness rank of row r (0 = hottest), M[M_RANKM] when r is not ranked (RK: the rank
    map, tierstore.cache.rankmap: one probe run, not a binary search)."""
    return rk_get(RK, r, M[M_RANKM])


@kernel
def ghost_forget(M, GH, RM, r):  # pragma: no cover - compiled
    g = g_of(RM, r)
    if g >= 0:
        g_remove(M, GH, RM, g)


@kernel
def g_len(M, q):  # pragma: no cover - compiled
    """Entries of ghost queue q, both origins."""
    return M[M_GQLEN + q] + M[M_GQLEN + q + 2]


@kernel
def g_push(M, GH, RM, q, r, origin, limit):  # pragma: no cover - compiled
    """structs.g_add with the entry's origin in its queue id (the entry is linked in queue
    q; ``g_remove`` counts it off ``M_GQLEN + q + 2 * origin``)."""
    if M[M_GCAP] == 0 or limit <= 0:
        return
    while g_len(M, q) >= limit:
        g_remove(M, GH, RM, g_front(M, GH, q))
    # the entry g_add takes (the free list's first), if there is one (r has none: callers
    # forget it first): known here, so no probe of the row map for it afterwards
    g = g_next_free(M, GH) if M[M_GFREE] > 0 else -1
    g_add(M, GH, RM, q, r, limit + 1)  # limit + 1: nothing more to drop (q is under limit)
    if g >= 0 and origin != 0:
        GH[G_QID, g] = q + 2 * origin
        M[M_GQLEN + q] -= 1
        M[M_GQLEN + q + 2 * origin] += 1


@kernel
def ghost_add(M, GH, RM, r, origin):  # pragma: no cover - compiled
    """Remember row r (dropped from ``origin``) as the newest ghost entry; the oldest recent
    entry ages into GQ_OLD, keeping its origin."""
    ghost_forget(M, GH, RM, r)
    _ghost_push(M, GH, RM, r, origin)


@kernel
def _ghost_push(M, GH, RM, r, origin):  # pragma: no cover - compiled
    """``ghost_add`` of a row the ghost does not remember (a row just evicted from its slot:
    the map held its slot, not a ghost entry), without probing the map for one."""
    if M[P_GREC] <= 0:
        return
    if g_len(M, GQ_RECENT) >= M[P_GREC]:
        g = g_front(M, GH, GQ_RECENT)
        old = GH[G_ROW, g]
        o = GH[G_QID, g] >> 1
        g_remove(M, GH, RM, g)
        if rm_get(RM, old) == -1:
            g_push(M, GH, RM, GQ_OLD, old, o, M[P_GOLD])
    g_push(M, GH, RM, GQ_RECENT, r, origin, M[P_GREC])


@kernel
def small_adapt(M, GH, g):  # pragma: no cover - compiled
    """ARC's rule for the small FIFO's share, on a miss the ghost remembers (entry g): a row
    dropped from small grows it by max(1, main-dropped / small-dropped entries) slots' share,
    a row dropped from main shrinks it by max(1, small-dropped / main-dropped); within
    [SQ_MIN, SQ_MAX]."""
    b1 = g_len(M, GQ_RECENT) + g_len(M, GQ_OLD) - M[M_GQLEN + GQ_RECENT + 2] - M[M_GQLEN + GQ_OLD + 2]
    b2 = M[M_GQLEN + GQ_RECENT + 2] + M[M_GQLEN + GQ_OLD + 2]
    one = (1 << SQ_BITS) // max(1, M[P_NDYN])
    if (GH[G_QID, g] >> 1) == GO_SMALL:
        k = max(1, b2 // max(1, b1))
        M[P_SMALLQ] = min(M[P_SMALLQ] + k * one, SQ_MAX)
    else:
        k = max(1, b1 // max(1, b2))
        M[P_SMALLQ] = max(M[P_SMALLQ] - k * one, SQ_MIN)


@kernel
def _apply(M):  # pragma: no cover - compiled
    """``_adapt`` over the window that just ended; reset its tallies."""
    miss = M[P_WMISS]
    M[P_EMA] = (9 * M[P_EMA] + miss * FP) // 10
    gain = M[P_GAIN] * FP
    ghost = M[P_GHOSTH] * FP
    if M[P_MODE] == 1:
        delta = gain - ghost
    else:
        loss = M[P_LOSS] * FP
        n_dyn = M[P_NDYN]
        w = M[P_W]
        den = 4 * M[P_EMA] + FP
        if n_dyn * FP >= den:
            trust = FP
        else:
            trust = n_dyn * FP * FP // den
        rows = M[M_QLEN + SMALL] + M[M_QLEN + MAIN]
        dyn = trust * M[P_DYNH] * w // (rows + w)
        if ghost > dyn:
            dyn = ghost
        if gain > dyn:
            delta = gain - dyn
        elif loss < dyn:
            delta = loss - dyn
        else:
            delta = 0
    if delta > 0:
        t = M[P_TARGET] + M[P_STEP] * delta // FP
    else:
        t = M[P_TARGET] - M[P_STEP] * (-delta) // FP
    M[P_TARGET] = min(max(t, 0), M[P_NDYN] * FP)
    M[P_GAIN] = 0
    M[P_LOSS] = 0
    M[P_GHOSTH] = 0
    M[P_DYNH] = 0
    M[P_WMISS] = 0


@kernel
def _tick(M):  # pragma: no cover - compiled
    """Close the windows that ended before the current access (adapting only)."""
    win = M[M_TICK] // WINDOW
    last = M[P_WIN]
    if win > last:
        _apply(M)
        k = win - last - 1
        while k > 0 and M[P_EMA] > 0:
            M[P_EMA] = 9 * M[P_EMA] // 10
            k -= 1
        M[P_WIN] = win


# ---------------------------------------------------------------------------------------------
# the dynamic part: S3-FIFO with hints
# ---------------------------------------------------------------------------------------------


@kernel
def dyn_victim(T):  # pragma: no cover - compiled
    """Free one unleased dynamic slot the S3-FIFO way (its row goes to the ghost); -1 if
    every dynamic slot is leased."""
    M, RM, ros, ref, L, GH, HT = T[0], T[1], T[2], T[3], T[6], T[7], T[9]
    stall = 0
    while True:
        ns = M[M_QLEN + SMALL]
        nm = M[M_QLEN + MAIN]
        if ns + nm == 0:
            return -1
        small_target = max(1, (M[P_SMALLQ] * (ns + nm)) >> SQ_BITS)
        s, from_small = s3fifo.candidate(M, L, ref, small_target, SMALL, MAIN)
        if s < 0:
            return -1
        r = ros[s]
        soon = r >= 0 and M[M_HLIVE] > 0 and hint_outstanding(M, HT, r)
        if from_small:
            if L[L_FREQ, s] >= 1 or soon:
                L[L_FREQ, s] = 0
                q_to_back(M, L, MAIN, s)
                stall = 0
                M[M_SCAN] += 1  # a candidate re-queued
                continue
        else:
            if L[L_FREQ, s] > 0:
                L[L_FREQ, s] -= 1
                q_to_back(M, L, MAIN, s)
                stall = 0
                M[M_SCAN] += 1  # a candidate re-queued
                continue
            if soon and stall < nm:
                q_to_back(M, L, MAIN, s)
                stall += 1
                M[M_SCAN] += 1  # a candidate re-queued
                continue
        q_unlink(M, L, s)
        unmap(M, RM, ros, s)
        if r >= 0:  # r was in slot s until unmap: the ghost has no entry for it
            _ghost_push(M, GH, RM, r, GO_SMALL if from_small else GO_MAIN)
        return s


@kernel
def core_victim(T, worse_than):  # pragma: no cover - compiled
    """Free the coldest unleased core slot if its rank is above ``worse_than``; else -1."""
    M, RM, ros, ref, K, L = T[0], T[1], T[2], T[3], T[5], T[6]
    s = h_top_free(M, K, L, ref)
    if s < 0 or -K[K_KEY, s] <= worse_than:
        return -1
    h_remove(M, K, s)
    unmap(M, RM, ros, s)
    return s


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------


@kernel(inline=True)
def hit(T, s):  # pragma: no cover - compiled
    M, K, L = T[0], T[5], T[6]
    adapting = M[P_ADAPT] != 0
    if adapting:
        _tick(M)
    if K[K_HPOS, s] >= 0 or L[L_QID, s] == Q_HPARK:  # ranked core (on the heap, or parked)
        if adapting:
            edge = M[P_RANKLO] * FP + M[P_TARGET]
            if -K[K_KEY, s] * FP >= edge - M[P_W] * FP:
                M[P_LOSS] += 1
    else:
        if L[L_FREQ, s] < 3:
            L[L_FREQ, s] += 1
        if adapting:
            M[P_DYNH] += 1


@kernel
def all_hits(T, rows, slots):  # pragma: no cover - compiled
    """The decode path's all-hit accesses (walk.all_hits_with) with this module's ``hit``
    inlined."""
    return all_hits_with(hit, T, rows, slots)


@kernel(inline=True)
def miss(T, r):  # pragma: no cover - compiled
    M, RM, ros, K, L, GH, HT, RK = T[0], T[1], T[2], T[5], T[6], T[7], T[9], T[10]
    m = M[M_RANKM]
    rho = rank_of(M, RK, r) if m > 0 else 0
    if M[P_ADAPT] != 0:
        _tick(M)
        M[P_WMISS] += 1
        edge = M[P_RANKLO] * FP + M[P_TARGET]
        rfp = rho * FP
        if rho < m and edge <= rfp and rfp < edge + M[P_W] * FP:
            M[P_GAIN] += 1
        if rfp >= edge:
            g = g_of(RM, r)
            if g >= 0 and (g_queue(GH, g) & 1) == GQ_RECENT:
                M[P_GHOSTH] += 1
    tgt = M[P_TARGET] >> FP_BITS
    n_core = M[M_HEAPN] + M[M_QLEN + Q_HPARK]
    if m > 0 and rho < M[P_RANKLO] + tgt:  # core-worthy
        s = take_free(M, L)
        if s < 0:
            if n_core >= tgt:
                s = core_victim(T, rho)
            else:
                s = dyn_victim(T)
                if s < 0:
                    s = core_victim(T, rho)
            if s < 0:
                return -1
        ghost_forget(M, GH, RM, r)
        place(M, RM, ros, s, r)
        L[L_FREQ, s] = 0
        h_push(M, K, s, -rho)
        return s
    if M[P_NDYN] - min(n_core, tgt) <= 0:  # the core takes every dynamic slot
        ghost_add(M, GH, RM, r, GO_SMALL)
        return -1
    s = take_free(M, L)
    if s < 0:
        if n_core > tgt:
            s = core_victim(T, -1)
        if s < 0:
            s = dyn_victim(T)
        if s < 0:
            return -1
    g = g_of(RM, r)
    if g >= 0 and M[P_SADAPT] != 0:
        small_adapt(M, GH, g)
    to_main = g >= 0 or (M[M_HLIVE] > 0 and hint_outstanding(M, HT, r))
    if g >= 0:  # ghost_forget, with the entry found above (nothing since changed the ghost)
        g_remove(M, GH, RM, g)
    place(M, RM, ros, s, r)
    L[L_FREQ, s] = 0
    q_push(M, L, MAIN if to_main else SMALL, s)
    return s


@kernel(inline=True)
def prefill(T, s, r, rank):  # pragma: no cover - compiled
    """The prefilled ranked rows all join the core (trimmed when over its target).

    ``rank``: r's rank, handed on by the index (``Default.prefill_rank``: the prefill rows
    are a run of the ranking), so there is no binary search of ``RK`` per row (~1 us each
    at 6M ranked rows: cache misses): only its key is set here, and ``prefilled`` pushes
    the slots on the heap afterwards, in this same order, in one pass over the heap alone
    (interleaved with the row map's random inserts, each push's path through the heap
    missed the cache: ~0.5 us per row at 6.4M rows). -1: search for the rank, push now."""
    if rank < 0:
        _prefill_searched(T, s, r)
    else:  # one store: no call, and no array of the state unpacked that needs none
        T[5][K_KEY, s] = -rank  # (L_FREQ: 0 in a new index's fresh L, not written: ~4 B a slot of page faults)


@kernel
def _prefill_searched(T, s, r):  # pragma: no cover - compiled
    """``prefill`` of a row whose rank is not known: search ``RK``, push its slot now."""
    M, K, RK = T[0], T[5], T[10]
    h_push(M, K, s, -rank_of(M, RK, r))  # (L_FREQ is 0 in a new index)


@kernel
def prefilled(M, K, a, b):  # pragma: no cover - compiled
    """Push prefilled slots ``a .. b`` (their keys set by ``prefill``) on the heap, in slot
    order (the order they were placed in), as ``h_push`` would. Their keys fall (rows come
    hottest first), so each is below every key on the heap and ``h_push`` would swap it
    all the way up to the root: the path is shifted down one level instead (the same
    moves, the same heap) without comparing keys or writing each moved slot's position,
    and every heap slot's position is written once at the end."""
    for s in range(a, b):
        key = K[K_KEY, s]
        i = M[M_HEAPN]
        if i > 0 and key >= K[K_KEY, K[K_HEAP, 0]]:  # not below the root (never, in rank order)
            h_push(M, K, s, key)
            continue
        M[M_HEAPN] = i + 1
        while i > 0:
            p = (i - 1) >> 1
            K[K_HEAP, i] = K[K_HEAP, p]
            i = p
        K[K_HEAP, 0] = s
    for i in range(M[M_HEAPN]):
        K[K_HPOS, K[K_HEAP, i]] = i


# ---------------------------------------------------------------------------------------------
# description
# ---------------------------------------------------------------------------------------------


def _real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(float(v))


class Default(Policy):
    """Pinned core + adaptive profile-ranked core + S3-FIFO with exact ghosts and hints.

    Args (beyond ``capacity``/``rng``): ``pin_fraction`` (of capacity pinned from the
    profile, [0, 1]), ``small_fraction`` (S3-FIFO's small FIFO, of the dynamic rows, (0, 1]),
    ``adapt_step`` (slots per unit of delta, >= 0), ``margin`` (w as a fraction of the
    dynamic slots, [0, 1]), ``initial_core`` (the ranked core's starting target, of the
    dynamic slots, [0, 1]), ``adapt`` ("density" or "ghost"), ``hint_horizon`` (accesses
    after which an unused hint expires; None: the index's default max(4 x capacity, 2**20)),
    ``adapt_small`` (the small FIFO's share adapts to ghost hits, from ``small_fraction``).
    Without a profile it is S3-FIFO (small_fraction of the rows held) plus hints. A store
    passes them as ``tierstore.open(path, policy_params={"pin_fraction": 0.2})``.
    """

    name = "default"
    k_rows = 3  # K_KEY (-rank), K_HEAP, K_HPOS
    k_dtype = np.int32  # ranks < capacity
    uses_hints = True
    ranks = True
    l_rows = NL  # L_FREQ: 2-bit reinsertion counters

    defaults = {"pin_fraction": 0.1, "small_fraction": 0.25, "adapt_step": 2.0, "margin": 0.3,
                 "initial_core": 0.5, "adapt": "density", "hint_horizon": None, "adapt_small": False}

    def check_params(self, params: dict) -> dict:
        p = super().check_params(params)
        for k, lo, hi, lo_open in (("pin_fraction", 0.0, 1.0, False), ("small_fraction", 0.0, 1.0, True),
                                   ("margin", 0.0, 1.0, False), ("initial_core", 0.0, 1.0, False),
                                   ("adapt_step", 0.0, math.inf, False)):
            v = p[k]
            if not _real(v) or v < lo or v > hi or (lo_open and v == lo):
                rng = f"({lo}, {hi}]" if lo_open else (f"[{lo}, {hi}]" if hi < math.inf else f">= {lo}, finite")
                raise PolicyParamError(f"{k}={v!r} must be a number in {rng}", param=k)
            p[k] = float(v)
        if p["adapt"] not in ("density", "ghost"):
            raise PolicyParamError(f"adapt={p['adapt']!r} must be 'density' or 'ghost'", param="adapt")
        if not isinstance(p["adapt_small"], (bool, np.bool_)):
            raise PolicyParamError(f"adapt_small={p['adapt_small']!r} must be True or False", param="adapt_small")
        h = p["hint_horizon"]
        if h is not None and (not isinstance(h, (int, np.integer)) or isinstance(h, (bool, np.bool_)) or h < 1):
            raise PolicyParamError(f"hint_horizon={h!r} must be None or a positive integer number of accesses",
                                   param="hint_horizon")
        self._top = np.empty(0, np.int64)
        self._distinct = False  # ranking(): no row twice in _top
        self._rank_lo = 0
        self._n_dyn = 0
        return p

    def prepare(self, profile: np.ndarray | TopProfile | None) -> np.ndarray:
        self._top = hot_rows(profile, self.capacity)  # hottest first: position = rank
        return self._top[: int(self.params["pin_fraction"] * self.capacity)]

    def ranking(self) -> tuple[np.ndarray, np.ndarray]:
        # (row, rank) sorted by row, equal rows in rank order (exactly a stable argsort of
        # the rows: the insertion order of RK), as int32 arrays (what RK keeps), by a radix
        # sort in O(rows) (rankmap.sort_ranking; sorting packed (row, rank) int64 values cost
        # ~80 ns a ranked row at open, the largest part of building the index)
        rows, ranks = sort_ranking(self._top)
        # distinct rows: the prefill rows' ranks are their positions (prefill_rank)
        self._distinct = not bool((rows[1:] == rows[:-1]).any())
        return rows, ranks

    def ranked(self) -> tuple[np.ndarray, None]:
        # the ranking as it is, hottest first (a row's rank is its position): RK is the same
        # map as from ``ranking()``'s sorted arrays (mapbuild.build_map), without the sort
        return self._top, None

    def ranked_duplicates(self, n: int) -> None:
        self._distinct = n == 0  # distinct rows: the prefill rows' ranks are their positions

    def prefill_rank(self) -> int:
        return self._rank_lo if self._distinct else -1

    def after_prefill(self, T: tuple) -> None:
        if self.prefill_rank() >= 0:  # the prefill set the keys: push the slots it filled
            M = T[0]
            prefilled(M, T[5], int(M[M_LO]), int(M[M_CAP] - M[M_NFREE]))

    def ghost_size(self, n_dyn: int) -> int:
        return max(1, n_dyn)

    def margin_slots(self, n_dyn: int) -> int:
        return max(16, int(self.params["margin"] * n_dyn))

    def configure(self, M, n_dyn: int) -> None:
        p = self.params
        m = int(M[M_RANKM])
        lo = int(M[M_CAP]) - n_dyn
        self._n_dyn = n_dyn
        self._rank_lo = rank_lo = lo if m else 0
        adapting = m > rank_lo
        w = self.margin_slots(n_dyn)
        g = self.ghost_size(n_dyn)
        M[P_NDYN] = n_dyn
        M[P_RANKLO] = rank_lo
        M[P_ADAPT] = int(adapting)
        M[P_MODE] = 0 if p["adapt"] == "density" else 1
        M[P_W] = w
        M[P_STEP] = int(round(p["adapt_step"] * FP))
        M[P_SMALLF] = int(round(p["small_fraction"] * FP))
        M[P_SMALLQ] = M[P_SMALLF] << (SQ_BITS - FP_BITS)
        M[P_SADAPT] = int(bool(p["adapt_small"]))
        M[P_TARGET] = int(p["initial_core"] * n_dyn * FP) if adapting else 0
        M[P_GREC] = min(w, g) if n_dyn else 0
        M[P_GOLD] = g - M[P_GREC] if n_dyn else 0
        if p["hint_horizon"] is not None:
            M[M_HORIZON] = int(p["hint_horizon"])

    def prefill(self) -> np.ndarray:
        # every free slot starts with the next-ranked rows: no compulsory misses on the core;
        # ranks past the target are the first to go when the dynamic part needs room
        return self._top[self._rank_lo: self._rank_lo + self._n_dyn]
