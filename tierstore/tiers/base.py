"""The one protocol every tier implements; ``Table`` talks to its tiers through it only.

A tier holds rows and moves bytes; which rows a cache tier holds is decided by its
``CacheIndex`` (tierstore.cache), run for both cache tiers at once by the compiled walk.
``Table`` reads a tier's ``kind`` and ``index`` to build the walk's arguments and moves
bytes with ``gather`` and ``write``; it never asks which class a tier is.

| tier | class | kind |
|---|---|---|
| device / host cache (a budgeted slab + a policy) | ``tiers.cache.CacheTier`` | NONE, CACHED or RESIDENT |
| host tier in POSIX shared memory (read-only) | ``tiers.shared_host.SharedHostTier`` | CACHED or RESIDENT |
| the row file (checksummed pages) | ``tiers.disk.DiskTier`` | DISK |

Kinds: ``NONE`` (disabled: every row comes from below), ``CACHED`` (slots mapped by the
index), ``RESIDENT`` (the slab is the table: slot == row, no index) are the walk's tier
kinds (tierstore.cache.layout); ``DISK`` is the bottom, which holds every row by its id.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from ..cache.layout import CACHED, NONE, RESIDENT

if TYPE_CHECKING:
    from ..cache import CacheIndex
    from .hotset import TableSnapshot

__all__ = ["Tier", "NONE", "CACHED", "RESIDENT", "DISK"]

DISK = 3  # the disk tier: below the walk, every row addressed by its id


@runtime_checkable
class Tier(Protocol):
    """What a tier offers ``Table``. Addresses are *slots* for a memory tier (== rows when
    RESIDENT) and *rows* for the disk tier; arrays of them are int64 numpy arrays."""

    name: str  # "device", "host" or "disk": the key of its counters in Store.stats()
    kind: int  # NONE / CACHED / RESIDENT / DISK (above)
    index: CacheIndex | None  # the walk's bookkeeping when CACHED, else None
    slab: torch.Tensor | None  # the rows in memory, one per slot (None for the disk tier)
    device: torch.device  # where gather puts rows when given no ``out`` (the disk: its reader's device)
    arrives_filled: bool  # its constructor fills it (the shared host tier): nothing for open or a loader to load
    lock: threading.Lock  # guards its state: a cache tier's index and leases (held around the walk), the disk's counters

    def gather(self, slots: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the rows at ``slots`` into ``out`` (len(slots), dim) on the tier's device
        (a new tensor when ``out`` is None) and return it. A memory tier also takes ``slots``
        as an int64 tensor already on its device (the CUDA path sends a lookup's indices in
        one copy)."""
        ...

    def write(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        """Fill slots the walk admitted rows to (``FILL``) with their bytes ``rows``.
        Read-only tiers raise ``TierStoreError`` (the walk never admits into them)."""
        ...

    def preload(self, disk: Tier, source: Tier | None = None, snapshot: TableSnapshot | None = None) -> None:
        """Fill the tier at open: a resident tier with the whole table (copied from
        ``source`` when that tier is resident too, else read from ``disk``), a cache with
        the static hot set its policy placed (from ``source``'s slab, the hot-set
        ``snapshot`` or ``disk``: tiers.hotset); no-op for a tier that arrives filled.
        ``open_stats`` (tiers.hotset.OpenStats) says what it loaded."""
        ...

    def stats(self) -> dict[str, float]: ...

    def reset_stats(self) -> None: ...

    def close(self) -> None:
        """Release files and shared memory (idempotent); in-memory slabs go with the object."""
        ...
