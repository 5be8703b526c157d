"""What the memory tiers share: rows in a slab of ``capacity`` slots on one device.

``CacheTier`` (tiers/cache.py) and ``SharedHostTier`` (tiers/shared_host.py) inherit the
byte moves and counters of the ``Tier`` protocol from here and set ``kind``, ``slab`` and
``index``.
Every method takes a whole batch; a few Python calls per lookup, none per row.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..cache import CacheIndex
from ..cache.layout import RESIDENT
from ..format.spec import TableInfo

__all__ = ["SlabTier"]


class SlabTier:
    """A memory tier: ``slab[slot]`` holds a row; ``index`` (CACHED) says which row, or
    slot == row (RESIDENT: ``capacity`` covers the table)."""

    kind: int
    slab: torch.Tensor | None
    index: CacheIndex | None

    def __init__(self, name: str, info: TableInfo, capacity: int, device: torch.device):
        self.name = name  # "device" or "host"
        self.info = info
        self.capacity = min(int(capacity), info.rows)
        self.resident = self.capacity == info.rows and info.rows > 0
        self.device = device
        self._remote = device.type != "cpu"  # slot arrays go to the device first (checked per call)
        self.lock = threading.Lock()
        self.index = None
        self.resident_hits = 0  # a resident tier has no index: gather counts its hits here

    @property
    def nbytes(self) -> int:
        return self.capacity * self.info.row_bytes

    def gather(self, slots: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == RESIDENT:
            self.resident_hits += len(slots)  # benign race: statistics only
        idx = torch.from_numpy(slots)
        if self._remote:
            idx = idx.to(self.device, non_blocking=True)
        return torch.index_select(self.slab, 0, idx, out=out)

    def write(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        idx = torch.from_numpy(slots)
        if self._remote:
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
