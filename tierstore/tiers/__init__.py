"""The tiers: they hold rows and move bytes; the cache layer (tierstore.cache) decides
which rows each cache tier holds.

- ``base``: the :class:`Tier` protocol every tier implements (``Table`` uses nothing else);
- ``slab``: what the memory tiers share (rows in a slab of slots on one device);
- ``cache``: :class:`CacheTier`, the device and host cache tiers;
- ``shared_host``: :class:`SharedHostTier`, a host tier in POSIX shared memory;
- ``disk``: :class:`DiskTier`, the row file (checksummed page reads).
"""

from .base import CACHED, DISK, NONE, RESIDENT, Tier
from .cache import CacheTier
from .disk import DiskTier
from .shared_host import SharedHostTier

__all__ = ["Tier", "NONE", "CACHED", "RESIDENT", "DISK", "CacheTier", "DiskTier", "SharedHostTier"]
