"""The tiers: they hold rows and move bytes; the cache layer (tierstore.cache) decides
which rows each cache tier holds.

- ``base``: the :class:`Tier` protocol every tier implements (``Table`` uses nothing else);
- ``slab``: what the memory tiers share (rows in a slab of slots on one device);
- ``cache``: :class:`CacheTier`, the device and host cache tiers;
- ``shared_host``: :class:`SharedHostTier`, a host tier in POSIX shared memory;
- ``disk``: :class:`DiskTier`, the row file (checksummed page reads), with a pluggable
  device page reader;
- ``page_reader``: the POSIX page reader (native AIO / buffered), into host memory;
- ``kvikio_reader``: the kvikio page reader, into GPU memory (the ``gpu`` extra);
- ``cuda``: what the CUDA paths share (one-copy indices, stream fences, exact pinning,
  zero-copy views, GPU room checks).
"""

from .base import CACHED, DISK, NONE, RESIDENT, Tier
from .cache import CacheTier
from .disk import DiskTier
from .shared_host import SharedHostTier

__all__ = ["Tier", "NONE", "CACHED", "RESIDENT", "DISK", "CacheTier", "DiskTier", "SharedHostTier"]
