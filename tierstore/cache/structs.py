"""Shared structures of the cache kernels: slot queues, ghost queues, an indexed heap, the
free-slot stack, row <-> slot mapping (over rowmap.py's hash map) and a hash. Every policy
builds on these; none of them knows a policy. Compiled (numba, no GIL); O(1) per operation except the heap (log)."""

from __future__ import annotations

import numpy as np

from ..jit import kernel
from .layout import (G_FREE, G_NEXT, G_PREV, G_QID, G_ROW, K_HEAP, K_HPOS, K_KEY, L_FREE, L_NEXT, L_PREV,
                     L_QID, M_CAP, M_EVICT, M_GCAP, M_GFREE, M_GQLEN, M_HEAPN, M_INSERT, M_NFREE, M_QLEN)
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


@kernel
def q_push(M, L, q, s):  # pragma: no cover - compiled
    """Append slot s at the back (most recent end) of queue q."""
    _link_back(L, L_NEXT, L_PREV, M[M_CAP] + q, s)
    L[L_QID, s] = q
    M[M_QLEN + q] += 1


@kernel
def q_unlink(M, L, s):  # pragma: no cover - compiled
    q = L[L_QID, s]
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
    """Oldest unleased slot of queue q, -1 if all are leased."""
    s = q_front(M, L, q)
    while s >= 0 and ref[s] > 0:
        s = q_after(M, L, s)
    return s


# ---------------------------------------------------------------------------------------------
# free slots and the row <-> slot map
# ---------------------------------------------------------------------------------------------


@kernel
def take_free(M, L):  # pragma: no cover - compiled
    n = M[M_NFREE]
    if n == 0:
        return -1
    M[M_NFREE] = n - 1
    return L[L_FREE, n - 1]


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
    GH[G_FREE, M[M_GFREE]] = g
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
    g = GH[G_FREE, M[M_GFREE]]
    _link_back(GH, G_NEXT, G_PREV, M[M_GCAP] + q, g)
    GH[G_ROW, g] = r
    GH[G_QID, g] = q
    M[M_GQLEN + q] += 1
    rm_set(RM, r, -2 - g)


@kernel
def g_init(M, GH):  # pragma: no cover - compiled
    gcap = M[M_GCAP]
    _init_sentinels(GH, G_NEXT, G_PREV, gcap)
    for g in range(gcap):
        GH[G_FREE, g] = gcap - 1 - g
        GH[G_QID, g] = -1
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
def h_min_free(M, K, ref):  # pragma: no cover - compiled
    """The unleased slot with the smallest key, -1 if every heap slot is leased. Walks the
    heap in key order (best-first over the implicit tree) only as far as leased slots go."""
    n = M[M_HEAPN]
    if n == 0:
        return -1
    s0 = K[K_HEAP, 0]
    if ref[s0] == 0:
        return s0
    # best-first search: a small frontier of heap positions ordered by key
    front = np.empty(64, np.int64)
    nf = 1
    front[0] = 0
    while nf > 0:
        b = 0
        for j in range(1, nf):
            if _h_less(K, K[K_HEAP, front[j]], K[K_HEAP, front[b]]):
                b = j
        i = front[b]
        nf -= 1
        front[b] = front[nf]
        s = K[K_HEAP, i]
        if ref[s] == 0:
            return s
        for c in (2 * i + 1, 2 * i + 2):
            if c < n:
                if nf == front.size:
                    bigger = np.empty(2 * nf, np.int64)
                    bigger[:nf] = front
                    front = bigger
                front[nf] = c
                nf += 1
    return -1


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
