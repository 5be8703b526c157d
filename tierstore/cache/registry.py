"""The registered policies, by name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import TierStoreError
from .arc import ARC
from .default import Default
from .lfu import LFU
from .lru import LRU
from .policy import Policy
from .s3fifo import S3FIFO
from .static import Static
from .wtinylfu import WTinyLFU

__all__ = ["POLICIES", "PolicySpec", "make_policy", "policy_names"]

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


@dataclass(frozen=True)
class PolicySpec:
    """A registered policy's name and parameters, checked once, before any tier exists.

    A store builds one policy per cache tier of each table, each for its own capacity, and
    some tiers need none (a resident table): checking here makes a misspelt name or a bad
    parameter fail at ``tierstore.open`` whatever the budgets, with the policy's own
    ``check_params`` error (:class:`~tierstore.errors.PolicyParamError` naming the key).
    """

    name: str = "default"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.params, Mapping):
            raise TierStoreError(f"policy_params={self.params!r} must be a mapping of parameter name to value")
        object.__setattr__(self, "params", dict(self.params))  # a private copy: the caller's dict may change
        make_policy(self.name, 0, **self.params)  # unknown name or parameter raises here

    def build(self, capacity: int, *, rng: np.random.Generator | int | None = None) -> Policy:
        """The policy for a tier of ``capacity`` rows."""
        return make_policy(self.name, capacity, rng=rng, **self.params)
