"""W-TinyLFU (Einziger, Friedman & Manes, "TinyLFU", ACM TOS 2017), as Caffeine does it.

- An admission *window*: an LRU of 1% of the dynamic slots (at least one) that every
  missed row enters first.
- A *main* area, a segmented LRU: *probation* (rows admitted from the window) and
  *protected* (rows hit in probation), protected held to 80% of main; a hit in probation
  moves the row to protected and, when protected is over its share, demotes protected's
  LRU row to the back of probation.
- A frequency *sketch* in ``SK``: a count-min sketch of depth 4 with 4-bit counters (two
  per byte, saturating at 15), width W a power of two >= the dynamic slots, and a
  *doorkeeper* (a bloom filter of 8W bits, 2 probes): a row's first occurrence only sets
  its doorkeeper bits; later ones increment its four counters. The estimate is the least
  of the four counters plus 1 when the doorkeeper has the row. Every access (hit or miss)
  is recorded; after 10 x dynamic-slots records every counter is halved, the doorkeeper
  cleared and the record count halved (TinyLFU's reset).
- A *saturation bit* per slot (bit 7 of the slot's queue byte, below): set when a hit's
  record leaves the slot's row with its doorkeeper bits set and all four counters at 15;
  cleared for the slot when a row is placed in it and for every slot at a reset. Between
  resets counters only grow and doorkeeper bits are only set, so while the bit is set a
  record of that row changes nothing but the record count: a hit on it skips the sketch.
  This changes no decision; it is the decode path's cost (hot rows, all hits, saturated):
  the record's six random reads into a sketch of 3-6 bytes a slot (L2-missing at 100K
  slots) made a 1,024-id all-hit lookup 6.8x the resident table's, 4x lru's (measured,
  benchmarks/bench_lookup.py).
- *Admission*: on a miss with no free slot, the window's LRU row (the candidate) meets
  main's victim (probation's LRU row; protected's when probation is empty): the more
  frequent stays, the other is evicted; a tie evicts the candidate (Caffeine's ``admit``).
  The candidate, if admitted, moves to the back of probation; the missed row takes the
  freed slot at the back of the window.

Deliberate differences from Caffeine: no hill climbing of the window size (fixed at 1%),
no random admission of warm candidates against hash flooding (the policy stays
deterministic), unit-size entries, and the sketch keeps a doorkeeper (TinyLFU's paper;
Caffeine's production sketch has none). Hash seeds are drawn once from the Policy's rng
and kept in M params.

libCacheSim's ``WTinyLFU`` is a different variant, so it is not an exact oracle (measured
in tests/tierstore/cache/test_wtinylfu_arc.py): its window is ``int(0.01 * capacity)``
slots, which is 0 below 100 slots, and then it admits nothing at all (hit ratio 0); a
winning candidate does not end the eviction, which goes on taking window rows until one
loses (its window shrinks); its main SLRU caps probation at 20% and fills protected with
new rows first; its sketch is a counting bloom filter with minimal increment, no
doorkeeper, fed on misses, main hits and every candidate comparison (not window hits),
halved every 32 x main-size main hits (the difference that matters most: on the tests'
text trace at 500 slots, 0.7647 here vs 0.7345 there, of which switching a plain model of
libCacheSim's variant to this aging recovers 0.031).

State, issue 19's 32 bytes a slot (29-32 here: 35-38 before): the row map 10, ``ros`` 4,
uint8 leases and int16 lease markers (``ref_dtype``, ``ep_dtype``: 3 bytes less than the
other policies' uint16 and int32; a slot held by 255 lookups in flight at once is served
from below instead of leased again, and the markers restart every 2**14 lookups, one pass
over the slots each time, walk.access), queue links 8 (``L`` has no queue-id row), one
*queue byte* per slot in ``K`` (uint8[1, cap]: the slot's queue in bits 0-1, ``NOQ`` when
in none, the saturation bit in bit 7; the shared queue-id row was 4 bytes and the
saturation bits a separate 1/8) and the sketch, 3-6 (3W bytes). Decisions are those of the
layout before, hit for hit (the same sketch, queues and bits). Cost: a 1,024-id all-hit
lookup 1.11-1.15x the layout before (benchmarks.bench_lookup --quick, interleaved, load
10-12; 64 ids 1.0-1.07x); the queue byte's read-modify-writes are the difference measured.

Leases: a leased slot is never evicted. The candidate is the window's least recent
unleased row and the victim probation's (then protected's) least recent unleased row;
with no candidate the victim goes (the window then hands its LRU row to probation to keep
its size), with no victim the candidate goes, with neither the miss bypasses (-1).
"""

from __future__ import annotations

import numpy as np

from ..jit import kernel
from .layout import L_NEXT, L_PREV, M_CAP, M_HITS, M_HLIVE, M_LO, M_PARAM, M_QLEN, M_QSCAN, M_TICK
from .policy import Policy
from .rowmap import rm_get
from .structs import _link_back, _unlink, bucket, place, q_first_free, q_front, take_free, unmap
from .walk import all_hits_with


WIN = 0  # slot queues: front = least recent
PROB = 1
PROT = 2
NOQ = 3  # queue bits of a slot in no queue
QMASK = 3  # a slot's queue byte (K[0, s]): its queue in bits 0-1 ...
SAT = 0x80  # ... and its saturation bit
SATURATED = 1  # record's results (0: neither)
RESET = 2

DEPTH = 4  # count-min rows
CMAX = 15  # 4-bit counters
DK_PROBES = 2

P_WIN = M_PARAM + 0  # window slots
P_PROT = M_PARAM + 1  # protected's share of main
P_WBITS = M_PARAM + 2  # log2 of the sketch width W
P_SAMPLE = M_PARAM + 3  # records between resets
P_ADDS = M_PARAM + 4  # records since the last reset (halved at each)
P_SEED = M_PARAM + 5  # DEPTH + 1 seeds: one per count-min row, then the doorkeeper's
N_SEEDS = DEPTH + 1


# ---------------------------------------------------------------------------------------------
# the sketch: DEPTH*W 4-bit counters (row-major, counter k in byte k >> 1, the low nibble
# for even k) in SK[:DEPTH*W/2], then the doorkeeper's 8W bits in SK[DEPTH*W/2:][:W]: 3W
# bytes, 3-6 per dynamic slot (one counter per byte, 5W bytes, cost 5-10)
# ---------------------------------------------------------------------------------------------


@kernel(inline=True)
def _counter(SK, k):  # pragma: no cover - compiled
    return (np.int64(SK[k >> 1]) >> ((k & 1) << 2)) & CMAX


@kernel(inline=True)
def _increment(SK, k):  # pragma: no cover - compiled
    """Counter k plus one, saturating at CMAX."""
    sh = (k & 1) << 2
    v = np.int64(SK[k >> 1])
    if (v >> sh) & CMAX < CMAX:
        SK[k >> 1] = v + (np.int64(1) << sh)


@kernel
def _dk_bit(M, r, j):  # pragma: no cover - compiled
    """The doorkeeper's j-th probe for row r: a bit index in [0, 8W)."""
    return bucket(r, M[P_SEED + DEPTH] + j, 64 - (M[P_WBITS] + 3))


@kernel
def frequency(M, SK, r):  # pragma: no cover - compiled
    """Estimated accesses of row r since the last reset (count-min + doorkeeper)."""
    wb = M[P_WBITS]
    w = np.int64(1) << wb
    est = CMAX
    for i in range(DEPTH):
        c = _counter(SK, i * w + bucket(r, M[P_SEED + i], 64 - wb))
        if c < est:
            est = c
    base = (DEPTH * w) >> 1
    for j in range(DK_PROBES):
        b = _dk_bit(M, r, j)
        if (np.int64(SK[base + (b >> 3)]) >> (b & 7)) & 1 == 0:
            return est
    return est + 1


@kernel
def _count_record(M, SK):  # pragma: no cover - compiled
    """Count one record; at the reset: counters halved, doorkeeper cleared, the count
    halved (the caller clears the saturation bits: ``record``). Returns whether it reset."""
    M[P_ADDS] += 1
    if M[P_ADDS] < M[P_SAMPLE]:
        return False
    w = np.int64(1) << M[P_WBITS]
    base = (DEPTH * w) >> 1
    for k in range(base):  # both nibbles halved: each loses its low bit
        SK[k] = (SK[k] >> 1) & 0x77
    for k in range(base, SK.size):  # the doorkeeper
        SK[k] = 0
    M[P_ADDS] = M[P_ADDS] >> 1
    return True


@kernel
def record(M, SK, r):  # pragma: no cover - compiled
    """One access of row r: doorkeeper first, then the counters; reset when due. Returns
    True when r is saturated now (doorkeeper bits set, all counters at CMAX, no reset):
    until the next reset, recording r again changes only the record count. Returns
    ``RESET`` when the record reset the sketch: the caller clears every saturation bit
    (``_sat_reset``), which this kernel does not see."""
    wb = M[P_WBITS]
    w = np.int64(1) << wb
    base = (DEPTH * w) >> 1  # the doorkeeper's first byte
    seen = True
    for j in range(DK_PROBES):
        b = _dk_bit(M, r, j)
        k = base + (b >> 3)
        v = np.int64(SK[k])
        bit = np.int64(1) << (b & 7)
        if v & bit == 0:
            seen = False
            SK[k] = v | bit
    full = seen
    if seen:
        for i in range(DEPTH):
            k = i * w + bucket(r, M[P_SEED + i], 64 - wb)
            c = _counter(SK, k)
            if c < CMAX:
                _increment(SK, k)
                if c + 1 < CMAX:
                    full = False
    if _count_record(M, SK):
        return RESET
    return SATURATED if full else 0


@kernel
def _sat_reset(Q):  # pragma: no cover - compiled
    """The sketch was reset: no slot's saturation bit speaks for its row any more."""
    for s in range(Q.shape[1]):
        Q[0, s] = Q[0, s] & QMASK


@kernel(inline=True)
def _sat_clear(Q, s):  # pragma: no cover - compiled
    """Slot s holds a new row: its saturation bit no longer speaks for it."""
    Q[0, s] = Q[0, s] & QMASK


# ---------------------------------------------------------------------------------------------
# the slot queues (structs.q_* with the queue in the slot's queue byte, not in L)
# ---------------------------------------------------------------------------------------------


@kernel(inline=True)
def _push(M, L, Q, q, s):  # pragma: no cover - compiled
    """Append slot s at the back (most recent end) of queue q."""
    _link_back(L, L_NEXT, L_PREV, M[M_CAP] + q, s)
    Q[0, s] = (Q[0, s] & SAT) | q
    M[M_QLEN + q] += 1


@kernel(inline=True)
def _unqueue(M, L, Q, s):  # pragma: no cover - compiled
    """Take slot s out of its queue (structs.q_unlink: the queue's leased front kept valid)."""
    q = np.int64(Q[0, s] & QMASK)
    h = M[M_CAP] + q
    if M[M_QSCAN + q] == s:  # the leased front now ends one slot earlier
        p = L[L_PREV, s]
        M[M_QSCAN + q] = -1 if p == h else p
    _unlink(L, L_NEXT, L_PREV, s)
    Q[0, s] = (Q[0, s] & SAT) | NOQ
    M[M_QLEN + q] -= 1


@kernel(inline=True)
def _to_back(M, L, Q, q, s):  # pragma: no cover - compiled
    """Move slot s (in any queue) to the back of queue q."""
    _unqueue(M, L, Q, s)
    _push(M, L, Q, q, s)


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------


@kernel(inline=True)
def hit(T, s):  # pragma: no cover - compiled
    M, ros, Q, L, SK = T[0], T[2], T[5], T[6], T[8]
    r = ros[s]
    if r >= 0:
        # record(r), skipping the sketch while r is saturated (module doc: then the record
        # changes only the count; the one that resets goes through record). Written out
        # here: the same lines as an inlined helper ran 6x slower (10.2 against 1.6 us per
        # 1,024 saturated hits, measured), more than all the rest of the hit
        if Q[0, s] & SAT and M[P_ADDS] + 1 < M[P_SAMPLE]:
            M[P_ADDS] += 1
        else:
            got = record(M, SK, r)
            if got == SATURATED:
                Q[0, s] = Q[0, s] | SAT
            elif got == RESET:
                _sat_reset(Q)
    q = np.int64(Q[0, s] & QMASK)
    if q == PROB:
        _to_back(M, L, Q, PROT, s)
        if M[M_QLEN + PROT] > M[P_PROT]:
            _to_back(M, L, Q, PROB, q_front(M, L, PROT))
    else:
        _to_back(M, L, Q, q, s)


@kernel
def _promote(M, L, Q, s):  # pragma: no cover - compiled
    """``hit``'s queue move for a slot in probation: to protected, whose LRU row goes back
    to probation when protected is over its share."""
    _to_back(M, L, Q, PROT, s)
    if M[M_QLEN + PROT] > M[P_PROT]:
        _to_back(M, L, Q, PROB, q_front(M, L, PROT))


@kernel
def all_hits(T, rows, slots):  # pragma: no cover - compiled
    """The decode path's all-hit accesses: ``walk.all_hits_with`` with ``hit``, written out
    with the state arrays taken from ``T`` once, outside the loop.

    Why written out: ``hit`` inlined per row binds its arrays (``M, ros, Q, L, SK =
    T[...]``, and again in each inlined queue helper), and numba pairs every binding with
    an atomic reference count increment and decrement that its pruning removes only within
    one basic block; ``hit``'s branches split it, so each hit paid ~6 of them (1,024
    saturated hits in the window: 28 us; the same loop with no array bound inside it
    8.5 us, the plain row-map probes alone 3.3; measured on a 104K-slot tier). Here the loop
    binds no array: the common hit (the row saturated, the slot in the window or
    protected) is element reads and writes, and the rest calls kernels (``record``,
    ``_sat_reset``, ``_promote``), as ``hit`` does.

    Decisions are ``hit``'s, access for access: a move to the back of the slot's own queue
    leaves its queue byte and the queue's length as they were (``_to_back`` takes them out
    and puts them back), so only the links and the leased front (``M_QSCAN``) change
    (tests/tierstore/cache/test_wtinylfu_arc.py: the same state as the walk's ``access``
    after every batch, through resets, promotions and demotions). Hints (only ``default``
    has them) go through ``walk.all_hits_with``."""
    M, RM, ros, ep, Q, L, SK = T[0], T[1], T[2], T[4], T[5], T[6], T[8]
    if M[M_HLIVE] > 0:
        return all_hits_with(hit, T, rows, slots)
    lo = M[M_LO]
    for i in range(rows.size):
        s = rm_get(RM, rows[i])
        if s < 0 or (s >= lo and ep[s] < 0):
            return False
        slots[i] = s
    cap = M[M_CAP]
    for i in range(rows.size):
        M[M_HITS] += 1
        s = slots[i]
        if s >= lo:
            r = ros[s]
            if r >= 0:  # hit's record, skipping a saturated row's sketch (module doc)
                if Q[0, s] & SAT and M[P_ADDS] + 1 < M[P_SAMPLE]:
                    M[P_ADDS] += 1
                else:
                    got = record(M, SK, r)
                    if got == SATURATED:
                        Q[0, s] = Q[0, s] | SAT
                    elif got == RESET:
                        _sat_reset(Q)
            q = np.int64(Q[0, s] & QMASK)
            if q == PROB:
                _promote(M, L, Q, s)
            else:  # _to_back(M, L, Q, q, s): the queue byte and length stay as they are
                h = cap + q
                p = L[L_PREV, s]
                if M[M_QSCAN + q] == s:  # the leased front now ends one slot earlier
                    M[M_QSCAN + q] = -1 if p == h else p
                n = L[L_NEXT, s]
                L[L_NEXT, p] = n
                L[L_PREV, n] = p
                t = L[L_PREV, h]
                L[L_NEXT, t] = s
                L[L_PREV, s] = t
                L[L_NEXT, s] = h
                L[L_PREV, h] = s
        M[M_TICK] += 1
    return True


@kernel
def _evict(M, RM, ros, L, Q, s):  # pragma: no cover - compiled
    _unqueue(M, L, Q, s)
    unmap(M, RM, ros, s)


@kernel
def _window_overflow(M, L, Q):  # pragma: no cover - compiled
    """Hand the window's LRU rows to probation while the window is over its size."""
    while M[M_QLEN + WIN] > M[P_WIN]:
        _to_back(M, L, Q, PROB, q_front(M, L, WIN))


@kernel(inline=True)
def miss(T, r):  # pragma: no cover - compiled
    M, RM, ros, ref, Q, L, SK = T[0], T[1], T[2], T[3], T[5], T[6], T[8]
    if record(M, SK, r) == RESET:
        _sat_reset(Q)
    s = take_free(M, L)
    if s < 0:
        cand = q_first_free(M, L, ref, WIN)
        vict = q_first_free(M, L, ref, PROB)
        if vict < 0:
            vict = q_first_free(M, L, ref, PROT)
        if cand < 0 and vict < 0:
            return -1
        if cand >= 0 and vict >= 0:
            rc = ros[cand]
            rv = ros[vict]
            # a hole (aborted fill, row -1) always loses
            admit = rv < 0 or (rc >= 0 and frequency(M, SK, rc) > frequency(M, SK, rv))
            if admit:
                _to_back(M, L, Q, PROB, cand)
                s = vict
            else:
                s = cand
        else:
            s = cand if cand >= 0 else vict
        _evict(M, RM, ros, L, Q, s)
    place(M, RM, ros, s, r)
    _sat_clear(Q, s)
    _push(M, L, Q, WIN, s)
    _window_overflow(M, L, Q)
    return s


@kernel
def prefill(T, s, r, rank):  # pragma: no cover - compiled
    M, Q, L = T[0], T[5], T[6]
    _sat_clear(Q, s)
    _push(M, L, Q, WIN, s)
    _window_overflow(M, L, Q)


class WTinyLFU(Policy):
    """W-TinyLFU: a 1% LRU window, a frequency-gated segmented LRU main area."""

    name = "wtinylfu"

    defaults = {"window_fraction": 0.01, "protected_fraction": 0.8}

    ref_dtype = "uint8"  # leases: 255 lookups in flight on a slot at most (layout.py)
    ep_dtype = "int16"  # lease markers: restarted every 2**14 lookups (walk.access)
    k_rows, k_dtype = 1, np.uint8  # K: one queue byte per slot (queue, saturation bit)
    l_rows = 2  # L: the queue links only (the queue is in K)

    @staticmethod
    def _wbits(n_dyn: int) -> int:
        return max(3, int(max(1, n_dyn) - 1).bit_length())

    def window(self, n_dyn: int) -> int:
        return max(1, int(self.params["window_fraction"] * n_dyn))

    def sketch_bytes(self, n_dyn: int) -> int:
        # 4-bit counters, then W bytes = 8W doorkeeper bits
        return (DEPTH // 2 + 1) << self._wbits(n_dyn)

    def configure(self, M, n_dyn: int) -> None:
        main = max(0, n_dyn - self.window(n_dyn))
        M[P_WIN] = self.window(n_dyn)
        M[P_PROT] = int(self.params["protected_fraction"] * main)
        M[P_WBITS] = self._wbits(n_dyn)
        M[P_SAMPLE] = 10 * max(1, n_dyn)
        M[P_ADDS] = 0
        M[P_SEED:P_SEED + N_SEEDS] = self.rng.integers(0, 2**62, N_SEEDS)

    def init(self, T: tuple) -> None:
        T[5][0] = NOQ  # every slot in no queue, its saturation bit clear
