"""Filling a cache tier's placed rows in the background, while lookups are served.

With ``warm="background"`` (``StoreOptions.warm``) open builds every tier's index exactly
as ``warm="open"`` does (the policy's placed rows: ``static``'s hot set, ``default``'s ranked
core) but returns before their bytes are in the slab. ``TierWarmth`` says which placed slots
still wait: ``pending`` (one byte per slot: sized by the budget, never by the table).

Correctness rests on three rules, all applied under the tier's lock:

1. A lookup never reads a pending slot. ``Table.begin`` (serve/table.py) runs the compiled
   walk unchanged, then reroutes every HIT on a pending slot: a host hit becomes a FILL
   (read from the row file, written into the slot), a device hit is served from the host
   slab (copied under the locks, when the host holds it loaded) or the row file, and written
   into its device slot. The policy sees exactly the accesses it would see warm.
2. A slot is no longer pending once a lookup that filled it ends (``clear``): the rows
   a lookup writes (FILL) are its own row's bytes, including a placed slot the walk evicted
   and gave to another row.
3. The loader (``warm_steps``, run by the store's one thread, serve/warm.py) reads a step
   of placed rows into a staging buffer *outside* the lock (the hot-set snapshot's
   ``read_into``, else the row file in file order; the device tier copies from the loaded
   host slab), then under the lock writes only the slots that are still pending **and**
   still map to the row it read (``commit``): a slot a lookup filled or the walk gave to
   another row is never overwritten. Slots a lookup holds stay put (leases, or pinned slots
   that are never evicted), and a pending slot is read by nobody, so the write races no
   reader; a lookup and the loader may both write the same pending slot, with the same bytes.

Errors: a snapshot page failing its check (``CorruptDataError``) or a read error drops the
snapshot and the rest loads from the row file; an error reading the row file stops the
loader for that tier: its pending slots then load on demand (rule 1). ``OpenStats`` says
which (``snapshot_error``, ``loader_error``) and how warm each tier is.

Kill safety: the warm-up only reads files (the snapshot and the row file) and writes
process memory; killing the process at any point leaves every file as it was.

Memory: ``pending`` (1 byte per slot), the placed slots and rows (16 bytes per placed slot,
as the open-time loader) and one staging step (``STEP_BYTES``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import CorruptDataError, StoreIOError, TierStoreError
from ..format.spec import PAGE_SIZE
from .hotset import OpenStats, TableSnapshot, host_slots, on_device, placed_run
from .page_reader import aligned_empty

if TYPE_CHECKING:
    from .base import Tier
    from .disk import DiskTier

__all__ = ["TierWarmth", "warm_steps", "loaded_slots", "STEP_BYTES"]

# bytes of rows per background step: the staging buffer, and the most copied under a lock at once
STEP_BYTES = 16 << 20


class TierWarmth:
    """Which of a cache tier's placed slots still wait for their bytes (module docstring).
    ``pending``, ``left`` and the counters change under the tier's lock only."""

    def __init__(self, tier: Tier):
        assert tier.index is not None
        ros, size = tier.index.row_of_slot, tier.index.size
        self.pending = np.zeros(tier.capacity, np.uint8)
        # the placed rows in slot order (rank order), as the index keeps them (int32: 4 bytes a
        # placed slot of fresh memory at open, not 16 as int64 slots and rows); a new index
        # filled its slots lowest first, so the slots are [0, size): no array of them
        if placed_run(ros, size):
            self._slots = None
            self._rows = ros[:size].copy()
            self.pending[:size] = 1
        else:
            self._slots = np.flatnonzero(ros >= 0)
            self._rows = ros[self._slots]
            self.pending[self._slots] = 1
        self.placed = len(self._rows)
        self.left = self.placed  # placed slots still pending
        self.stats = OpenStats(mode="background", placed=self.placed, pending=self.left, loading=1)
        self.t0 = time.perf_counter()

    def slots_at(self, idx: np.ndarray) -> np.ndarray:
        """The slots of placed entries ``idx`` (indices into the placed list), int64."""
        return idx.astype(np.int64) if self._slots is None else self._slots[idx].astype(np.int64, copy=False)

    def rows_at(self, idx: np.ndarray) -> np.ndarray:
        """The rows placed in entries ``idx``, int64."""
        return self._rows[idx].astype(np.int64)

    @property
    def slots(self) -> np.ndarray:
        """Every placed slot, int64, in slot order (``placed_slots``)."""
        return self.slots_at(np.arange(self.placed, dtype=np.int64))

    @property
    def rows(self) -> np.ndarray:
        """Every placed row, int64, in slot order."""
        return self._rows.astype(np.int64)

    def clear(self, slots: np.ndarray, *, on_demand: bool = True) -> None:
        """Slots ``slots`` hold their rows' bytes now (a lookup wrote them); caller holds the lock."""
        if self.left == 0 or not len(slots):
            return
        s = slots[self.pending[slots] != 0]
        if len(s):
            s = np.unique(s)
            self.pending[s] = 0
            self.left -= len(s)
            self.stats.pending = self.left
            if on_demand:
                self.stats.on_demand += len(s)

    def commit(self, tier: Tier, slots: np.ndarray, rows: np.ndarray, data: torch.Tensor) -> int:
        """Write ``data`` (rows ``rows``, for slots ``slots``) into the slots still pending and
        still mapped to those rows; the caller holds the tier's lock. Returns how many."""
        ros = tier.index.state[2]
        live = (self.pending[slots] != 0) & (ros[slots] == rows)
        k = np.flatnonzero(live)
        if len(k) == len(slots):
            tier.write(slots, on_device(data, tier.device))
        elif len(k):
            tier.write(slots[k], on_device(data.index_select(0, torch.from_numpy(k)), tier.device))
        self.pending[slots[k]] = 0
        self.left -= len(k)
        self.stats.pending = self.left
        self.stats.rows_loaded += len(k)
        return len(k)

    def unresolved(self, idx: np.ndarray) -> np.ndarray:
        """The entries of ``idx`` (indices into the placed lists) whose slots are still pending
        (read without the lock: a slot never becomes pending again, so skipping one that is
        not is always right; one that is gets its check again in ``commit``)."""
        return idx[self.pending[self.slots_at(idx)] != 0]


def loaded_slots(source: Tier | None, source_warmth: TierWarmth | None, rows: np.ndarray) -> np.ndarray:
    """Slot of each row in ``source`` with its bytes in place, -1 elsewhere (caller holds its lock)."""
    if source is None or source.slab is None:
        return np.full(len(rows), -1, np.int64)
    hs = host_slots(source, rows)
    if source_warmth is not None and source_warmth.left:
        held = hs >= 0
        hs[np.flatnonzero(held)[source_warmth.pending[hs[held]] != 0]] = -1
    return hs


def warm_steps(tier: Tier, warmth: TierWarmth, *, disk: DiskTier, locked: Callable[[], AbstractContextManager],
               source: Tier | None = None, source_warmth: TierWarmth | None = None,
               snapshot: TableSnapshot | None = None) -> Iterator[None]:
    """Load ``tier``'s pending placed rows, yielding after every step (the loader thread
    pauses or stops there): from ``source``'s loaded slab, then ``snapshot``, then ``disk``
    (module docstring). ``locked()`` takes the locks a commit needs (the device tier's and
    the host tier's, in the store's order). Errors are recorded in ``warmth.stats``."""
    st, info = warmth.stats, tier.info
    step = max(1, STEP_BYTES // max(1, info.row_bytes))
    t0 = time.perf_counter()  # this tier's loading starts (the device tier's after the host tier's)
    snap0 = snapshot.bytes_read if snapshot is not None else 0
    try:
        todo = np.arange(warmth.placed, dtype=np.int64)
        if source is not None and source.slab is not None and len(todo):
            rest = []
            for s in range(0, len(todo), step):
                sel = warmth.unresolved(todo[s: s + step])
                if not len(sel):
                    continue
                rows, slots = warmth.rows_at(sel), warmth.slots_at(sel)
                with locked():
                    hs = loaded_slots(source, source_warmth, rows)
                    got = np.flatnonzero(hs >= 0)
                    if len(got):
                        st.from_source += warmth.commit(tier, slots[got], rows[got], source.gather(hs[got]))
                rest.append(sel[hs < 0])
                yield
            todo = np.concatenate(rest) if rest else todo[:0]
        todo = warmth.unresolved(todo)
        if snapshot is not None and not snapshot.dropped and len(todo):
            try:
                todo = yield from _from_snapshot(tier, warmth, snapshot, todo, locked, step)
            except (CorruptDataError, StoreIOError) as e:  # the rest from the row file
                st.snapshot_error = str(e)
                snapshot.drop(str(e))
        todo = warmth.unresolved(todo)
        if len(todo):
            rows = warmth.rows_at(todo)
            todo = todo[np.argsort(rows if disk.pos is None else disk.pos.of(rows), kind="stable")]  # file order
            staged = torch.empty((min(step, len(todo)), info.dim), dtype=info.raw_dtype, device=disk.device)
            for s in range(0, len(todo), step):
                sel = warmth.unresolved(todo[s: s + step])
                if not len(sel):
                    continue
                buf = staged[: len(sel)]
                b0 = disk.bytes_read  # lookups read the row file too: count around this read only
                disk.read(warmth.rows_at(sel), buf)
                st.bytes_read += disk.bytes_read - b0
                with locked():
                    st.from_rows += warmth.commit(tier, warmth.slots_at(sel), warmth.rows_at(sel), buf)
                yield
    except (TierStoreError, OSError) as e:  # the row file failed: the rest loads on demand
        st.loader_error = f"{type(e).__name__}: {e}"
    finally:
        st.loading = 0
        if snapshot is not None:  # only the loader reads the snapshot after open
            st.bytes_read += snapshot.bytes_read - snap0
        st.seconds = time.perf_counter() - t0


def _from_snapshot(tier: Tier, warmth: TierWarmth, snapshot: TableSnapshot, todo: np.ndarray,
                   locked: Callable[[], AbstractContextManager], step: int):
    """The placed rows ``todo`` the snapshot holds, in rank order a step at a time (a run of
    consecutive ranks by ``read_into``, else ``read_rows``); returns those it does not hold.
    One reader thread reads step ``k + 1`` into the other staging buffer while this thread
    commits step ``k`` (only that thread touches the snapshot meanwhile)."""
    info, st = tier.info, warmth.stats
    pos = snapshot.positions(warmth.rows_at(todo))
    found = pos >= 0
    missing = todo[~found]
    want, pos = todo[found], pos[found]
    order = np.argsort(pos, kind="stable")
    want, pos = want[order], pos[order]
    starts = list(range(0, len(want), step))
    pages = -(-min(step, len(want)) * info.row_bytes // PAGE_SIZE) + 1
    staging = [aligned_empty(pages).reshape(-1) for _ in range(min(2, len(starts)))]

    def fetch(k: int) -> np.ndarray | None:
        sel, p = want[starts[k]: starts[k] + step], pos[starts[k]: starts[k] + step]
        if not (warmth.pending[warmth.slots_at(sel)] != 0).any():
            return None  # lookups filled (or the walk reassigned) every slot of this step
        if int(p[-1]) - int(p[0]) + 1 == len(p):  # a run of ranks: one byte range
            # placed at the file offset's place in its page, so O_DIRECT reads straight into it
            off = (snapshot.layout.rows_offset + int(p[0]) * info.row_bytes) % PAGE_SIZE
            buf = staging[k % 2][off: off + len(p) * info.row_bytes].reshape(len(p), info.row_bytes)
            snapshot.read_into(int(p[0]), buf, lambda n: None)
            return buf
        return snapshot.read_rows(p)

    with ThreadPoolExecutor(1, thread_name_prefix="tierstore-warm-read") as pool:
        fut: Future | None = pool.submit(fetch, 0) if starts else None
        try:
            for k in range(len(starts)):
                assert fut is not None
                buf = fut.result()
                fut = pool.submit(fetch, k + 1) if k + 1 < len(starts) else None
                if buf is None:
                    continue
                sel = want[starts[k]: starts[k] + step]
                data = torch.from_numpy(buf).view(info.raw_dtype).reshape(len(sel), info.dim)
                with locked():
                    st.from_snapshot += warmth.commit(tier, warmth.slots_at(sel), warmth.rows_at(sel), data)
                yield
        finally:  # stopped or failed: the read in flight still writes a staging buffer
            if fut is not None:
                wait_futures([fut])
    return missing
