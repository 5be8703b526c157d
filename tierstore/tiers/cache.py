"""A cache tier: a budgeted slab of rows on one device, and a policy-driven index of it.

The device tier is one (GPU memory, or plain memory when the store runs on the CPU), the
host tier another (pinned host memory when CUDA is present). A tier whose capacity covers
the table is *resident* (kind RESIDENT): the slab is the table, slot == row, no index at
all; a tier with no budget is disabled (NONE); otherwise its ``CacheIndex`` maps table rows
to slots (CACHED) and the compiled walk decides what it holds.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cache import CacheIndex, PolicySpec
from ..cache.layout import CACHED, NONE, RESIDENT
from ..format.spec import TableInfo
from .base import Tier
from .disk import DiskTier
from .slab import SlabTier

__all__ = ["CacheTier"]


class CacheTier(SlabTier):
    """A budgeted slab of rows on one device, with a policy-driven index of what it holds.

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
        policy: str | PolicySpec = "default",
        profile: np.ndarray | None = None,
        pinned_rows: np.ndarray | None = None,
    ):
        super().__init__(name, info, capacity, device)
        self.slab = torch.empty(
            (self.capacity, info.dim), dtype=info.raw_dtype, device=device,
            pin_memory=pin and device.type == "cpu",
        )
        if not self.resident and self.capacity > 0:
            self.index = CacheIndex(
                info.rows, self.capacity, policy,
                pinned_rows=pinned_rows,  # None: the policy picks its static core from the profile
                profile=profile,
            )
        self.kind = RESIDENT if self.resident else CACHED if self.index is not None else NONE

    def preload(self, disk: DiskTier, source: Tier | None = None) -> None:
        if self.kind == RESIDENT:
            if source is not None and source.kind == RESIDENT:  # the tier below holds the table
                self.slab.copy_(source.slab)
            else:
                disk.load_table(self.slab)
        elif self.kind == CACHED:  # the rows the index placed at construction (static hot set)
            slots = np.flatnonzero(self.index.row_of_slot >= 0)
            if len(slots):
                rows = self.index.row_of_slot[slots].astype(np.int64)
                order = np.argsort(rows)
                self.write(slots[order], disk.gather(rows[order]).to(self.device))
