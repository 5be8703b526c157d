"""A cache tier: a budgeted slab of rows on one device, and a policy-driven index of it.

The device tier is one (GPU memory, or plain memory when the store runs on the CPU), the
host tier another (pinned host memory when CUDA is present). A tier whose capacity covers
the table is *resident* (kind RESIDENT): the slab is the table, slot == row, no index at
all; a tier with no budget is disabled (NONE); otherwise its ``CacheIndex`` maps table rows
to slots (CACHED) and the compiled walk decides what it holds.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
import torch

from ..cache import CacheIndex, PolicySpec
from ..cache.layout import CACHED, NONE, RESIDENT
from ..format.profile import Profile
from ..format.spec import PAGE_SIZE, TableInfo
from ..ranking import TopProfile
from .base import Tier
from .cuda import StreamFences, capacity_error
from .disk import DiskTier
from .early import EarlyCopy, EarlyLoad, loaded_early
from .hotset import PRELOAD_BYTES, OpenStats, TableSnapshot, load_slots, placed_run, placed_slots
from .page_reader import aligned_empty
from .slab import SlabTier

__all__ = ["CacheTier", "PRELOAD_BYTES"]


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable without touching their bytes
_PREFAULT_STEP = 64 << 20  # bytes per madvise call: the stop flag is checked between them
_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None


class Prefault:
    """Faults a fresh slab's pages in on a thread of its own, while the tier's index is built.

    The hot-set snapshot is read with O_DIRECT straight into the slab, so the slab's first
    touch happened inside those reads: ~2.6 us of CPU per 4 KiB page on this VM (0.5 s per
    792 MB), on the reading thread, which on a loaded 2-core machine paced the whole load.
    ``madvise(MADV_POPULATE_WRITE)`` (a ctypes call: the GIL is released) faults them in
    without writing a byte, so it may run alongside the reads and the lookups that fill the
    slab later; where the kernel lacks it (EINVAL) the reads fault the pages in as before.
    ``stop()`` when the index placed nothing (the pages would be touched only as rows are
    admitted) and at close. ``bytes``: how much it has populated (``stats``, the tests)."""

    def __init__(self, buf: np.ndarray):
        self._buf = buf  # keeps the mapping alive while the thread works on it
        self._stop = False
        self.bytes = 0
        self._thread = threading.Thread(target=self._run, name="tierstore-prefault", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        addr, n = self._buf.ctypes.data, self._buf.nbytes
        for a in range(0, n, _PREFAULT_STEP):
            if self._stop or _libc is None:
                return
            m = min(_PREFAULT_STEP, n - a)
            if _libc.madvise(ctypes.c_void_p(addr + a), ctypes.c_size_t(m), _MADV_POPULATE_WRITE) != 0:
                return  # EINVAL (an older kernel), ENOMEM: the first writes fault them in instead
            self.bytes += m

    def stop(self) -> None:
        self._stop = True
        self.join()

    def join(self) -> None:
        self._thread.join()
        self._buf = None


def _aligned_slab(capacity: int, info: TableInfo) -> torch.Tensor:
    """An uninitialised (capacity, dim) slab of ``info.raw_dtype`` starting on a page boundary
    (an anonymous mapping: its memory goes back to the OS with the tensor)."""
    nbytes = capacity * info.row_bytes
    if nbytes == 0:
        return torch.empty((capacity, info.dim), dtype=info.raw_dtype)
    raw = aligned_empty(-(-nbytes // PAGE_SIZE)).reshape(-1)[:nbytes]
    return torch.from_numpy(raw).view(info.raw_dtype).view(capacity, info.dim)


class CacheTier(SlabTier):
    """A budgeted slab of rows on one device, with a policy-driven index of what it holds.

    ``pin`` (a host tier when the store runs on CUDA): register the slab with CUDA, exactly
    its bytes; ``zero_copy`` also lets the GPU on ``zero_copy_device`` read it directly
    (``gather_to_device``). Both never run: need CUDA.

    ``lock`` guards the index and the slab's contents: callers look up and lease under it,
    gather outside it (leased slots cannot be evicted), and admit + copy under it, so a
    slot is never visible before its bytes are in place.
    """

    def __init__(
        self,
        name: str,
        info: TableInfo,
        capacity: int,
        *,
        device: torch.device,
        pin: bool = False,
        zero_copy: bool = False,
        zero_copy_device: torch.device | None = None,
        policy: str | PolicySpec = "default",
        profile: Profile | None = None,
        pinned_rows: np.ndarray | None = None,
        snapshot: TableSnapshot | None = None,
        feed: EarlyCopy | None = None,
        fed_by: EarlyCopy | None = None,
    ):
        super().__init__(name, info, capacity, device)
        if device.type == "cuda":  # never run: needs CUDA
            try:
                self.slab = torch.empty((self.capacity, info.dim), dtype=info.raw_dtype, device=device)
            except torch.OutOfMemoryError as e:  # the Store checked the room first; another process took it
                raise capacity_error(e, device, f"allocating the {name} tier of table {info.name!r}") from None
        else:
            # plain memory, pinned below by registering exactly its bytes (pin_memory=True
            # would take it from the caching host allocator, which rounds up to a power of two);
            # page-aligned, so the hot-set snapshot is read into it with O_DIRECT, no copy
            self.slab = _aligned_slab(self.capacity, info)
        self.prefault: Prefault | None = None
        if device.type == "cpu" and self.capacity > 0 and (self.resident or profile is not None
                                                           or pinned_rows is not None):
            # rows will likely be placed and loaded at open: fault the slab in meanwhile, as far
            # as they will reach (a ranked profile places its rows in slots [0, n), rank order;
            # the rest of the slab is touched only as rows are admitted)
            n = self.capacity
            if not self.resident and pinned_rows is None and isinstance(profile, TopProfile):
                n = min(n, len(profile.rows))
            self.prefault = Prefault(self.slab[:n].view(torch.uint8).numpy().reshape(-1))
        # ``snapshot`` (open with warm="open"): read the rows the index will place while it is
        # built, when they are known before it (tiers.early)
        self.early: EarlyLoad | None = None
        # ``feed`` (the host tier): the rows it reads early go on to the device tier's slab too;
        # ``fed_by`` (the device tier): its placed rows come that way (tiers.early.EarlyCopy)
        self.fed_by: EarlyCopy | None = None
        name = policy if isinstance(policy, str) else policy.name
        prefix = (device.type == "cpu" and not self.resident and self.capacity > 0 and pinned_rows is None
                  and name in EarlyLoad.POLICIES and isinstance(profile, TopProfile) and profile.counts is None
                  and self.slab.is_contiguous())  # placed rows: the ranking's prefix, in slot order
        if prefix and snapshot is not None and not snapshot.dropped:
            # exclusive tiers: the host tier's ranking starts after the device tier's (``first``)
            n = min(self.capacity, snapshot.layout.n - profile.first, len(profile.rows))
            if n > 0:
                self.early = EarlyLoad(snapshot, self.slab[:n].view(torch.uint8).numpy().reshape(n, -1),
                                       first=profile.first, feed=feed)
        if prefix and fed_by is not None:
            n = min(self.capacity, len(profile.rows))
            if n > 0:
                self.fed_by = fed_by
                fed_by.follow(self.slab[:n].view(torch.uint8).numpy().reshape(n, -1))
        try:
            if not self.resident and self.capacity > 0:
                self.index = CacheIndex(
                    info.rows, self.capacity, policy,
                    pinned_rows=pinned_rows,  # None: the policy picks its static core from the profile
                    profile=profile,
                )
        except BaseException:
            self._stop_early()  # no read may still write into this slab
            raise
        self.kind = RESIDENT if self.resident else CACHED if self.index is not None else NONE
        if self.prefault is not None and self.kind == CACHED and self.index.size == 0:
            self.prefault.stop()  # nothing placed: pages are touched as rows are admitted
        if device.type == "cuda" and self.kind == CACHED:  # never run: needs CUDA
            self.fences = StreamFences(device)  # slots are refilled: order gathers and fills across streams
        if pin and self.kind != NONE:  # never run: needs CUDA
            self.pin(zero_copy=zero_copy, device=zero_copy_device)

    def preload(self, disk: DiskTier, source: Tier | None = None, snapshot: TableSnapshot | None = None) -> None:
        """Fill the tier at open (``tiers.hotset``): a resident tier with the whole table
        (copied from ``source`` when that is resident too, else read in file order); a cache
        with the rows its index placed at construction (the policy's hot set), from
        ``source``'s slab, the hot-set ``snapshot`` or the row file. ``open_stats`` says how."""
        t0 = time.perf_counter()
        if self.kind == RESIDENT:
            b0 = disk.bytes_read
            if source is not None and source.kind == RESIDENT:  # the tier below holds the table
                self.slab.copy_(source.slab)
                self.open_stats = OpenStats(rows_loaded=self.capacity, from_source=self.capacity)
            else:
                disk.load_table(self.slab)
                self.open_stats = OpenStats(rows_loaded=self.capacity, from_rows=self.capacity,
                                            bytes_read=disk.bytes_read - b0)
            self.open_stats.seconds = time.perf_counter() - t0
        elif self.kind == CACHED:  # the rows the index placed at construction (static hot set)
            ros, size = self.index.row_of_slot, self.index.size
            early = self.early if self.fed_by is None else self.fed_by if self.early is None else None
            if early is not None and size and placed_run(ros, size):
                # the usual case: slots [0, size) hold ranks [0, size), all in early: checked on
                # the int32 slot table itself (no int64 copies of it: 0.02-0.27 s at 6M slots)
                if early.finish(ros[:size], None) == size:
                    self.early = self.fed_by = None
                    self.open_stats = loaded_early(size, from_snapshot=isinstance(early, EarlyLoad),
                                                   snapshot=snapshot, t0=t0)
                    return
            slots, rows = placed_slots(ros, size)  # slot order: rank order
            in_place = copied = 0
            if self.early is not None:  # read while the index was built: keep what checks out
                in_place = self.early.finish(rows, slots)
                self.early = None
            if self.fed_by is not None:  # copied from the host slab meanwhile: keep what checks out
                copied = self.fed_by.finish(rows, slots)
                self.fed_by = None
            self.open_stats = load_slots(self, slots, rows, disk=disk, source=source, snapshot=snapshot,
                                         in_place=in_place, copied=copied)
        self._stop_early()

    def _stop_early(self) -> None:
        if self.early is not None:
            self.early.stop()
            self.early = None
        if self.fed_by is not None:  # no copy may land in this slab from now on
            self.fed_by.stop()
            self.fed_by = None

    def close(self) -> None:
        self._stop_early()
        if self.prefault is not None:
            self.prefault.stop()
        super().close()
