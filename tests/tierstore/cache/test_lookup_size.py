"""A lookup's cost is linear in its size, for every policy, with or without a profile that
fills the tier, up to lookups four times the tier's capacity (which stream through it).

Counted, not timed: the walk's accesses plus ``M_SCAN``, the leased entries victim searches
stepped over or parked and the candidates policies re-queued (tierstore.cache.structs).
Before leased fronts were remembered and leased heap tops parked, one lookup past a
tier's capacity cost 1,400-12,000 steps per id (``default`` with a profile: 65 s for
65,536 ids against a 262,144-slot tier)."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache import CacheIndex, policy_names
from tierstore.cache.layout import M_SCAN, M_TICK

N_ROWS = 200_000
CAP = 32_768


def _profile() -> np.ndarray:
    """Zipf counts on 2 x CAP scattered rows: the profile's hot set fills the tier."""
    rng = np.random.default_rng(1)
    hot = rng.choice(N_ROWS, size=2 * CAP, replace=False)
    counts = np.zeros(N_ROWS, np.int64)
    counts[hot] = np.maximum(1, 2e6 / np.arange(1, hot.size + 1)).astype(np.int64)
    return counts


def _work_per_id(idx: CacheIndex, k: int, seed: int) -> float:
    M = idx.state[0]
    ids = np.random.default_rng(seed).integers(0, N_ROWS, k)
    w0 = int(M[M_TICK] + M[M_SCAN])
    idx.lookup(ids)
    return (int(M[M_TICK] + M[M_SCAN]) - w0) / k


@pytest.mark.parametrize("profiled", [True, False], ids=["profile", "no-profile"])
@pytest.mark.parametrize("name", policy_names())
def test_per_id_work_does_not_grow_with_the_lookup(name, profiled):
    idx = CacheIndex(N_ROWS, CAP, name, profile=_profile() if profiled else None, rng=1)
    idx.lookup(np.random.default_rng(7).integers(0, N_ROWS, 2 * CAP))  # the tier full and churning
    held = idx.size  # CAP (static without a profile holds nothing)
    small = _work_per_id(idx, 4_096, 11)
    big = _work_per_id(idx, 131_072, 12)  # 4 x the tier: streams through it
    assert big <= 2.0 * small, f"{name}: {big:.2f} steps per id at 131,072 ids, {small:.2f} at 4,096"
    assert big <= 3.0, f"{name}: {big:.2f} steps per id at 131,072 ids"
    assert (idx.refcount == 0).all() and idx.size == held
