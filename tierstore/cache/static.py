"""Only the pinned hot set, chosen from a profile: nothing is ever admitted or evicted.
Also the policy of the read-only shared host tier (its rows are fixed at fill time)."""

from __future__ import annotations

import numpy as np

from ..jit import kernel
from ..ranking import TopProfile, hot_rows
from .policy import Policy
from .walk import all_hits_with



@kernel(inline=True)
def hit(T, s):  # pragma: no cover - compiled
    pass


@kernel
def all_hits(T, rows, slots):  # pragma: no cover - compiled
    """The decode path's all-hit accesses (walk.all_hits_with) with this module's ``hit``
    inlined."""
    return all_hits_with(hit, T, rows, slots)


@kernel(inline=True)
def miss(T, r):  # pragma: no cover - compiled
    return -1


@kernel
def prefill(T, s, r, rank):  # pragma: no cover - compiled
    pass


class Static(Policy):
    """Pins the profile's top ``capacity`` rows; every other row bypasses the tier."""

    name = "static"
    admits = False  # 4 bytes a slot (its row) and the row map: no leases, markers or queues

    def prepare(self, profile: np.ndarray | TopProfile | None) -> np.ndarray:
        return hot_rows(profile, self.capacity)
