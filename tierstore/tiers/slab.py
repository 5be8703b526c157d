"""What the memory tiers share: rows in a slab of ``capacity`` slots on one device.

``CacheTier`` (tiers/cache.py) and ``SharedHostTier`` (tiers/shared_host.py) set the
attributes below and inherit the byte moves and counters of the ``Tier`` protocol from here.
Every method takes a whole batch; a few Python calls per lookup, none per row.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..cache import CacheIndex
from ..cache.layout import RESIDENT
from ..format import TableInfo

__all__ = ["SlabTier"]


class SlabTier:
    """A memory tier: ``slab[slot]`` holds a row; ``index`` (CACHED) says which row, or
    slot == row (RESIDENT). Subclasses set every attribute in their constructor."""

    name: str
    kind: int
    info: TableInfo
    capacity: int
    resident: bool
    device: torch.device
    slab: torch.Tensor | None
    index: CacheIndex | None
    lock: threading.Lock
    resident_hits: int  # a resident tier has no index: its hits are counted here

    @property
    def nbytes(self) -> int:
        return self.capacity * self.info.row_bytes

    def gather(self, slots: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == RESIDENT:
            self.resident_hits += len(slots)  # benign race: statistics only
        idx = torch.from_numpy(slots)
        if self.device.type != "cpu":
            idx = idx.to(self.device, non_blocking=True)
        return torch.index_select(self.slab, 0, idx, out=out)

    def write(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        idx = torch.from_numpy(slots)
        if self.device.type != "cpu":
            idx = idx.to(self.device)
        self.slab.index_copy_(0, idx, rows)  # index_copy_: several times faster than __setitem__

    def stats(self) -> dict[str, float]:
        idx = self.index
        return {
            "hits": (idx.hits if idx else 0) + self.resident_hits, "misses": idx.misses if idx else 0,
            "evictions": idx.evictions if idx else 0, "insertions": idx.insertions if idx else 0,
            "rows": self.capacity if self.resident else idx.size if idx else 0,
            "capacity_rows": self.capacity, "bytes": self.nbytes, "resident": self.resident,
        }

    def reset_stats(self) -> None:
        with self.lock:
            self.resident_hits = 0
            if self.index is not None:
                self.index.reset_stats()

    def close(self) -> None:
        """Nothing to release: the slab goes with the tier."""
