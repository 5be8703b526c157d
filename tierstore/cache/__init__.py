"""The cache layer: which rows each cache tier holds, decided by compiled policies.

- ``layout``: the state arrays of one tier; ``structs``: queues, ghosts, heap, hashing;
- one module per policy (``lru``, ``lfu``, ``s3fifo``, ``wtinylfu``, ``arc``, ``static``,
  ``default``), each compiled hooks plus a small :class:`Policy` description;
- ``walk``: the one walk of a lookup through the device and host tiers (store and simulator);
  ``lookup``: the walk driven from Python (``Walker``: begin, end, announce, replay);
- ``index``: :class:`CacheIndex`, one tier's state behind a small Python API.
"""

from .index import CacheIndex
from .policy import Policy
from .registry import POLICIES, PolicySpec, make_policy, policy_names

__all__ = ["CacheIndex", "Policy", "POLICIES", "PolicySpec", "make_policy", "policy_names"]
