"""The one walk of a lookup through the cache tiers, used by the store and the simulator.

``lookup`` processes a batch of ids against the device tier one access at a time, collects
the rows it does not serve (sorted, unique: each is read from below once) and processes
those against the host tier the same way. The store then moves bytes (disk -> host ->
device) and calls ``finish``; the simulator (``replay``) calls ``finish`` at once. Both run
this very code, so a live store's counters equal the simulation's by construction.

The store's rule for repeats inside one lookup: every access is an ordinary sequential
cache access (a hit updates the policy, a miss may admit the row), except that no slot the
lookup has touched may be evicted before the lookup ends (it is *leased*: its bytes are
being read or written), and a miss that finds every slot leased bypasses the tier. A row
admitted earlier in the same lookup is a hit for its later accesses. With one id per
lookup this is exactly sequential caching.
"""

from __future__ import annotations

import numpy as np

from . import default
from . import lfu, lru, s3fifo, static
from .hints import hint_add, hint_consume
from .jit import kernel
from .layout import (BELOW, CACHED, FILL, HIT, L_PEND, M_BYPASS, M_EPOCH, M_HINTS, M_HITS, M_HLIVE, M_LO,
                     M_MISSES, M_POL, M_TICK, RESIDENT)
from .structs import place, take_free, unmap

# ---------------------------------------------------------------------------------------------
# dispatch on the policy id (one branch per policy module)
# ---------------------------------------------------------------------------------------------


@kernel
def on_hit(pol, T, s):  # pragma: no cover - compiled
    if pol == default.ID:
        default.hit(T, s)
        return
    if pol == lru.ID:
        lru.hit(T, s)
    elif pol == lfu.ID:
        lfu.hit(T, s)
    elif pol == s3fifo.ID:
        s3fifo.hit(T, s)
    elif pol == static.ID:
        static.hit(T, s)


@kernel
def on_miss(pol, T, r):  # pragma: no cover - compiled
    if pol == default.ID:
        return default.miss(T, r)
    if pol == lru.ID:
        return lru.miss(T, r)
    if pol == lfu.ID:
        return lfu.miss(T, r)
    if pol == s3fifo.ID:
        return s3fifo.miss(T, r)
    return static.miss(T, r)


@kernel
def on_prefill(pol, T, s, r):  # pragma: no cover - compiled
    if pol == default.ID:
        default.prefill(T, s, r)
        return
    if pol == lru.ID:
        lru.prefill(T, s, r)
    elif pol == lfu.ID:
        lfu.prefill(T, s, r)
    elif pol == s3fifo.ID:
        s3fifo.prefill(T, s, r)
    else:
        static.prefill(T, s, r)


# ---------------------------------------------------------------------------------------------
# one tier
# ---------------------------------------------------------------------------------------------


@kernel
def access(T, rows, slots, code, leased):  # pragma: no cover - compiled
    """Process ``rows`` in order against one tier. Per access: ``slots[i]`` (-1 when
    ``code[i] == BELOW``) and ``code[i]`` (HIT: bytes in the slot; FILL: admitted by this
    lookup, bytes to be written; BELOW: read it from below). Leases every slot it returns
    once, listed in ``leased[:n]``; returns n. Pair with ``finish`` (or ``abort``)."""
    M, sor, ref, ep, L, HT = T[0], T[1], T[3], T[4], T[6], T[9]
    epoch = M[M_EPOCH] + 1
    M[M_EPOCH] = epoch
    pol = M[M_POL]
    lo = M[M_LO]
    nl = 0
    for i in range(rows.size):
        r = rows[i]
        if M[M_HLIVE] > 0:
            hint_consume(M, HT, r)
        s = sor[r]
        c = HIT
        if s >= 0:
            M[M_HITS] += 1
            if s >= lo:
                e = ep[s]
                if e == -epoch:
                    c = FILL
                elif e != epoch:
                    if L[L_PEND, s] != 0:
                        c = BELOW  # another lookup admitted it and is still writing its bytes
                    else:
                        ep[s] = epoch
                        ref[s] += 1
                        leased[nl] = s
                        nl += 1
                on_hit(pol, T, s)
        else:
            M[M_MISSES] += 1
            s = on_miss(pol, T, r)
            if s >= 0:
                ep[s] = -epoch
                ref[s] += 1
                L[L_PEND, s] = 1
                leased[nl] = s
                nl += 1
                c = FILL
            else:
                M[M_BYPASS] += 1
                c = BELOW
        slots[i] = s if c != BELOW else -1
        code[i] = c
        M[M_TICK] += 1
    return nl


@kernel
def finish(T, leased, n):  # pragma: no cover - compiled
    """End a lookup: the FILL slots' bytes are written; release its leases."""
    ref, L = T[3], T[6]
    for j in range(n):
        s = leased[j]
        ref[s] -= 1
        L[L_PEND, s] = 0


@kernel
def abort(T, leased, n):  # pragma: no cover - compiled
    """End a lookup that failed before writing its FILL slots: unmap their rows (the slots
    stay in the policy's queues as holes, reused when evicted); release its leases."""
    M, sor, ros, ref, L = T[0], T[1], T[2], T[3], T[6]
    for j in range(n):
        s = leased[j]
        ref[s] -= 1
        if L[L_PEND, s] != 0:
            L[L_PEND, s] = 0
            unmap(M, sor, ros, s)


@kernel
def prefill(T, rows):  # pragma: no cover - compiled
    """Place ``rows`` (not yet resident) into free slots as the policy's starting content;
    returns how many were placed."""
    M, sor, ros, L = T[0], T[1], T[2], T[6]
    pol = M[M_POL]
    n = 0
    for r in rows:
        if sor[r] >= 0:
            continue
        s = take_free(M, L)
        if s < 0:
            break
        place(M, sor, ros, s, r)
        on_prefill(pol, T, s, r)
        n += 1
    return n


@kernel
def resident(T, rows, out):  # pragma: no cover - compiled
    sor = T[1]
    for i in range(rows.size):
        out[i] = sor[rows[i]] >= 0


# ---------------------------------------------------------------------------------------------
# the walk: device tier, then the host tier for what the device tier does not serve
# ---------------------------------------------------------------------------------------------


@kernel
def lookup(dkind, D, hkind, H, rows, d_slot, d_code, d_leased, need, need_of, h_slot, h_code,
           h_leased, collect=True):  # pragma: no cover - compiled
    """One lookup's bookkeeping in both cache tiers. Device: ``d_slot``/``d_code`` per id,
    leases in ``d_leased``. Rows it does not serve: ``need[:m]`` (sorted, unique), and for
    each such position ``need_of[i]`` (index into need). Host: ``h_slot``/``h_code`` per
    ``need`` row, leases in ``h_leased``. Returns (device leases, m, host leases).
    ``collect`` False (the simulator, no host tier): skip gathering ``need``."""
    n = rows.size
    n_dl = 0
    if dkind == CACHED:
        n_dl = access(D, rows, d_slot, d_code, d_leased)
    elif dkind == RESIDENT:
        for i in range(n):
            d_slot[i] = rows[i]
            d_code[i] = HIT
        return 0, 0, 0
    else:
        for i in range(n):
            d_slot[i] = -1
            d_code[i] = BELOW
    if not collect and hkind != CACHED:
        return n_dl, 0, 0
    cnt = 0
    for i in range(n):
        if d_code[i] != HIT:
            need[cnt] = rows[i]
            cnt += 1
    if cnt == 0:
        return n_dl, 0, 0
    m = cnt
    if cnt > 1:
        u = np.unique(need[:cnt])
        m = u.size
        need[:m] = u
    for i in range(n):
        if d_code[i] != HIT:
            need_of[i] = np.searchsorted(need[:m], rows[i]) if m > 1 else 0
    n_hl = 0
    if hkind == CACHED:
        n_hl = access(H, need[:m], h_slot, h_code, h_leased)
    elif hkind == RESIDENT:
        for j in range(m):
            h_slot[j] = need[j]
            h_code[j] = HIT
    else:
        for j in range(m):
            h_slot[j] = -1
            h_code[j] = BELOW
    return n_dl, m, n_hl


@kernel
def announce(dkind, D, hkind, H, rows):  # pragma: no cover - compiled
    """Hints (``Store.hint``): each tier hears only what it can act on: the device tier
    every id, the host tier the ids the device tier does not hold now."""
    if dkind == RESIDENT or rows.size == 0:
        return
    u = np.unique(rows)
    dh = dkind == CACHED and D[0][M_HINTS] != 0
    hh = hkind == CACHED and H[0][M_HINTS] != 0
    if not dh and not hh:
        return
    for r in u:
        if dh:
            hint_add(D[0], D[9], r)
        if hh and not (dkind == CACHED and D[1][r] >= 0):
            hint_add(H[0], H[9], r)


@kernel
def replay(dkind, D, hkind, H, rows, bounds, lookahead):  # pragma: no cover - compiled
    """The simulator: every batch ``rows[bounds[i]:bounds[i+1]]`` through ``lookup`` and
    ``finish``, exactly as the store runs it; with ``lookahead`` L > 0 the batch i+L is
    announced (``announce``) before batch i is looked up."""
    nb = bounds.size - 1
    big = 1
    for i in range(nb):
        big = max(big, bounds[i + 1] - bounds[i])
    d_slot = np.empty(big, np.int64)
    d_code = np.empty(big, np.int8)
    d_leased = np.empty(big, np.int64)
    need = np.empty(big, np.int64)
    need_of = np.empty(big, np.int64)
    h_slot = np.empty(big, np.int64)
    h_code = np.empty(big, np.int8)
    h_leased = np.empty(big, np.int64)
    for j in range(min(lookahead, nb)):
        announce(dkind, D, hkind, H, rows[bounds[j]:bounds[j + 1]])
    for i in range(nb):
        if lookahead > 0 and i + lookahead < nb:
            announce(dkind, D, hkind, H, rows[bounds[i + lookahead]:bounds[i + lookahead + 1]])
        b = rows[bounds[i]:bounds[i + 1]]
        n_dl, m, n_hl = lookup(dkind, D, hkind, H, b, d_slot, d_code, d_leased, need, need_of, h_slot, h_code,
                               h_leased, hkind == CACHED)
        if dkind == CACHED:
            finish(D, d_leased, n_dl)
        if hkind == CACHED:
            finish(H, h_leased, n_hl)


