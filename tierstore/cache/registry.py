"""The registered policies, by name."""

from __future__ import annotations

from ..errors import TierStoreError
from .arc import ARC
from .default import Default
from .lfu import LFU
from .lru import LRU
from .policy import Policy
from .s3fifo import S3FIFO
from .static import Static
from .wtinylfu import WTinyLFU

__all__ = ["POLICIES", "make_policy", "policy_names"]

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFU, S3FIFO, WTinyLFU, ARC, Static, Default)}


def policy_names() -> list[str]:
    """Registered policy names (``opt`` is not a policy: see ``tierstore.analysis.belady``)."""
    return list(POLICIES)


def make_policy(name: str, capacity: int, **kwargs) -> Policy:
    """Build a registered policy by name; unknown names raise, listing the known ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise TierStoreError(
            f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(capacity, **kwargs)
