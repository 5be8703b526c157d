"""The compiled walk driven from Python: one lookup's bookkeeping through both cache tiers.

The store's ``Table`` (which moves the bytes) and the simulator's event replay
(``tierstore.analysis.simulate.replay_events``) both go through :class:`Walker`, so the per-lookup
buffers, the entry point and the end of a lookup exist once. Not thread-safe: the caller
holds the tiers' locks around ``begin``, ``end`` and ``announce``.
"""

from __future__ import annotations

import threading

import numpy as np

from . import walk
from .index import CacheIndex, none_index
from ..jit import specialized
from .layout import CACHED, NONE

_EMPTY_I64 = np.empty(0, np.int64)  # ``begin`` without a slab to copy from

__all__ = ["Lookup", "Walker"]


_NO_LIMIT = int(np.iinfo(np.int64).max)  # announce's range when the caller checked the ids


class Lookup:
    """One lookup between its bookkeeping (``Walker.begin``) and its end: the walk's per-id
    outputs (tierstore.cache.walk.lookup) and how many leases each tier holds for it."""

    __slots__ = ("d_slot", "d_leased", "need", "need_of", "h_slot", "h_leased", "d_code", "h_code",
                 "n_dl", "m", "n_hl", "done")

    def __init__(self, n: int):
        w64 = np.empty((6, n), np.int64)  # two allocations, not eight
        codes = np.empty((2, n), np.int8)
        self.d_slot, self.d_leased, self.need, self.need_of, self.h_slot, self.h_leased = w64
        self.d_code, self.h_code = codes
        self.n_dl = self.m = self.n_hl = 0
        self.done = False  # ended by ``begin`` itself: every row was copied out of the device slab

    @property
    def on_device(self) -> bool:
        """Every row is in the device tier now: completing it is one gather."""
        return self.m == 0


class Walker:
    """The walk bound to a device tier and a host tier of the given kinds (NONE, CACHED,
    RESIDENT); ``dev``/``host`` are their indexes (used only when CACHED: a disabled or
    resident tier is represented by a stand-in of the right types)."""

    def __init__(self, dev: CacheIndex | None, dkind: int, host: CacheIndex | None, hkind: int):
        self._d = dev if dkind == CACHED else none_index()
        self._h = host if hkind == CACHED else none_index()
        self.dkind, self.hkind = dkind, hkind
        self._bind()
        self._entry = None  # walk.walk_entry's compiled entry point for these policies (on first use)
        self._hits = self._copy = None  # the device policy's all_hits (walk.all_hits_with) and walk.copy_rows
        self._announce = None  # walk.announce's (on first use)
        # the one tier that hears hints when only one is cached (walk.announce: a resident device
        # tier hides the host tier, an absent one does not): 0 device, 1 host, None both (or none)
        self._one = 0 if dkind == CACHED and hkind != CACHED else 1 if dkind == NONE and hkind == CACHED else None
        self._hints_on = False  # both hint tables at their full size (they never shrink): _hints_ready done
        self._ends: dict[tuple[int, bool], object] = {}
        self._spare = threading.local()  # per thread: the arrays of its last lookup that begin ended  # walk.finish/abort entry points per tier (on first use)

    def _bind(self) -> None:
        """Take up the indexes' current state tuples (an index replaces its tuple when it
        allocates its hint table: CacheIndex.hint_table); same types, same entry point."""
        d, h = self._d, self._h
        self.dstate, self.hstate = d.state, h.state
        self.args = (*d.hooks, self.dkind, d.state, *h.hooks, self.hkind, h.state)

    def _current(self) -> None:
        if self._d.state is not self.dstate or self._h.state is not self.hstate:
            self._bind()

    def _hints_ready(self) -> None:
        """Before anything that may add hints: both tiers' hint tables at their full size."""
        if self._d.hint_table() | self._h.hint_table():
            self._bind()
        self._current()

    def begin(self, ids: np.ndarray, slab: np.ndarray | None = None, out: np.ndarray | None = None) -> Lookup:
        """Run ``ids`` (C-contiguous int64) through both tiers; the lookup's leases hold
        until ``end``. With ``slab`` and ``out`` (uint8 ``[*, row bytes]`` views of the device
        tier's slab in host memory and of the output, ``len(ids)`` rows): when the device
        tier serves every id, the rows are copied into ``out`` and the lookup ended by two
        compiled calls (the device policy's ``all_hits``, tried first, then ``walk.copy_rows``:
        ``lk.done``; the caller holds the device tier's lock); otherwise the walk runs
        (``walk.walk_entry``)."""
        self._current()
        gather = slab is not None and out is not None
        # a lookup begin ends (done) leaves its arrays behind: the thread's next one of the
        # same size reuses them (a decode step's lookups are all one size); one that goes on
        # keeps them, and the thread allocates anew
        lk = getattr(self._spare, "lk", None) if gather else None
        if lk is None or lk.d_slot.size != ids.size:
            lk = Lookup(ids.size)
        else:
            self._spare.lk = None
        if gather and self.dkind == CACHED:  # the decode path: its own small compiled call
            hargs = (self.dstate, ids, lk.d_slot)
            if self._hits is None:  # the policy's own kernel: its ``hit`` inlined, not an argument
                self._hits = specialized(self._d.all_hits, *hargs)
                self._copy = specialized(walk.copy_rows, slab, lk.d_slot, out)
            if self._hits(*hargs):
                self._copy(slab, lk.d_slot, out)
                lk.n_dl = lk.m = lk.n_hl = 0
                lk.done = True
                self._spare.lk = lk
                return lk
        args = (*self.args, ids, lk.d_slot, lk.d_code, lk.d_leased, lk.need, lk.need_of, lk.h_slot, lk.h_code,
                lk.h_leased)
        if self._entry is None:
            self._entry = specialized(walk.walk_entry, *args)
        lk.n_dl, lk.m, lk.n_hl = self._entry(*args)
        lk.done = False
        return lk

    def end(self, lk: Lookup, ok: bool = True) -> None:  # finish/abort never read the hint table
        """End a lookup: its FILL slots hold their bytes (``ok``) or are dropped; leases
        released. A lookup ``begin`` already ended (``lk.done``) has nothing left to end."""
        if lk.done:
            return
        if self.dkind == CACHED:
            self._end(0, ok)(self.dstate, lk.d_leased, lk.n_dl)
        if self.hkind == CACHED:
            self._end(1, ok)(self.hstate, lk.h_leased, lk.n_hl)

    def _end(self, tier: int, ok: bool):
        """walk.finish (``ok``) or walk.abort for tier 0 (device) or 1 (host): its compiled
        entry point, fetched once (numba's type dispatch of the state tuple costs more than
        the call)."""
        fn = self._ends.get((tier, ok))
        if fn is None:
            state = self.dstate if tier == 0 else self.hstate
            fn = self._ends[tier, ok] = specialized(walk.finish if ok else walk.abort, state, _EMPTY_I64, 0)
        return fn

    def announce(self, ids: np.ndarray, rows: int = -1) -> int:
        """Hints (``Store.hint``): the device tier hears every id, the host tier the rest.
        ``rows`` >= 0: the ids are checked against ``[0, rows)`` in the same compiled call
        (``walk.announce_checked``); returns the first position out of range, having
        announced nothing, or -1."""
        if self._hints_on:  # a decode step's hint: ~0.5 us of Python less than asking both indexes
            if self._d.state is not self.dstate or self._h.state is not self.hstate:  # _current, inlined
                self._bind()
        else:
            self._hints_ready()
            self._hints_on = True
        if rows < 0:
            rows = _NO_LIMIT
        if self._one is not None:  # one cached tier: its counters and hint table, not both state tuples
            state = self.dstate if self._one == 0 else self.hstate
            args = (state[0], state[9], ids, rows)
        else:
            args = (self.dkind, self.dstate, self.hkind, self.hstate, ids, rows)
        if self._announce is None:  # numba's type dispatch of the state tuples costs more than a short call
            fn = walk.announce_checked if self._one is None else walk.announce_one_checked
            self._announce = specialized(fn, *args)
        return self._announce(*args)

    def replay(self, rows: np.ndarray, bounds: np.ndarray, lookahead: int = 0) -> int:
        """Every batch of a trace through ``begin`` + ``end`` (compiled, one call); returns the
        rows requested from below the device tier (see ``walk.replay``)."""
        if lookahead > 0:
            self._hints_ready()
        self._current()
        return int(walk.replay(*self.args, rows, bounds, lookahead))
