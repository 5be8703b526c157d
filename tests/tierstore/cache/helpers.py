"""Shared checks of a cache index's state for the cache tests."""

from __future__ import annotations

import numpy as np

from tierstore.cache import CacheIndex
from tierstore.cache.layout import M_CAP, M_GCAP


def dense_map(idx: CacheIndex) -> np.ndarray:
    """The row map as the dense int32 array over the table it replaced (small tables only),
    after checking the hash table itself: every entry is found by a lookup of its row (the
    probe runs survived every deletion), and it holds at most one key per slot or ghost
    entry, at a load factor of at most 1/2."""
    rows, vals = idx.mapped()
    assert np.unique(rows).size == rows.size, "a row has two entries"
    assert np.array_equal(idx.slots_of(rows), vals), "an entry of the map is not found by its row"
    M = idx.state[0]
    assert rows.size <= M[M_CAP] + M[M_GCAP] and 2 * rows.size <= idx.state[1].size
    sor = np.full(idx.n_rows, -1, np.int32)
    sor[rows] = vals
    return sor
