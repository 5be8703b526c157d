"""One cache tier's bookkeeping: which table rows sit in which of its slots, and its policy.

A tier owns a slab of ``capacity`` row slots and copies bytes; this index says where rows
are, counts hits and misses, and runs its policy, all in compiled kernels over the state
arrays of tierstore.cache.layout (no Python per access, no GIL held). Memory: 14-100 bytes
per *slot* by policy (``state_bytes``; lru, static and wtinylfu within issue 19's 32), nothing per
*table* row (the row -> slot map is a hash table sized to the
cache, tierstore.cache.rowmap; a profile is read once and only its top ``capacity`` kept).

Semantics: accesses are processed one at a time, in order (tierstore.cache.walk states the
one rule for repeats inside a lookup). Not thread-safe: the owning tier holds its lock
around every call.
"""

from __future__ import annotations

import sys

import numpy as np

from ..errors import CapacityError, TierStoreError
from ..ids import as_row_ids, distinct
from . import walk
from .layout import (CACHED, NONE, K_HPOS, L_QID, M_BYPASS, M_CAP, M_EPWRAP, M_EVICT, M_GCAP, M_HINTS, M_HITS,
                     M_HORIZON, M_REFMAX, M_INSERT, M_LO, M_MISSES, M_NFREE, M_NROWS, M_RANKM, HT_ROWS, NG, NM, NQ)
from .policy import Policy
from .registry import PolicySpec, make_policy
from ..ranking import Profile, as_profile
from ..jit import specialized
from .mapbuild import build_map, empty_map
from .rankmap import rank_map_bytes, ranked_map
from .rowmap import EMPTY, map_bytes, rm_get_many
from .structs import g_init, q_init

__all__ = ["CacheIndex", "MAX_SLOTS", "none_index", "state_bytes", "slots_within", "rows_within", "budget_for"]

_EMPTY = np.empty(0, dtype=np.int64)
# The most slots a tier may have: slots and ghost entries are int32 (in the row map's 32-bit
# values, -2 - g for ghost g; queue links run to cap + NQ), so cap + NQ < 2**31. A tier
# that large would hold 566 GB of 264-byte rows, past any table it caches (V4.1's are
# 384M rows: a budget that holds a table makes its tier resident, with no index).
MAX_SLOTS = 2**31 - 1 - NQ


class CacheIndex:
    """Row -> slot map of one cache tier with a registered policy.

    Args:
        n_rows: rows of the table (ids must lie in [0, n_rows), n_rows < 2**31).
        capacity: slots of the tier (rows it can hold), pinned core included.
        policy: a registered policy name (``tierstore.cache.policy_names()``), a
            :class:`~tierstore.cache.registry.PolicySpec` (name and parameters, built here
            for this capacity) or an unbound :class:`~tierstore.cache.policy.Policy` built
            for this capacity.
        pinned_rows: the static hot set, resident forever in slots [0, len). ``None`` lets
            the policy choose from ``profile`` (``static`` pins the top ``capacity`` rows,
            ``default`` a core fraction of them, the others nothing); ``[]`` pins nothing.
            A policy may also prefill evictable rows (``default``: its ranked core), so
            ``row_of_slot`` right after construction lists every row to load.
        profile: access counts: one per row (len ``n_rows``), a
            :class:`~tierstore.format.profile.TopProfile` (``load_profile(..., top=k)``) or a
            sparse ``(rows, counts)`` pair; read once here, only the policy's top rows kept.
        rng: seed or generator for the policy's hashing (determinism in tests).
        row_map: an existing row map (``tierstore.cache.rowmap``) to serve read-only (the
            shared host tier's); only with policy ``static`` and ``pinned_rows=[]``.

    Attributes: ``capacity``, ``size``, ``hits``, ``misses``, ``evictions``, ``insertions``,
    ``bypassed`` (cachetools' ``maxsize``/``currsize`` are aliases), ``slots_of(rows)``
    (the row map read: int32 per row, -1 absent, <= -2 a ghost entry; the tests' helpers
    add an indexing view and a dump of the map), ``row_of_slot`` (int64 per slot, -1 free),
    ``refcount`` (leases per slot), ``n_pinned``, ``state`` (the kernels' tuple).
    """

    def __init__(self, n_rows: int, capacity: int, policy: str | PolicySpec | Policy = "default", *,
                 pinned_rows: np.ndarray | None = None, profile: Profile | None = None,
                 rng: np.random.Generator | int | None = None, row_map: np.ndarray | None = None):
        if not isinstance(n_rows, (int, np.integer)) or n_rows < 0 or n_rows >= 2**31:
            raise TierStoreError(f"n_rows={n_rows!r} must be an integer in [0, 2**31)")
        if not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise TierStoreError(f"capacity={capacity!r} must be a non-negative integer")
        if capacity > MAX_SLOTS:
            raise CapacityError(
                f"capacity={capacity} slots is past a cache tier's {MAX_SLOTS} (its slot numbers, queue "
                f"links and ghost entries are int32: 32 bytes a slot at most, issue 19); that is "
                f"{MAX_SLOTS * 264 / 1e9:.0f} GB of 264-byte rows: give the tier a smaller budget")
        self.n_rows = int(n_rows)
        self.capacity = cap = int(capacity)
        if isinstance(policy, str):
            policy = make_policy(policy, cap, rng=rng)
        elif isinstance(policy, PolicySpec):
            policy = policy.build(cap, rng=rng)
        elif not isinstance(policy, Policy):
            raise TierStoreError(f"policy={policy!r} must be a policy name, a PolicySpec or a Policy instance")
        elif policy.capacity != cap:
            raise TierStoreError(f"policy was built for capacity {policy.capacity}, the index has {cap}")
        self.policy = policy
        suggested = policy.prepare(as_profile(profile, self.n_rows))
        if row_map is not None:
            if policy.name != "static" or pinned_rows is None or len(pinned_rows):
                raise TierStoreError("an external row_map is served read-only: policy 'static', pinned_rows=[]")
            pinned = _EMPTY
        elif pinned_rows is None:
            pinned = suggested
        else:
            pinned = self._as_rows(pinned_rows, what="pinned_rows")
            if distinct(pinned).size != pinned.size:
                raise TierStoreError("pinned_rows has duplicates; pass each row once")
        pinned = pinned[:cap]
        lo = int(pinned.size)
        n_dyn = cap - lo
        M = np.zeros(NM, np.int64)
        M[M_CAP], M[M_LO], M[M_NROWS] = cap, lo, self.n_rows
        ros = np.empty(cap, dtype=np.int32)  # rows < 2**31; each slot written once (``_place``)
        # a policy that admits nothing never leases or queues a slot (the walk reads ref,
        # ep and L only for slots past the pinned ones that hold a row): one-entry stand-ins
        per = cap if policy.admits else 1
        ref = np.zeros(per, dtype=policy.ref_dtype)  # leases <= M_REFMAX (walk.access)
        ep = np.zeros(per, dtype=policy.ep_dtype)  # epochs restart below M_EPWRAP (walk.access)
        M[M_REFMAX] = np.iinfo(ref.dtype).max
        M[M_EPWRAP] = walk.epoch_wrap(ep.dtype)
        K = np.zeros((policy.k_rows, cap) if policy.k_rows else (1, 1), dtype=policy.k_dtype)
        if policy.k_rows > K_HPOS:  # a heap's positions (wtinylfu's one row of K is its queue bytes)
            K[K_HPOS] = -1
        L = np.zeros((policy.l_rows, cap + NQ if policy.admits else 1), dtype=np.int32)
        if policy.l_rows > L_QID:  # wtinylfu keeps its slots' queues in K
            L[L_QID] = -1
        gcap = int(policy.ghost_size(n_dyn))
        M[M_GCAP] = gcap
        GH = np.zeros((NG, gcap + NQ), dtype=np.int32)  # rows < 2**31, entry indexes
        SK = np.zeros(max(1, int(policy.sketch_bytes(n_dyn))), dtype=np.uint8)
        # the hint table: one empty bucket until the first hint (``_hint_table``), so a
        # store that never hints pays nothing for it (but a budget counts it: state_bytes)
        self._hint_buckets = _hint_buckets(policy, n_dyn)
        if policy.uses_hints:
            M[M_HINTS] = 1
            M[M_HORIZON] = max(4 * cap, 1 << 20)
        HT = np.zeros((HT_ROWS, 1), dtype=np.int64)
        rk_rows, rk_ranks = policy.ranked()  # rows < 2**31, ranks < capacity
        RK, dups = ranked_map(rk_rows, rk_ranks)  # row -> rank, a hash table (rankmap.py)
        policy.ranked_duplicates(dups)
        M[M_RANKM] = rk_rows.size
        # every key is a slot's row or a ghost entry's: cap + gcap keys at most
        RM = empty_map(cap + gcap) if row_map is None else row_map
        # pinned rows in slots [0, lo) (mapped by ``_place``, with the prefill); the free slots
        # [lo, cap) are taken lowest first
        M[M_NFREE] = n_dyn
        if row_map is not None:  # read-only map: every mapped row is a (pinned) hit
            M[M_LO] = cap
            M[M_NFREE] = 0
        self.state = (M, RM, ros, ref, ep, K, L, GH, SK, HT, RK)
        q_init(M, L)
        g_init(M, GH)
        policy.configure(M, n_dyn)
        policy.init(self.state)
        self.row_map, self.row_of_slot, self.refcount = RM, ros, ref
        self.n_pinned = lo
        mod = sys.modules[type(policy).__module__]  # the policy's kernels: walk arguments
        self.hooks = (mod.hit, mod.miss)
        self.all_hits = mod.all_hits  # the decode path's accesses, ``hit`` inlined (walk.all_hits_with)
        self._access = None
        pre = policy.prefill() if n_dyn else _EMPTY
        pre = self._as_rows(pre, what="the policy's prefill rows") if pre.size else _EMPTY
        k = _place(M, RM, ros, pinned, pre if row_map is None else _EMPTY)
        if k >= 0:  # pinned and prefill rows mapped at once: the hooks of the k placed rows
            if k:
                walk.prefill_placed(mod.prefill, self.state, pre[:k], lo, policy.prefill_rank())
        else:  # a prefill row repeats a pinned or an earlier one: one at a time, as ever
            walk.prefill(mod.prefill, self.state, pre, policy.prefill_rank())
        if pre.size:
            policy.after_prefill(self.state)
        self.reset_stats()

    # --- statistics ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Rows held, pinned core included (slots not on the free stack)."""
        M = self.state[0]
        return int(M[M_CAP] - M[M_NFREE])

    maxsize = property(lambda self: self.capacity, doc="cachetools name of ``capacity``")
    currsize = property(lambda self: self.size, doc="cachetools name of ``size``")
    hits = property(lambda self: int(self.state[0][M_HITS]))
    misses = property(lambda self: int(self.state[0][M_MISSES]))
    evictions = property(lambda self: int(self.state[0][M_EVICT]))
    insertions = property(lambda self: int(self.state[0][M_INSERT]))
    bypassed = property(lambda self: int(self.state[0][M_BYPASS]))

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict[str, int | float | str]:
        return {"policy": self.policy.name, "capacity": self.capacity, "size": self.size,
                "pinned": self.n_pinned, "hits": self.hits, "misses": self.misses,
                "hit_ratio": self.hit_ratio, "evictions": self.evictions,
                "insertions": self.insertions, "bypassed": self.bypassed}

    def reset_stats(self) -> None:
        self.state[0][[M_HITS, M_MISSES, M_EVICT, M_INSERT, M_BYPASS]] = 0

    # --- accesses -----------------------------------------------------------------------
    def access(self, rows: np.ndarray, *, trusted: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Process ``rows`` in order (tierstore.cache.walk): returns (slots, codes, leased).
        Codes: ``HIT`` (bytes in the slot), ``FILL`` (admitted now: write its bytes),
        ``BELOW`` (slot -1: read it from below). End with ``finish(leased)`` once the FILL
        slots are written, or ``abort(leased)`` if they never will be.
        ``trusted``: ``rows`` is a flat int64 array of valid ids (checked by the caller)."""
        if not trusted:
            rows = self._as_rows(rows)
        n = rows.size
        slots = np.empty(n, np.int64)
        codes = np.empty(n, np.int8)
        leased = np.empty(n, np.int64)
        if self._access is None:
            self._access = specialized(walk.access, *self.hooks, self.state, rows, slots, codes, leased)
        nl = self._access(*self.hooks, self.state, rows, slots, codes, leased)
        return slots, codes, leased[:nl]

    def finish(self, leased: np.ndarray) -> None:
        walk.finish(self.state, leased, leased.size)

    def abort(self, leased: np.ndarray) -> None:
        walk.abort(self.state, leased, leased.size)

    def lookup(self, rows: np.ndarray, *, trusted: bool = False) -> np.ndarray:
        """Access ``rows`` and end the lookup at once (no bytes involved, as a simulator
        does): slots after the lookup, -1 where the row bypassed the tier."""
        slots, _, leased = self.access(rows, trusted=trusted)
        self.finish(leased)
        return slots

    def hint(self, rows: np.ndarray) -> None:
        """Rows a later lookup will read (the known future): policies that use hints keep them."""
        if self.state[0][M_HINTS]:
            self.hint_table()
            walk.announce(CACHED, self.state, NONE, self.state, self._as_rows(rows))

    def hint_table(self) -> bool:
        """Allocate the hint table at its full size before the first hint (it is one bucket
        until then); returns whether ``state`` was replaced by a new tuple, which every holder
        of the old one must take up (``Walker`` checks before each call). Call it before
        anything that may add hints (``walk.announce``, ``walk.replay`` with lookahead)."""
        HT = self.state[9]
        if HT.shape[1] >= self._hint_buckets:
            return False
        nh = self._hint_buckets
        self.state = (*self.state[:9], np.zeros((HT_ROWS, nh), dtype=np.int64), *self.state[10:])
        return True

    @property
    def nbytes(self) -> int:
        """Bytes of the tier's bookkeeping: every state array, the row map included."""
        return sum(a.nbytes for a in self.state)

    @property
    def max_nbytes(self) -> int:
        """The most ``nbytes`` can grow to (``state_bytes``): what a budget sets aside for it."""
        return state_bytes(self.policy, self.capacity)

    def resident(self, rows: np.ndarray) -> np.ndarray:
        """Boolean mask: which rows are in the tier now (no counting, no policy update)."""
        return self.slots_of(rows) >= 0

    # --- the row map -----------------------------------------------------------------------
    def slots_of(self, rows: np.ndarray) -> np.ndarray:
        """int32 per row: its slot, -1 absent, ``-2 - g`` remembered by ghost entry g (no
        counting, no policy update)."""
        rows = self._as_rows(rows)
        out = np.empty(rows.size, np.int64)
        rm_get_many(self.state[1], rows, out)
        return out.astype(np.int32)

    # --- validation --------------------------------------------------------------------------
    def _as_rows(self, rows: np.ndarray, *, what: str = "a cache index") -> np.ndarray:
        """``rows`` flat as int64, validated by the one id validator (tierstore.ids): no copy
        when they already are (the index is done with them before returning)."""
        return as_row_ids(rows, self.n_rows, where=what, copy=False)[0]


def _place(M: np.ndarray, RM: np.ndarray, ros: np.ndarray, pinned: np.ndarray, pre: np.ndarray) -> int:
    """Map the pinned rows to slots [0, lo) and the policy's prefill rows to the next free
    slots, as many as there are (``walk.prefill`` placing them one at a time, lowest slot
    first, after the pinned rows), with one ``build_map`` of both (threads, no random write
    into the map: the prefill's one-by-one inserts were ~30 ns a row at 40M slots, the
    largest part of ``default``'s open). Writes every slot of ``ros`` once (-1: free).
    Returns how many prefill rows were placed, or -1 when they were not: a prefill row
    repeats a pinned or an earlier prefill row (``walk.prefill`` skips it, so the slots
    differ); then only the pinned rows are mapped, the caller runs ``walk.prefill``. The map
    holds the same (row, slot) set either way (mapbuild: its layout is that set's)."""
    lo = pinned.size
    free = int(M[M_NFREE])
    k = min(pre.size, free)
    n = lo + k
    ros[:lo] = pinned
    ros[lo + k:] = -1
    dups = build_map(RM, _joined(pinned, pre[:k])) if n else 0  # row i -> slot i
    if k and dups:  # (repeated pinned rows alone are fine: the last one's slot, as ever)
        RM.fill(EMPTY)
        build_map(RM, pinned)
        ros[lo:] = -1
        return -1
    ros[lo:n] = pre[:k]
    M[M_NFREE] = free - k
    M[M_INSERT] += k
    return k


def _joined(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.concatenate([a, b])`` (int64), a view when ``b`` follows ``a`` in one buffer
    (``default``'s pinned and prefill rows are consecutive runs of its ranking): no copy."""
    if not a.size or not b.size:
        return b if a.size == 0 else a
    if (a.dtype == b.dtype == np.int64 and a.ndim == b.ndim == 1 and a.flags.c_contiguous and b.flags.c_contiguous
            and a.base is not None and a.base is b.base and a.ctypes.data + a.nbytes == b.ctypes.data):
        return np.lib.stride_tricks.as_strided(a, shape=(a.size + b.size,), strides=(8,), writeable=False)
    return np.concatenate([a, b]).astype(np.int64, copy=False)


def _hint_buckets(policy: Policy, n_dyn: int) -> int:
    """Buckets of the hint table once allocated: one per dynamic slot, at least 64 (hints.py)."""
    return max(64, int(n_dyn)) if policy.uses_hints else 1


def state_bytes(policy: str | PolicySpec | Policy, capacity: int) -> int:
    """The most bytes a :class:`CacheIndex` of ``capacity`` slots with this policy can hold in
    its state arrays (its ``nbytes``), whatever the profile and the hints: every slot dynamic
    (the ghosts at their largest), a ranking of ``capacity`` rows where the policy keeps one,
    the hint table allocated. Mirrors ``CacheIndex.__init__``'s shapes (a test holds them
    equal). O(1): no array is allocated."""
    cap = int(capacity)
    if isinstance(policy, str):
        policy = make_policy(policy, cap)
    elif isinstance(policy, PolicySpec):
        policy = policy.build(cap)
    gcap = int(policy.ghost_size(cap))
    i32 = 4
    k = policy.k_rows * cap * np.dtype(policy.k_dtype).itemsize if policy.k_rows else np.dtype(policy.k_dtype).itemsize
    per = cap if policy.admits else 1  # leases, lease markers, queue links (see __init__)
    return (NM * 8  # M
            + map_bytes(cap + gcap)  # RM
            + cap * i32  # ros
            + per * (np.dtype(policy.ref_dtype).itemsize + np.dtype(policy.ep_dtype).itemsize)  # ref, ep
            + k  # K
            + policy.l_rows * (cap + NQ if policy.admits else 1) * i32  # L
            + NG * (gcap + NQ) * i32  # GH
            + max(1, int(policy.sketch_bytes(cap)))  # SK
            + HT_ROWS * 8 * _hint_buckets(policy, cap)  # HT
            + (rank_map_bytes(cap) if policy.ranks else 0))  # RK


def slots_within(budget: int, row_bytes: int, policy: str | PolicySpec | Policy) -> int:
    """The most slots a cache tier of ``budget`` bytes holds when each slot costs its row's
    bytes *and* its share of the index's state: the largest c with ``c x row_bytes +
    state_bytes(policy, c) <= budget`` (0 when not even one slot fits). The bookkeeping is
    part of the budget (issue 19: a store's memory is its budgets plus a fixed allowance),
    so a budget buys fewer rows with a policy that keeps more state per slot."""
    budget, row_bytes = int(budget), max(1, int(row_bytes))
    if isinstance(policy, Policy):
        policy = PolicySpec(policy.name, policy.params)
    lo, hi = 0, min(budget // row_bytes, MAX_SLOTS)  # state_bytes grows with c: binary search
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid * row_bytes + state_bytes(policy, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def rows_within(budget: int, n_rows: int, row_bytes: int, policy: str | PolicySpec | Policy) -> int:
    """The rows a store's tier of ``budget`` bytes holds of an ``n_rows``-row table: the whole
    table when the budget holds its rows (a resident tier: no index, no bookkeeping), else
    ``slots_within``. The one rule ``Store`` sizes its tiers by and ``tierstore size`` reports."""
    if int(budget) >= int(n_rows) * int(row_bytes):
        return int(n_rows)
    return slots_within(budget, row_bytes, policy)


def budget_for(capacity: int, row_bytes: int, policy: str | PolicySpec | Policy) -> int:
    """The budget a cache tier needs to hold ``capacity`` rows: their bytes plus the index's
    state (``state_bytes``), the inverse of ``slots_within``. 0 for 0 rows. Tools that turn a
    hit target into bytes (``tierstore size``, the live replay) use it, so what they print is
    what a store opened with that budget holds."""
    c = int(capacity)
    if c <= 0:
        return 0
    if isinstance(policy, Policy):
        policy = PolicySpec(policy.name, policy.params)
    return c * max(1, int(row_bytes)) + state_bytes(policy, c)


_NONE: CacheIndex | None = None


def none_index() -> CacheIndex:
    """An index of the right types standing in for a disabled tier (the walk never reads it)."""
    global _NONE
    if _NONE is None:
        _NONE = CacheIndex(1, 0, "static", pinned_rows=_EMPTY)
    return _NONE
