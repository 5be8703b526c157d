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

Policies enter as arguments: their modules' ``hit``, ``miss`` and ``prefill`` kernels.
numba compiles one specialization of the walk per policy (or device/host pair), so each
compiled walk holds only its own policy's code: the same walk dispatching on a policy id
over every policy ran 30x slower per access (7M against 350M accesses/s for a policy that
does nothing; measured, the optimizer gives up on the large function). Python callers get
the entry point once (``jit.specialized``) and call it directly.
"""

from __future__ import annotations

import numpy as np

from .hints import hint_consume, hint_rows, hint_use_rows, hints_stay_live
from ..jit import kernel, prefetch
from .layout import (BELOW, CACHED, FILL, HIT, M_BYPASS, M_CAP, M_EPOCH, M_EPWRAP, M_REFMAX, M_HINTS, M_HITS, M_HLIVE, M_LO,
                     M_MISSES, M_NREF, M_TICK, NONE, RESIDENT)
from .rowmap import _home, rm_get, rm_prefetch
from .structs import lookup_end, place, take_free, unmap

EPOCH_WRAP = 1 << 30  # int32 lease markers (``ep``, the default) restart below this (M[M_EPWRAP])
# The replay asks for the row-map bucket (and rank-map bucket) of each access this many
# accesses before it (two 24-id steps of a V4.1 trace): the probe of a row outside the CPU
# caches costs ~100 ns, and the trace says which rows come next. 6M ids of a V4.1 code
# trace, CPU per access, same hits: lfu 131-150 -> 85-100 ns and s3fifo 106-145 -> 87-95 at
# 3.84M slots, 0.9-1.0x at 384K; at 38K slots (a map in L2) s3fifo pays 7-12% for it
PREFETCH_AHEAD = 48


def epoch_wrap(ep_dtype) -> int:
    """``M[M_EPWRAP]`` for lease markers of this type: half its range (2**30 for int32, 2**14
    for int16), so ``-wrap`` (a pending slot across the restart) and every epoch fit."""
    return int(np.iinfo(ep_dtype).max) // 2 + 1


@kernel
def _restart_epochs(ep, wrap):  # pragma: no cover - compiled
    """Before epoch 1 again: a lease marker only matters to the lookup that wrote it, inside
    its own ``access`` call (which has ended), so every marker is cleared, except that a
    slot still pending (admitted by a lookup that has not ended: ``ep < 0``) stays pending,
    under a marker no later epoch uses."""
    for s in range(ep.size):
        ep[s] = -wrap if ep[s] < 0 else 0

# ---------------------------------------------------------------------------------------------
# one tier
# ---------------------------------------------------------------------------------------------


@kernel(inline=True)
def access(hit, miss, T, rows, slots, code, leased):  # pragma: no cover - compiled
    """Process ``rows`` in order against one tier. Per access: ``slots[i]`` (-1 when
    ``code[i] == BELOW``) and ``code[i]`` (HIT: bytes in the slot; FILL: admitted by this
    lookup, bytes to be written; BELOW: read it from below). Leases every slot it returns
    once, listed in ``leased[:n]``; returns n. Pair with ``finish`` (or ``abort``)."""
    M, RM, ref, ep, HT = T[0], T[1], T[3], T[4], T[9]
    epoch = M[M_EPOCH] + 1
    if epoch >= M[M_EPWRAP]:  # ep is int32 (int16): start again (O(cap) once per 2**30 (2**14) lookups)
        _restart_epochs(ep, M[M_EPWRAP])
        epoch = 1
    M[M_EPOCH] = epoch
    lo = M[M_LO]
    nl = 0
    for i in range(rows.size):
        r = rows[i]
        if M[M_HLIVE] > 0:
            hint_consume(M, HT, r)
        s = rm_get(RM, r)
        c = HIT
        if s >= 0:
            M[M_HITS] += 1
            if s >= lo:
                e = ep[s]
                if e == -epoch:
                    c = FILL
                elif e != epoch:
                    if e < 0:
                        c = BELOW  # another lookup admitted it and is still writing its bytes
                    elif ref[s] >= M[M_REFMAX]:
                        c = BELOW  # 65,535 (uint8: 255) lookups in flight hold it: no lease past the type
                    else:
                        ep[s] = epoch
                        ref[s] += 1
                        if ref[s] == 1:
                            M[M_NREF] += 1
                        leased[nl] = s
                        nl += 1
                hit(T, s)
        else:
            M[M_MISSES] += 1
            # every dynamic slot leased (a lookup of more rows than the tier holds): bypass
            # without asking the policy, which would scan its leased slots in vain
            s = miss(T, r) if M[M_NREF] < M[M_CAP] - lo else -1
            if s >= 0:
                ep[s] = -epoch  # pending: its bytes are written before this lookup ends
                ref[s] += 1
                if ref[s] == 1:
                    M[M_NREF] += 1
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


@kernel(inline=True)
def finish(T, leased, n):  # pragma: no cover - compiled
    """End a lookup: the FILL slots' bytes are written; release its leases."""
    M, ref, ep = T[0], T[3], T[4]
    for j in range(n):
        s = leased[j]
        ref[s] -= 1
        if ref[s] == 0:
            M[M_NREF] -= 1
        if ep[s] < 0:  # admitted by this lookup: its bytes are in place
            ep[s] = 0
    lookup_end(T)


@kernel
def abort(T, leased, n):  # pragma: no cover - compiled
    """End a lookup that failed before writing its FILL slots: unmap their rows (the slots
    stay in the policy's queues as holes, reused when evicted); release its leases."""
    M, RM, ros, ref, ep = T[0], T[1], T[2], T[3], T[4]
    for j in range(n):
        s = leased[j]
        ref[s] -= 1
        if ref[s] == 0:
            M[M_NREF] -= 1
        if ep[s] < 0:  # admitted by this lookup, never written
            ep[s] = 0
            unmap(M, RM, ros, s)
    lookup_end(T)


PREFILL_AHEAD = 16  # rows ahead whose home bucket prefill prefetches (as rowmap.rm_build: rowmap.AHEAD)


@kernel
def prefill(hook, T, rows, rank0):  # pragma: no cover - compiled
    """Place ``rows`` (not yet resident) into free slots as the policy's starting content;
    returns how many were placed. ``rank0`` >= 0: ``rows[i]`` has rank ``rank0 + i`` in the
    policy's ranking (``Policy.prefill_rank``), passed to the hook; -1: unknown (the hook
    finds it, if it needs it)."""
    M, RM, ros, L = T[0], T[1], T[2], T[6]
    n = 0
    m = rows.size
    for i in range(min(PREFILL_AHEAD, m)):
        prefetch(RM, _home(RM, rows[i]))
    for i in range(m):
        if i + PREFILL_AHEAD < m:  # the map is far larger than the caches: the next rows' buckets load meanwhile
            prefetch(RM, _home(RM, rows[i + PREFILL_AHEAD]))
        r = rows[i]
        if rm_get(RM, r) >= 0:
            continue
        s = take_free(M, L)
        if s < 0:
            break
        place(M, RM, ros, s, r)
        hook(T, s, r, rank0 + i if rank0 >= 0 else -1)
        n += 1
    return n


@kernel
def prefill_placed(hook, T, rows, s0, rank0):  # pragma: no cover - compiled
    """The policy's prefill hooks for ``rows`` already placed in slots ``s0, s0 + 1, ...``
    (``CacheIndex`` maps them with the pinned rows at once, ``index._place``): the calls
    ``prefill`` makes when no row was resident and every row found a free slot, in its order."""
    for i in range(rows.size):
        hook(T, s0 + i, rows[i], rank0 + i if rank0 >= 0 else -1)


# ---------------------------------------------------------------------------------------------
# the walk: device tier, then the host tier for what the device tier does not serve
# ---------------------------------------------------------------------------------------------


@kernel(inline=True)
def lookup(dhit, dmiss, dkind, D, hhit, hmiss, hkind, H, rows, d_slot, d_code, d_leased, need, need_of, h_slot, h_code,
           h_leased, collect=True):  # pragma: no cover - compiled
    """One lookup's bookkeeping in both cache tiers. Device: ``d_slot``/``d_code`` per id,
    leases in ``d_leased``. Rows it does not serve: ``need[:m]`` (sorted, unique), and for
    each such position ``need_of[i]`` (index into need). Host: ``h_slot``/``h_code`` per
    ``need`` row, leases in ``h_leased``. Returns (device leases, m, host leases).
    ``collect`` False (the simulator without a host tier): skip gathering ``need``."""
    n = rows.size
    n_dl = 0
    if dkind == CACHED:
        n_dl = access(dhit, dmiss, D, rows, d_slot, d_code, d_leased)
    elif dkind == RESIDENT:
        for i in range(n):
            d_slot[i] = rows[i]
            d_code[i] = HIT
        return 0, 0, 0
    else:
        for i in range(n):
            d_slot[i] = -1
            d_code[i] = BELOW
    if not collect:
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
        n_hl = access(hhit, hmiss, H, need[:m], h_slot, h_code, h_leased)
    elif hkind == RESIDENT:
        for j in range(m):
            h_slot[j] = need[j]
            h_code[j] = HIT
    else:
        for j in range(m):
            h_slot[j] = -1
            h_code[j] = BELOW
    return n_dl, m, n_hl


@kernel(inline=True)
def all_hits_with(hit, T, rows, slots):  # pragma: no cover - compiled
    """The device tier's part of a lookup whose every row it holds with its bytes in place
    (the decode path), or nothing: returns False at the first row it does not hold, or
    holds in a slot another lookup is still filling, having changed no state. Otherwise
    ``slots[i]`` is row i's slot and the accesses are done as ``access`` does them (hints
    consumed, counters, the policy's ``hit``, in order), without leases: the caller copies
    the rows before it lets go of the tier's lock, so no slot can be evicted meanwhile. A
    lookup of hits only takes no slot, so it leaves nothing else behind: ``finish`` after
    ``access`` would only release the leases again.

    Each policy module compiles it as its own ``all_hits(T, rows, slots)`` kernel, calling
    this with the module's ``hit`` named as a global: the decode path's first compiled call
    (``Walker.begin``, tried before the walk; ``copy_rows`` follows). Named, ``hit`` is
    inlined with this loop; passed to a compiled kernel as an argument (as the walk takes
    its hooks) it is not, and is called once per row: for wtinylfu at 1,024 ids 33 against
    18 us per lookup (measured, standalone variants)."""
    M, RM, ep, HT = T[0], T[1], T[4], T[9]
    lo = M[M_LO]
    for i in range(rows.size):
        s = rm_get(RM, rows[i])
        if s < 0 or (s >= lo and ep[s] < 0):
            return False
        slots[i] = s
    if M[M_HLIVE] > 0 and hints_stay_live(M, rows.size):
        # hints live and none expires within this lookup: they are consumed first, in one
        # call (hints.hint_use_rows: ~4 against ~20 us per 1,024 rows consumed one call
        # each), at the ticks the accesses below give them. Nothing else here reads or
        # changes hint state (only ``default`` has hints; its ``hit`` reads none), so the
        # order changes nothing (test_hints.py: the same table and counters as the walk)
        hint_use_rows(M, HT, rows)
        for i in range(rows.size):
            M[M_HITS] += 1
            s = slots[i]
            if s >= lo:
                hit(T, s)
            M[M_TICK] += 1
        return True
    for i in range(rows.size):
        if M[M_HLIVE] > 0:
            hint_consume(M, HT, rows[i])
        M[M_HITS] += 1
        s = slots[i]
        if s >= lo:
            hit(T, s)
        M[M_TICK] += 1
    return True


@kernel
def copy_rows(slab, slots, out):  # pragma: no cover - compiled
    """``out[i] = slab[slots[i]]`` (uint8 ``[*, row bytes]`` views: one specialization for
    every dtype), GIL-free."""
    w = out.shape[1]
    for i in range(slots.size):
        s = slots[i]
        for j in range(w):
            out[i, j] = slab[s, j]


@kernel
def walk_entry(dhit, dmiss, dkind, D, hhit, hmiss, hkind, H, rows, d_slot, d_code, d_leased, need, need_of, h_slot,
               h_code, h_leased):  # pragma: no cover - compiled
    """``lookup`` as the store's entry point (the simulator's is ``replay``): one compiled
    call. Returns (device leases, m, host leases); the caller moves the bytes and ends the
    lookup (``finish``)."""
    return lookup(dhit, dmiss, dkind, D, hhit, hmiss, hkind, H, rows, d_slot, d_code, d_leased, need, need_of, h_slot,
                  h_code, h_leased, True)


@kernel
def announce(dkind, D, hkind, H, rows):  # pragma: no cover - compiled
    """Hints (``Store.hint``): each tier hears only what it can act on: the device tier
    every id, the host tier the ids the device tier does not hold now. Each tier's hints are
    ``hints.hint_rows``: the distinct rows in ascending order, computed without a sort."""
    if dkind == RESIDENT or rows.size == 0:
        return
    dh = dkind == CACHED and D[0][M_HINTS] != 0
    hh = hkind == CACHED and H[0][M_HINTS] != 0
    if hh and dkind != CACHED:
        hint_rows(H[0], H[9], rows)
    elif hh:  # before the device tier's hints (which move no row): what the device tier holds now
        below = np.empty(rows.size, np.int64)
        k = 0
        for r in rows:
            if rm_get(D[1], r) < 0:
                below[k] = r
                k += 1
        hint_rows(H[0], H[9], below[:k])
    if dh:
        hint_rows(D[0], D[9], rows)


@kernel(inline=True)
def _first_outside(rows, nrows):  # pragma: no cover - compiled
    """The position of the first id outside ``[0, nrows)``, -1 if none. The common answer
    first, from a loop without an exit, which the compiler vectorizes (an id is outside when
    it is, as unsigned, >= nrows): 0.44 -> 0.08 us per 1,024 ids (standalone, measured)."""
    n = np.uint64(nrows)
    bad = False
    for i in range(rows.size):
        bad |= np.uint64(rows[i]) >= n
    if not bad:
        return -1
    for i in range(rows.size):
        if np.uint64(rows[i]) >= n:
            return i
    return -1


@kernel
def announce_checked(dkind, D, hkind, H, rows, nrows):  # pragma: no cover - compiled
    """``Store.hint``'s one compiled call: the id range check (``tierstore.ids``), then
    ``announce``. Returns the position of the first id outside ``[0, nrows)``, having
    announced nothing, or -1 (every id announced)."""
    pos = _first_outside(rows, nrows)
    if pos < 0:
        announce(dkind, D, hkind, H, rows)
    return pos


@kernel
def announce_one_checked(M, HT, rows, nrows):  # pragma: no cover - compiled
    """``announce_checked`` where one tier alone is cached (the other absent, or the host
    tier resident): that tier hears every id. It takes that tier's counters ``M`` and hint
    table ``HT`` only: numba unboxes every array of the two state tuples at each call, which
    cost ~1.5 us of a decode step's ``Store.hint`` (measured at 1,024 ids)."""
    pos = _first_outside(rows, nrows)
    if pos < 0 and rows.size > 0 and M[M_HINTS] != 0:
        hint_rows(M, HT, rows)
    return pos


@kernel(inline=True)
def _prefetch_rows(RM, RK, rows, a, b):  # pragma: no cover - compiled
    """Bring the first row-map bucket of ``rows[a:b]`` into the CPU caches (and the rank
    map's, when the policy has one: ``default`` reads it on a miss). Reads nothing, changes
    nothing: only where the probes of those accesses will start (rowmap's hash; a direct
    map's bucket r)."""
    for j in range(a, b):
        r = rows[j]
        rm_prefetch(RM, r)
        if RK.size > 0:
            rm_prefetch(RK, r)


@kernel
def replay(dhit, dmiss, dkind, D, hhit, hmiss, hkind, H, rows, bounds, lookahead):  # pragma: no cover - compiled
    """The simulator: every batch ``rows[bounds[i]:bounds[i+1]]`` through ``lookup`` and
    ``finish``, exactly as the store runs it; with ``lookahead`` L > 0 the batch i+L is
    announced (``announce``) before batch i is looked up. Returns the rows requested from
    below the device tier (unique per batch; counted when there is a host tier).

    The device tier's map buckets of the accesses ``PREFETCH_AHEAD`` ahead are prefetched
    (``_prefetch_rows``): the replay knows its future, a store does not. Only timing."""
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
    below = 0
    if dkind == CACHED and hkind == NONE and nb == rows.size and lookahead == 0:
        # one access per lookup, one tier: the sequential fast path. It is ``access`` +
        # ``finish`` of one id without the lease bookkeeping, which only matters to a
        # lookup's later ids (the state arrays are unpacked once, outside the loop)
        M, RM, HT, RK = D[0], D[1], D[9], D[10]
        lo = M[M_LO]
        _prefetch_rows(RM, RK, rows, 0, min(PREFETCH_AHEAD, nb))
        for i in range(nb):
            if i + PREFETCH_AHEAD < nb:
                _prefetch_rows(RM, RK, rows, i + PREFETCH_AHEAD, i + PREFETCH_AHEAD + 1)
            r = rows[i]
            if M[M_HLIVE] > 0:
                hint_consume(M, HT, r)
            s = rm_get(RM, r)
            if s >= 0:
                M[M_HITS] += 1
                if s >= lo:
                    dhit(D, s)
            else:
                M[M_MISSES] += 1
                if dmiss(D, r) < 0:
                    M[M_BYPASS] += 1
            M[M_TICK] += 1
        return below
    ahead = 0  # rows[:ahead] prefetched
    for i in range(nb):
        if dkind == CACHED and ahead < rows.size:
            nxt = min(bounds[i + 1] + PREFETCH_AHEAD, rows.size)
            _prefetch_rows(D[1], D[10], rows, ahead, nxt)
            ahead = nxt
        if lookahead > 0 and i + lookahead < nb:
            announce(dkind, D, hkind, H, rows[bounds[i + lookahead]:bounds[i + lookahead + 1]])
        b = rows[bounds[i]:bounds[i + 1]]
        n_dl, m, n_hl = lookup(dhit, dmiss, dkind, D, hhit, hmiss, hkind, H, b, d_slot, d_code, d_leased, need, need_of, h_slot, h_code,
                               h_leased, hkind != NONE)
        below += m
        if dkind == CACHED:
            finish(D, d_leased, n_dl)
        if hkind == CACHED:
            finish(H, h_leased, n_hl)
    return below


