"""One table served through its tiers: device cache -> host cache -> disk.

``Table.gather(ids, out)`` is the whole lookup of one batch:

1. device tier: map ids to slots (one vectorized index lookup), lease the hits;
2. the missed ids are deduplicated; the host tier serves what it holds, the disk tier
   reads the rest (whole pages, checksums verified);
3. rows read from disk are admitted into the host tier, rows that missed the device tier
   into the device tier, as their policies decide (admit + copy under the tier's lock);
4. the output is assembled on the store's device: hits gathered straight from the device
   slab, misses scattered from the staged unique rows; leases are released.

Costs: O(batch) index work plus one gather per tier; the only sort is the ``np.unique``
of the ids that missed the device tier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..cache.layout import FILL, HIT, NONE, RESIDENT
from ..cache.lookup import Lookup, Walker
from ..format.spec import TableInfo
from ..tiers import CacheTier, DiskTier, SharedHostTier, Tier

__all__ = ["Table"]


class Table:
    """One table's lookups through its tiers. The tiers are built here (which class serves
    the host tier is the one choice made by class); after that every tier is a ``Tier``
    (tierstore.tiers.base) and only its ``kind`` decides the path."""

    def __init__(
        self,
        root: Path,
        info: TableInfo,
        *,
        device: torch.device,
        device_rows: int,
        host_rows: int,
        policy: str,
        profile: np.ndarray | None = None,
        direct: bool | None = None,
        io_threads: int | None = None,
        host_shared: bool = False,
        build_id: str = "",
    ):
        self.info = info
        self.device = device
        self.cuda = device.type == "cuda"
        self.disk: Tier = DiskTier(root, info, direct=direct, threads=io_threads)
        self.host: Tier | None = None
        self.dev: Tier | None = None
        try:
            if host_shared and host_rows > 0:
                self.host = SharedHostTier(root, info, host_rows, self.disk, profile=profile, build_id=build_id)
            else:
                self.host = CacheTier("host", info, host_rows, device=torch.device("cpu"), pin=self.cuda,
                                      policy=policy, profile=profile)
            self.dev = CacheTier("device", info, device_rows, device=device, policy=policy, profile=profile)
            self._preload()
            self._walker = Walker(self.dev.index, self.dev.kind, self.host.index, self.host.kind)
            # when a list: every lookup's start (its ids) and end, and every hint, in the order
            # the tiers saw them: concurrent lookups overlap, and a row another lookup is still
            # filling is read from below (tierstore.analysis.simulate.replay_events replays them exactly)
            self.events: list[tuple] | None = None
        except BaseException:  # a failed open must not keep the row file or a shared segment
            self.close()
            raise

    # -- loading ----------------------------------------------------------------------------
    def _preload(self) -> None:
        """Fill resident tiers with the whole table (the device tier from the host tier when
        that holds it) and caches with their static hot set; counters start at zero."""
        self.host.preload(self.disk)
        self.dev.preload(self.disk, self.host)
        self.disk.reset_stats()

    # -- lookup ---------------------------------------------------------------------------
    def gather(self, ids: np.ndarray, out: torch.Tensor) -> None:
        """Fill ``out`` (len(ids), dim) on the store's device with the rows ``ids`` (int64, validated).

        The bookkeeping of both cache tiers is one compiled call (``begin``: ``walk.lookup``,
        the very walk the simulator replays); ``complete`` moves the bytes: host/disk ->
        staged rows -> the slots the walk admitted them to -> ``out``, then ends the lookup.
        """
        if self.on_device(ids, out):
            return
        self.complete(self.begin(ids), out)

    def on_device(self, ids: np.ndarray, out: torch.Tensor) -> bool:
        """The resident fast paths: if a slab holding the whole table serves ``ids``, fill
        ``out`` from it (one ``index_select``, no bookkeeping) and return True."""
        dkind, hkind = self._walker.dkind, self._walker.hkind
        if dkind == RESIDENT:  # the device slab is the table
            self.dev.gather(ids, out.view(self.info.raw_dtype))
            return True
        if dkind == NONE and hkind == RESIDENT and not self.cuda:  # the host slab is the table
            self.host.gather(ids, out.view(self.info.raw_dtype))
            return True
        return False

    def begin(self, ids: np.ndarray) -> Lookup:
        """A lookup's bookkeeping in both cache tiers (one compiled call, GIL-free, under both
        tier locks). Its leases hold until ``complete`` (or ``cancel``) ends it."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self.dev.lock, self.host.lock:  # always in this order (Table.hint too)
            lk = self._walker.begin(ids)
            if self.events is not None:  # the lookup starts; it ends (below) when its bytes are moved
                self.events.append(("lookup", ids.copy(), id(lk)))
        return lk

    def complete(self, lk: Lookup, out: torch.Tensor) -> None:
        """Move the bytes of a begun lookup into ``out`` and end it (its FILL slots are
        written; after an error they are dropped and the error re-raised)."""
        dev = self.dev
        out = out.view(self.info.raw_dtype)  # move bits, not values
        d_slot, d_code, need_of, m = lk.d_slot, lk.d_code, lk.need_of, lk.m
        ok = False
        try:
            if m == 0:  # every row on the device: one gather
                dev.gather(d_slot, out)
            else:
                staged = self._from_host_or_disk(lk.need[:m], lk.h_slot[:m], lk.h_code[:m])
                staged_dev = staged.to(self.device, non_blocking=True)
                d_hit = d_code == HIT
                fill = np.flatnonzero(d_code == FILL)
                if len(fill):  # rows the device tier admitted: write their slots
                    dev.write(d_slot[fill], staged_dev.index_select(0, torch.from_numpy(need_of[fill]).to(self.device)))
                below = np.flatnonzero(~d_hit)
                hit_pos = np.flatnonzero(d_hit)
                if len(hit_pos):
                    out.index_copy_(0, torch.from_numpy(hit_pos).to(self.device), dev.gather(d_slot[hit_pos]))
                out.index_copy_(0, torch.from_numpy(below).to(self.device),
                                staged_dev.index_select(0, torch.from_numpy(need_of[below]).to(self.device)))
            ok = True
        finally:
            self._end(lk, ok)

    def cancel(self, lk: Lookup) -> None:
        """End a begun lookup whose bytes will never be moved (its admitted rows are dropped)."""
        self._end(lk, False)

    def _end(self, lk: Lookup, ok: bool) -> None:
        # the lookup ends: its FILL slots hold their bytes now (or, after an error, are dropped)
        with self.dev.lock, self.host.lock:
            self._walker.end(lk, ok)
            if self.events is not None:
                self.events.append(("end", ok, id(lk)))

    def _from_host_or_disk(self, need: np.ndarray, h_slot: np.ndarray, h_code: np.ndarray) -> torch.Tensor:
        """Rows ``need`` (sorted unique) as a CPU tensor (pinned when CUDA is present): host
        hits from the host tier, the rest from disk, written into the slots the host tier
        admitted them to (``FILL``)."""
        info, host = self.info, self.host
        staged = torch.empty((len(need), info.dim), dtype=info.raw_dtype, pin_memory=self.cuda)
        hit = h_code == HIT
        if hit.all():
            host.gather(h_slot, staged)
            return staged
        if not hit.any():
            self.disk.gather(need, staged)
            cold, cold_pos = staged, None
        else:
            cold_pos = np.flatnonzero(~hit)
            cold = self.disk.gather(need[cold_pos])
            hit_pos = np.flatnonzero(hit)
            # index_copy_/index_select: several times faster than tensor __setitem__/__getitem__
            staged.index_copy_(0, torch.from_numpy(hit_pos), host.gather(h_slot[hit_pos]))
            staged.index_copy_(0, torch.from_numpy(cold_pos), cold)
        fill = np.flatnonzero(h_code == FILL)
        if len(fill):
            src = fill if cold_pos is None else np.searchsorted(cold_pos, fill)
            host.write(h_slot[fill], cold.index_select(0, torch.from_numpy(src)))
        return staged

    def hint(self, ids: np.ndarray) -> None:
        """Announce rows a later lookup will read (the known future). Each tier hears only
        what it can act on: the device tier every id, the host tier only the ids the device
        tier does not hold now (it sees nothing else, so other hints would never be used)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self.dev.lock, self.host.lock:
            self._walker.announce(ids)
            if self.events is not None:
                self.events.append(("hint", ids.copy()))

    def stats(self) -> dict[str, dict[str, float]]:
        return {"device": self.dev.stats(), "host": self.host.stats(), "disk": self.disk.stats()}

    def reset_stats(self) -> None:
        self.dev.reset_stats()
        self.host.reset_stats()
        self.disk.reset_stats()

    def close(self) -> None:
        for tier in (self.dev, self.host, self.disk):  # a failed open may have built only some
            if tier is not None:
                tier.close()
