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

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .format import TableInfo
from .shared_host import SharedHostTier
from .tier import CacheTier, DiskTier

__all__ = ["Table"]


class Table:
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
        self.disk = DiskTier(root, info, direct=direct, threads=io_threads)
        self.host: CacheTier | SharedHostTier | None = None
        try:
            if host_shared and host_rows > 0:
                self.host = SharedHostTier(root, info, host_rows, self.disk, profile=profile, build_id=build_id)
            else:
                self.host = CacheTier("host", info, host_rows, device=torch.device("cpu"), pin=self.cuda,
                                      policy=policy, profile=profile)
            self.dev = CacheTier("device", info, device_rows, device=device, policy=policy, profile=profile)
            self._after_lease: Callable[[], None] | None = None
            self._preload()
        except BaseException:  # a failed open must not keep the row file or a shared segment
            self.close()
            raise

    # -- loading ----------------------------------------------------------------------------
    def _preload(self) -> None:
        """Fill resident tiers with the whole table and caches with their static hot set."""
        for tier in (self.host, self.dev):
            if isinstance(tier, SharedHostTier):
                continue  # filled once, by whichever process opened it first
            if tier.resident:
                src = self.host.slab if (tier is self.dev and self.host.resident) else None
                if src is not None:
                    tier.slab.copy_(src)
                else:
                    self.disk.load_table(tier.slab)
            elif tier.index is not None:
                rows, slots = tier.preload_rows()
                if len(rows):
                    order = np.argsort(rows)
                    buf = torch.empty((len(rows), self.info.dim), dtype=self.info.raw_dtype)
                    self.disk.read(rows[order], buf)
                    tier.slab[torch.from_numpy(slots[order]).to(tier.device)] = buf.to(tier.device)
        self.disk.reset_stats()

    # -- lookup ---------------------------------------------------------------------------
    def gather(self, ids: np.ndarray, out: torch.Tensor) -> None:
        """Fill ``out`` (len(ids), dim) on the store's device with the rows ``ids`` (int64, validated)."""
        dev = self.dev
        out = out.view(self.info.raw_dtype)  # move bits, not values
        if dev.resident:
            dev.resident_hits += len(ids)  # benign race: statistics only
            torch.index_select(dev.slab, 0, torch.from_numpy(ids).to(self.device, non_blocking=True), out=out)
            return
        if dev.index is None and self.host.resident and not self.cuda:  # the host slab is the table
            self.host.resident_hits += len(ids)
            torch.index_select(self.host.slab, 0, torch.from_numpy(ids), out=out)
            return
        if dev.index is None:  # device tier disabled
            uniq, inv = np.unique(ids, return_inverse=True)
            staged = self._from_host_or_disk(uniq)
            torch.index_select(staged.to(self.device, non_blocking=True), 0,
                               torch.from_numpy(inv.reshape(-1)).to(self.device), out=out)
            return
        with dev.lock:  # ids were validated at the store's API; slots come from the index
            slots = dev.index.lookup(ids, trusted=True)
            hit = slots >= 0
            held = slots[hit]
            dev.index.lease_batch(held, trusted=True)
        try:
            if self._after_lease is not None:  # test hook: runs between lease and gather
                self._after_lease()
            if len(held) == len(ids):  # every row on the device: one gather, no sort
                torch.index_select(dev.slab, 0, torch.from_numpy(slots).to(self.device), out=out)
                return
            miss_pos = np.flatnonzero(~hit)
            uniq, inv = np.unique(ids[miss_pos], return_inverse=True)
            staged = self._from_host_or_disk(uniq)
            staged_dev = staged.to(self.device, non_blocking=True)
            with dev.lock:
                rows_in, slots_in, _ = dev.index.admit(uniq)
                if len(rows_in):
                    src = np.searchsorted(uniq, rows_in)
                    dev.slab.index_copy_(0, torch.from_numpy(slots_in).to(self.device),
                                         staged_dev.index_select(0, torch.from_numpy(src).to(self.device)))
            if len(held):
                hit_pos = torch.from_numpy(np.flatnonzero(hit)).to(self.device)
                out.index_copy_(0, hit_pos, dev.slab.index_select(0, torch.from_numpy(held).to(self.device)))
            out.index_copy_(0, torch.from_numpy(miss_pos).to(self.device),
                            staged_dev.index_select(0, torch.from_numpy(inv.reshape(-1)).to(self.device)))
        finally:
            with dev.lock:
                dev.index.release_batch(held, trusted=True)

    def _from_host_or_disk(self, uniq: np.ndarray) -> torch.Tensor:
        """Rows ``uniq`` (sorted unique) as a CPU tensor (pinned when CUDA is present)."""
        info, host = self.info, self.host
        staged = torch.empty((len(uniq), info.dim), dtype=info.raw_dtype, pin_memory=self.cuda)
        if host.resident:
            host.resident_hits += len(uniq)
            torch.index_select(host.slab, 0, torch.from_numpy(uniq), out=staged)
            return staged
        if host.index is None and not isinstance(host, SharedHostTier):  # host tier disabled
            self.disk.read(uniq, staged)
            return staged
        # A shared tier is read-only after its fill: no lock, no lease, no admission.
        cached = host.index is not None
        if cached:
            with host.lock:
                slots = host.index.lookup(uniq, trusted=True)
                held = slots[slots >= 0]
                host.index.lease_batch(held, trusted=True)
        else:
            slots = host.lookup(uniq)
        hit = slots >= 0
        try:
            if hit.all():
                torch.index_select(host.slab, 0, torch.from_numpy(slots), out=staged)
                return staged
            miss = uniq[~hit]
            cold = torch.empty((len(miss), info.dim), dtype=info.raw_dtype)
            self.disk.read(miss, cold)
            if cached:
                with host.lock:
                    rows_in, slots_in, _ = host.index.admit(miss)
                    if len(rows_in):
                        host.slab.index_copy_(0, torch.from_numpy(slots_in),
                                              cold.index_select(0, torch.from_numpy(np.searchsorted(miss, rows_in))))
            # index_copy_/index_select: several times faster than tensor __setitem__/__getitem__
            if hit.any():
                staged.index_copy_(0, torch.from_numpy(np.flatnonzero(hit)),
                                   host.slab.index_select(0, torch.from_numpy(slots[hit])))
            staged.index_copy_(0, torch.from_numpy(np.flatnonzero(~hit)), cold)
            return staged
        finally:
            if cached:
                with host.lock:
                    host.index.release_batch(held, trusted=True)

    def hint(self, ids: np.ndarray) -> None:
        """Announce rows a later lookup will read (the known future). Each tier hears only
        what it can act on: the device tier every id, the host tier only the ids the device
        tier does not hold now (it sees nothing else, so other hints would never be used)."""
        ids = np.unique(ids)
        dev, host = self.dev, self.host
        if dev.index is not None:
            with dev.lock:
                dev.index.hint(ids)
                ids = ids[~dev.index.resident(ids)]
        elif dev.resident:
            return  # the device tier is the table: nothing reaches the host tier
        if host.index is not None and ids.size:
            with host.lock:
                host.index.hint(ids)

    def stats(self) -> dict[str, dict[str, float]]:
        return {"device": self.dev.stats(), "host": self.host.stats(), "disk": self.disk.stats()}

    def reset_stats(self) -> None:
        self.dev.reset_stats()
        self.host.reset_stats()
        self.disk.reset_stats()

    def close(self) -> None:
        if isinstance(self.host, SharedHostTier):
            self.host.close()
        self.disk.close()
