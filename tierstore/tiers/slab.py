"""What the memory tiers share: rows in a slab of ``capacity`` slots on one device.

``CacheTier`` (tiers/cache.py) and ``SharedHostTier`` (tiers/shared_host.py) inherit the
byte moves and counters of the ``Tier`` protocol from here and set ``kind``, ``slab`` and
``index``.
Every method takes a whole batch; a few Python calls per lookup, none per row.

CUDA (never run: needs CUDA; tiers/cuda.py says why each piece exists): a slab in GPU memory
orders its gathers and fills across streams with :class:`~.cuda.StreamFences`; a host slab
pinned with :class:`~.cuda.PinnedRegion` can also be read by the GPU directly
(:meth:`SlabTier.gather_to_device`, the zero-copy path). On the CPU neither exists and
``gather``/``write`` are what they always were.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..cache import CacheIndex
from ..cache.layout import RESIDENT
from ..format.spec import TableInfo
from .cuda import PinnedRegion, StreamFences, device_view
from .hotset import OpenStats
from .hotset import run_start as _run_start  # the preload writes such runs (tests import it from here)

__all__ = ["SlabTier"]


def _index(slots: np.ndarray | torch.Tensor, device: torch.device, remote: bool) -> torch.Tensor:
    """Slot numbers as an index tensor on the slab's device. A tensor passes as it is (the
    CUDA lookup path sends all of a lookup's indices in one copy: cuda.to_device)."""
    if isinstance(slots, torch.Tensor):
        return slots
    idx = torch.from_numpy(slots)
    return idx.to(device, non_blocking=True) if remote else idx


class SlabTier:
    """A memory tier: ``slab[slot]`` holds a row; ``index`` (CACHED) says which row, or
    slot == row (RESIDENT: ``capacity`` covers the table)."""

    kind: int
    slab: torch.Tensor | None
    arrives_filled = False  # the shared host tier's constructor fills it
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
        self.fences: StreamFences | None = None  # CUDA only: cross-stream order of gathers and fills
        self.pinned: PinnedRegion | None = None  # CUDA only: the host slab registered with CUDA
        self._on_gpu: torch.Tensor | None = None  # CUDA only: the GPU's view of the pinned slab (zero-copy)
        self.open_stats = OpenStats()  # what preload loaded, from where (stats()["open"])

    @property
    def nbytes(self) -> int:
        return self.capacity * self.info.row_bytes

    def gather(self, slots: np.ndarray | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == RESIDENT:
            self.resident_hits += len(slots)  # benign race: statistics only
        idx = _index(slots, self.device, self._remote)
        if self.fences is None or self._on_gpu is not None:  # read here, by this thread
            return torch.index_select(self.slab, 0, idx, out=out)
        self.fences.before_read()  # never run: needs CUDA
        got = torch.index_select(self.slab, 0, idx, out=out)
        self.fences.after_read()
        return got

    def write(self, slots: np.ndarray | torch.Tensor, rows: torch.Tensor) -> None:
        if self.fences is None and not self._remote and (a := _run_start(slots)) is not None:
            self.slab[a : a + slots.size].copy_(rows)  # one run of slots (the preload at open): a slice copy
            return
        idx = _index(slots, self.device, self._remote)
        if self.fences is None:
            self.slab.index_copy_(0, idx, rows)  # index_copy_: several times faster than __setitem__
            return
        if self._on_gpu is not None:  # never run: needs CUDA. A zero-copy host slab: the CPU writes it
            self.fences.before_cpu_write()
            self.slab.index_copy_(0, idx, rows)
            return
        self.fences.before_write()  # never run: needs CUDA
        self.slab.index_copy_(0, idx, rows)
        self.fences.after_write()

    # -- CUDA: pinned host slab, zero-copy -------------------------------------------------
    def pin(self, *, read_only: bool = False, zero_copy: bool = False, device: torch.device | None = None) -> None:
        """Register this host slab with CUDA, exactly its bytes (cuda.PinnedRegion); with
        ``zero_copy``, also map it for ``device`` so ``gather_to_device`` reads it from the GPU.
        Never run: needs CUDA."""
        if self.slab is None or self.slab.numel() == 0:
            return
        self.pinned = PinnedRegion(self.slab, read_only=read_only, what=f"{self.name} tier of table {self.info.name!r}")
        if zero_copy:
            assert device is not None and device.type == "cuda"
            self._on_gpu = device_view(self.slab, device)
            self.fences = StreamFences(device)  # GPU reads of host memory vs the CPU's writes

    @property
    def zero_copy(self) -> bool:
        return self._on_gpu is not None

    def gather_to_device(self, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Zero-copy: the GPU gathers rows ``slots`` (an index tensor on the GPU) straight
        from this pinned host slab into ``out`` on the GPU, on the current stream: no CPU
        gather, no staging buffer. Never run: needs CUDA."""
        assert self._on_gpu is not None and self.fences is not None
        if self.kind == RESIDENT:
            self.resident_hits += len(slots)
        got = torch.index_select(self._on_gpu, 0, slots, out=out)
        self.fences.after_read()  # a later CPU overwrite of these slots waits for this gather
        return got

    def stats(self) -> dict[str, float]:
        idx = self.index
        return {
            "hits": (idx.hits if idx else 0) + self.resident_hits, "misses": idx.misses if idx else 0,
            "evictions": idx.evictions if idx else 0, "insertions": idx.insertions if idx else 0,
            "rows": self.capacity if self.resident else idx.size if idx else 0,
            "capacity_rows": self.capacity, "bytes": self.nbytes, "resident": self.resident,
            "pinned_bytes": self.pinned.nbytes if self.pinned is not None else 0,
            "meta_bytes": idx.nbytes if idx else 0,  # the index's state: policy arrays, row map
            # the most it can grow to (the hint table once a hint arrives): the part of the
            # budget the store set aside for it (serve.store: capacity = slots_within(budget))
            "meta_bytes_max": idx.max_nbytes if idx else 0,
        }

    def reset_stats(self) -> None:
        with self.lock:
            self.resident_hits = 0
            if self.index is not None:
                self.index.reset_stats()

    def close(self) -> None:
        """Unregister a pinned slab (CUDA); the slab itself goes with the tier."""
        self._on_gpu = None
        pinned, self.pinned = self.pinned, None
        if pinned is not None:
            pinned.close()  # never run: needs CUDA
