"""Tier sizing (``tierstore size``): the smallest device and host capacities that reach
target hit ratios on a trace.

Each hit ratio comes from replaying the whole trace through both tiers
(:func:`~tierstore.analysis.simulate.simulate_tiers`, a fraction of a second to seconds per
capacity on a 10M-lookup trace), so the search tries few capacities: a geometric bracket
(x4) then bisection to within ``rel`` of the answer, O(log n) replays instead of one per
capacity. It relies on the hit ratio not falling as the capacity grows. That holds exactly
for LRU (a stack algorithm: a larger LRU cache holds a superset of a smaller one's rows);
the other policies can dip slightly at some capacities, and then the answer is a capacity
where the ratio crosses the target, not necessarily the first one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import TierStoreError
from ..format.profile import Profile, TopProfile
from ..ids import distinct
from .simulate import simulate_tiers

__all__ = ["smallest_capacity", "size_tiers", "TierSizes", "TierCosts"]


def smallest_capacity(hit_ratio: Callable[[int], float], lo: int, hi: int, target: float, *,
                      rel: float = 0.02) -> int | None:
    """Smallest capacity in [lo, hi] with ``hit_ratio(cap) >= target``, to within ``rel``.

    ``hit_ratio`` must not decrease with the capacity (see the module docstring). Returns
    None when even ``hi`` misses the target. The answer ``c`` always reaches the target,
    and the true smallest capacity ``s`` satisfies ``c - s < max(1, int(rel * c))``: with
    ``rel=0`` the answer is exact. Calls ``hit_ratio`` O(log(hi / lo)) times.
    """
    if hit_ratio(hi) < target:
        return None
    c = max(lo, 1)
    while c < hi and hit_ratio(c) < target:  # bracket: lo misses the target, c reaches it
        lo, c = c, min(hi, c * 4)
    hi = c
    while hi - lo > max(1, int(rel * hi)):  # bisect: the answer stays in (lo, hi]
        mid = (lo + hi) // 2
        if hit_ratio(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class TierCosts:
    """Microseconds per looked-up row by where it is served from, to turn hit ratios into an
    expected lookup time (``tierstore size``'s slowdown, docs/v41_sizing.md's tokens/s).

    The defaults are this repository's measurements on its 2-core VM without a GPU
    (docs/benchmarks.md, "Mixed workload": synchronous 16,384-id lookups of 256-byte rows,
    default policy, one run): a row from memory 0.51 us (the lookup's time left after its
    disk reads, per id: bookkeeping included; without a GPU the device tier is memory too,
    so device and host cost the same), a row from disk 12.7 us (79K rows/s, O_DIRECT), and
    the resident baseline 0.13 us (the same ids gathered from a table held whole in memory,
    ``index_select``: 7.60M ids/s). A machine with a GPU has other costs: measure them and
    pass them (``--tier-costs``). The model is linear and synchronous: no overlap of disk
    reads with compute (a prefetching server hides them, docs/benchmarks.md).
    """

    device_us: float = 0.51
    host_us: float = 0.51
    disk_us: float = 12.7
    resident_us: float = 0.13  # all rows resident: a plain gather, no tiers

    def __post_init__(self) -> None:
        for name in ("device_us", "host_us", "disk_us", "resident_us"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                raise TierStoreError(f"{name}={v!r} is not a cost: give microseconds per row > 0, e.g. 0.5")

    @classmethod
    def parse(cls, text: str) -> "TierCosts":
        """``"DEVICE,HOST,DISK,RESIDENT"`` microseconds per row (``--tier-costs``)."""
        parts = text.split(",")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != 4:
            raise TierStoreError(f"--tier-costs {text!r}: give four numbers, microseconds per row served from "
                                 "device, host, disk and from a resident table, e.g. 0.51,0.51,12.7,0.13")
        return cls(*vals)

    def lookup_us(self, *, device_hit: float, host_hit: float) -> float:
        """Mean microseconds per lookup when ``device_hit`` of the lookups are served by the
        device tier, ``host_hit`` by the host tier and the rest by the disk."""
        disk = 1.0 - device_hit - host_hit
        if min(device_hit, host_hit) < 0 or disk < -1e-9:
            raise TierStoreError(f"device_hit={device_hit} and host_hit={host_hit} are not fractions of the "
                                 "lookups: each >= 0, together <= 1")
        return device_hit * self.device_us + host_hit * self.host_us + max(0.0, disk) * self.disk_us

    def slowdown(self, *, device_hit: float, host_hit: float) -> float:
        """Expected lookup time over that of all rows resident (1.0: as fast)."""
        return self.lookup_us(device_hit=device_hit, host_hit=host_hit) / self.resident_us


@dataclass
class TierSizes:
    """The smallest tiers for one table (``tierstore size --json`` emits these fields)."""

    table: str
    policy: str
    device_rows: int
    device_hit_ratio: float
    host_rows: int
    total_hit_ratio: float  # device + host hits over all lookups

    def to_dict(self) -> dict:
        return asdict(self)


def size_tiers(rows: np.ndarray, *, n_rows: int, policy: str, device_hit: float, total_hit: float,
               offsets: np.ndarray | None = None, profile: Profile | None = None, min_batch: int = 1,
               rel: float = 0.02, table: str = "", on_simulation: Callable[[], object] | None = None
               ) -> TierSizes:
    """The smallest device tier whose hit ratio reaches ``device_hit``, then the smallest host
    tier below it such that device and host together serve ``total_hit`` of the lookups.

    Both tiers run ``policy`` as the store runs them (``simulate_tiers``: the host tier sees
    the rows the device tier does not serve). ``rel`` is the search's tolerance
    (:func:`smallest_capacity`); ``on_simulation`` is called after each replay (a progress
    bar). Each (device, host) pair is replayed at most once.
    """
    for name, v in (("device_hit", device_hit), ("total_hit", total_hit)):
        if not 0.0 <= v <= 1.0:
            raise TierStoreError(f"{name}={v} is not a hit ratio: give a target between 0 and 1, e.g. 0.9")
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    seen: dict[tuple[int, int], dict] = {}

    def tiers(d: int, h: int) -> dict:
        if (d, h) not in seen:
            seen[(d, h)] = simulate_tiers(rows, d, h, policy, n_rows=n_rows, offsets=offsets,
                                          profile=profile, min_batch=min_batch)
            if on_simulation is not None:
                on_simulation()
        return seen[(d, h)]

    def device_ratio(d: int) -> float:
        return tiers(d, 0)["device"]["hit_ratio"]

    # A tier with room for every row the trace reads plus every row the profile preloads
    # never evicts: larger ones (short of the whole table, which is resident and hits every
    # lookup) get the same hits. The search stops there, so no tier of the table's size is
    # ever simulated (384M slots, ~100 GB of policy state, at V4.1's size).
    reach = distinct(rows).size + (0 if profile is None else _profiled_rows(profile))
    top = max(1, min(n_rows, reach))
    d = smallest_capacity(device_ratio, 1, top, device_hit, rel=rel) or n_rows  # else: the whole table

    def total_ratio(h: int) -> float:
        if h >= n_rows:  # a resident host tier serves every row the device tier does not
            return 1.0
        return 1 - tiers(d, h)["host"]["misses"] / max(1, rows.size)

    h = smallest_capacity(total_ratio, 1, top, total_hit, rel=rel) or n_rows
    return TierSizes(table, policy, d, device_ratio(d), h, total_ratio(h))


def _profiled_rows(profile: Profile) -> int:
    """Rows a profile may preload: its listed rows (a top list, a sparse pair) or nonzero counts."""
    if isinstance(profile, TopProfile):
        return int(profile.rows.size)
    if isinstance(profile, tuple):
        return int(np.asarray(profile[0]).size)
    return int(np.count_nonzero(np.asarray(profile)))
