"""Shared structures of the cache kernels: slot queues, ghost queues, an indexed heap, the
free-slot stack, row <-> slot mapping (over rowmap.py's hash map) and a hash. Every policy builds on these; none of
them knows a policy. Compiled (numba, no GIL); O(1) per operation except the heap (log).

Leases and victim searches: a policy's victim is the first *unleased* slot of a queue, or
the unleased heap slot with the smallest key. A lookup's own slots are leased until it
ends, and they gather where the searches start (the front of a FIFO whose hits do not move
slots, the coldest heap keys of rows it just admitted), so a plain search steps over all of
them for every miss: O(k^2) per lookup of k ids (65 s for 65,536 ids with ``default`` and
a profile filling the tier, 2,000-12,000 steps per id past a tier's capacity for
``s3fifo``, ``arc``, ``wtinylfu``). Leases only grow until a lookup ends (``finish`` or
``abort``, which call ``lookup_end``), so the leased front found once stays leased:

- ``q_first_free`` remembers the last slot of each queue's leased front (``M[M_QSCAN + q]``)
  and resumes after it; ``q_unlink`` keeps it valid.
- ``h_top_free`` parks leased heap tops in the queue ``Q_HPARK`` (off the heap, keys kept)
  until the lookup ends; the victim is the same, the unleased slot with the smallest key.

Each leased entry is stepped over (or parked and put back) at most once per lookup; ``M_SCAN``
counts these steps and the candidates a policy re-queues (tests bound it per id)."""

from __future__ import annotations

import numpy as np

from ..jit import kernel
from .layout import (G_NEXT, G_PREV, G_QID, G_ROW, K_HEAP, K_HPOS, K_KEY, L_NEXT, L_PREV,
                     L_QID, M_CAP, M_EVICT, M_GCAP, M_GFREE, M_GHEAD, M_GQLEN, M_HEAPN, M_INSERT, M_NFREE,
                     M_GNEW, M_QLEN, M_QSCAN, M_SCAN, NQ, Q_HPARK)
from .rowmap import rm_del_if, rm_get, rm_set

# ---------------------------------------------------------------------------------------------
# circular doubly linked lists in rows ``nxt``/``prv`` of an array, one sentinel per list at
# index ``h`` (the slot queues in L and the ghost queues in GH are both made of these)
# ---------------------------------------------------------------------------------------------


@kernel(inline=True)
def _link_back(A, nxt, prv, h, x):  # pragma: no cover - compiled
    """Append x at the back of the list whose sentinel is h."""
    p = A[prv, h]
    A[nxt, p] = x
    A[prv, x] = p
    A[nxt, x] = h
    A[prv, h] = x


@kernel(inline=True)
def _unlink(A, nxt, prv, x):  # pragma: no cover - compiled
    p = A[prv, x]
    n = A[nxt, x]
    A[nxt, p] = n
    A[prv, n] = p


@kernel(inline=True)
def _first(A, nxt, h):  # pragma: no cover - compiled
    """The oldest entry of the list whose sentinel is h, -1 if empty."""
    x = A[nxt, h]
    return -1 if x == h else x


@kernel(inline=True)
def _init_sentinels(A, nxt, prv, first):  # pragma: no cover - compiled
    """Every index from ``first`` on is the sentinel of an empty list."""
    for h in range(first, A.shape[1]):
        A[nxt, h] = h
        A[prv, h] = h


# ---------------------------------------------------------------------------------------------
# slot queues: the lists of L, sentinel of queue q at index cap + q
# ---------------------------------------------------------------------------------------------


@kernel
def q_init(M, L):  # pragma: no cover - compiled
    _init_sentinels(L, L_NEXT, L_PREV, M[M_CAP])
    q_scan_reset(M, L)


@kernel
def q_scan_reset(M, L):  # pragma: no cover - compiled
    """Forget every queue's leased front (leases were released)."""
    for q in range(NQ):
        M[M_QSCAN + q] = -1


@kernel
def q_push(M, L, q, s):  # pragma: no cover - compiled
    """Append slot s at the back (most recent end) of queue q."""
    _link_back(L, L_NEXT, L_PREV, M[M_CAP] + q, s)
    L[L_QID, s] = q
    M[M_QLEN + q] += 1


@kernel
def q_unlink(M, L, s):  # pragma: no cover - compiled
    q = L[L_QID, s]
    h = M[M_CAP] + q
    if M[M_QSCAN + q] == s:  # the leased front now ends one slot earlier
        p = L[L_PREV, s]
        M[M_QSCAN + q] = -1 if p == h else p
    _unlink(L, L_NEXT, L_PREV, s)
    L[L_QID, s] = -1
    M[M_QLEN + q] -= 1


@kernel
def q_to_back(M, L, q, s):  # pragma: no cover - compiled
    """Move slot s (in any queue) to the back of queue q."""
    q_unlink(M, L, s)
    q_push(M, L, q, s)


@kernel
def q_front(M, L, q):  # pragma: no cover - compiled
    """Oldest slot of queue q, -1 if empty."""
    return _first(L, L_NEXT, M[M_CAP] + q)


@kernel
def q_after(M, L, s):  # pragma: no cover - compiled
    """The slot after s in its queue (toward the back), -1 at the end."""
    n = L[L_NEXT, s]
    return -1 if n >= M[M_CAP] else n


@kernel
def q_first_free(M, L, ref, q):  # pragma: no cover - compiled
    """Oldest unleased slot of queue q, -1 if all are leased. Starts after the queue's known
    leased front (every slot up to ``M[M_QSCAN + q]`` is leased until ``lookup_end``)."""
    c = M[M_QSCAN + q]
    s = q_front(M, L, q) if c < 0 else q_after(M, L, c)
    while s >= 0 and ref[s] > 0:
        M[M_SCAN] += 1
        M[M_QSCAN + q] = s
        s = q_after(M, L, s)
    return s


# ---------------------------------------------------------------------------------------------
# free slots and the row <-> slot map
# ---------------------------------------------------------------------------------------------


@kernel
def take_free(M, L):  # pragma: no cover - compiled
    """The lowest never-used slot, -1 when none is left. A slot is never freed again (an
    evicted one is reused at once by whoever evicted it; an aborted fill leaves a hole in
    its queue), so the free slots are always [CAP - NFREE, CAP): a counter, no stack."""
    n = M[M_NFREE]
    if n == 0:
        return -1
    M[M_NFREE] = n - 1
    return M[M_CAP] - n


@kernel
def place(M, RM, ros, s, r):  # pragma: no cover - compiled
    """Row r now lives in slot s (its bytes are the caller's job)."""
    rm_set(RM, r, s)
    ros[s] = r
    M[M_INSERT] += 1


@kernel
def unmap(M, RM, ros, s):  # pragma: no cover - compiled
    """Evict slot s's row from the map; returns the row (-1: the slot held none, a hole
    left by an aborted fill, which is simply reused)."""
    r = ros[s]
    if r >= 0:
        rm_del_if(RM, r, s)
        ros[s] = -1
        M[M_EVICT] += 1
    return r


# ---------------------------------------------------------------------------------------------
# ghost queues: exact memory of evicted rows (the row map holds -2 - g for row r)
# ---------------------------------------------------------------------------------------------


@kernel
def g_of(RM, r):  # pragma: no cover - compiled
    """Ghost entry remembering row r, -1 if none."""
    v = rm_get(RM, r)
    return -2 - v if v <= -2 else -1


@kernel
def g_queue(GH, g):  # pragma: no cover - compiled
    return GH[G_QID, g]


@kernel
def g_remove(M, GH, RM, g):  # pragma: no cover - compiled
    q = GH[G_QID, g]
    _unlink(GH, G_NEXT, G_PREV, g)
    r = GH[G_ROW, g]
    rm_del_if(RM, r, -2 - g)
    GH[G_QID, g] = -1
    M[M_GQLEN + q] -= 1
    GH[G_NEXT, g] = M[M_GHEAD]  # first on the free list: reused next (LIFO, as the stack was)
    M[M_GHEAD] = g
    M[M_GFREE] += 1


@kernel
def g_front(M, GH, q):  # pragma: no cover - compiled
    return _first(GH, G_NEXT, M[M_GCAP] + q)


@kernel
def g_add(M, GH, RM, q, r, limit):  # pragma: no cover - compiled
    """Remember row r at the back of ghost queue q, forgetting q's oldest past ``limit``."""
    if M[M_GCAP] == 0 or limit <= 0:
        return
    while M[M_GQLEN + q] >= limit:
        g_remove(M, GH, RM, g_front(M, GH, q))
    if M[M_GFREE] == 0:
        return
    M[M_GFREE] -= 1
    g = g_next_free(M, GH)
    if g == M[M_GHEAD]:
        M[M_GHEAD] = GH[G_NEXT, g]
    else:
        M[M_GNEW] = g + 1
    _link_back(GH, G_NEXT, G_PREV, M[M_GCAP] + q, g)
    GH[G_ROW, g] = r
    GH[G_QID, g] = q
    M[M_GQLEN + q] += 1
    rm_set(RM, r, -2 - g)


@kernel
def g_next_free(M, GH):  # pragma: no cover - compiled
    """The free entry ``g_add`` takes next (M[M_GFREE] > 0): the last one freed, else the
    lowest never used. The same order as one list of every free entry (freed ones pushed in
    front of the never-used 0, 1, ..., gcap - 1), without writing that list at open: 8 bytes
    an entry of fresh memory (``g_init``), ~0.5 s at 60M slots."""
    g = M[M_GHEAD]
    return g if g >= 0 else M[M_GNEW]


@kernel
def g_init(M, GH):  # pragma: no cover - compiled
    """Empty ghost queues; every entry free and never used (no entry is written)."""
    gcap = M[M_GCAP]
    _init_sentinels(GH, G_NEXT, G_PREV, gcap)
    M[M_GHEAD] = -1
    M[M_GNEW] = 0
    M[M_GFREE] = gcap


# ---------------------------------------------------------------------------------------------
# indexed min-heap of slots by K[K_KEY] (ties: lower slot first)
# ---------------------------------------------------------------------------------------------


@kernel
def _h_less(K, a, b):  # pragma: no cover - compiled
    ka = K[K_KEY, a]
    kb = K[K_KEY, b]
    return ka < kb or (ka == kb and a < b)


@kernel
def _h_swap(K, i, j):  # pragma: no cover - compiled
    a = K[K_HEAP, i]
    b = K[K_HEAP, j]
    K[K_HEAP, i] = b
    K[K_HEAP, j] = a
    K[K_HPOS, b] = i
    K[K_HPOS, a] = j


@kernel
def _h_up(K, i):  # pragma: no cover - compiled
    while i > 0:
        p = (i - 1) >> 1
        if _h_less(K, K[K_HEAP, i], K[K_HEAP, p]):
            _h_swap(K, i, p)
            i = p
        else:
            break


@kernel
def _h_down(M, K, i):  # pragma: no cover - compiled
    n = M[M_HEAPN]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _h_less(K, K[K_HEAP, c + 1], K[K_HEAP, c]):
            c += 1
        if _h_less(K, K[K_HEAP, c], K[K_HEAP, i]):
            _h_swap(K, i, c)
            i = c
        else:
            break


@kernel
def h_push(M, K, s, key):  # pragma: no cover - compiled
    K[K_KEY, s] = key
    i = M[M_HEAPN]
    M[M_HEAPN] = i + 1
    K[K_HEAP, i] = s
    K[K_HPOS, s] = i
    _h_up(K, i)


@kernel
def h_update(M, K, s, key):  # pragma: no cover - compiled
    """Change slot s's key (s is in the heap)."""
    old = K[K_KEY, s]
    K[K_KEY, s] = key
    i = K[K_HPOS, s]
    if key < old:
        _h_up(K, i)
    else:
        _h_down(M, K, i)


@kernel
def h_remove(M, K, s):  # pragma: no cover - compiled
    i = K[K_HPOS, s]
    last = M[M_HEAPN] - 1
    M[M_HEAPN] = last
    K[K_HPOS, s] = -1
    if i != last:
        t = K[K_HEAP, last]
        K[K_HEAP, i] = t
        K[K_HPOS, t] = i
        _h_up(K, i)
        _h_down(M, K, K[K_HPOS, t])


@kernel
def h_top_free(M, K, L, ref):  # pragma: no cover - compiled
    """The unleased heap slot with the smallest key, -1 if there is none. Leased tops are
    parked (queue ``Q_HPARK``, keys kept) until the lookup ends: each at most once."""
    while M[M_HEAPN] > 0:
        s = K[K_HEAP, 0]
        if ref[s] == 0:
            return s
        h_remove(M, K, s)
        q_push(M, L, Q_HPARK, s)
        M[M_SCAN] += 1
    return -1


@kernel
def h_unpark(M, K, L):  # pragma: no cover - compiled
    """Every parked slot back on the heap with its key (its lease may be gone)."""
    s = q_front(M, L, Q_HPARK)
    while s >= 0:
        nxt = q_after(M, L, s)
        q_unlink(M, L, s)
        h_push(M, K, s, K[K_KEY, s])
        M[M_SCAN] += 1
        s = nxt


@kernel
def lookup_end(T):  # pragma: no cover - compiled
    """Leases were released (walk.finish/abort): the leased fronts and parked slots go."""
    M, K, L = T[0], T[5], T[6]
    q_scan_reset(M, L)
    if M[M_QLEN + Q_HPARK] > 0:
        h_unpark(M, K, L)


# ---------------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------------


@kernel
def mix64(r, seed):  # pragma: no cover - compiled
    """A well-mixed 64-bit hash of row r (splitmix64 finaliser); take the top bits."""
    x = np.uint64(r) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    x ^= x >> np.uint64(29)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(32)
    return x


@kernel
def bucket(r, seed, shift):  # pragma: no cover - compiled
    return np.int64(mix64(r, seed) >> np.uint64(shift))
