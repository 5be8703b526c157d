"""Shared checks of a cache index's state for the cache tests."""

from __future__ import annotations

import numpy as np

from tierstore.cache import CacheIndex
from tierstore.cache.layout import M_CAP, M_GCAP
from tierstore.cache.rowmap import rm_items


def mapped(idx: CacheIndex) -> tuple[np.ndarray, np.ndarray]:
    """Every row the index's map holds, sorted, and its value as in ``slots_of``. O(capacity)."""
    rows, vals = rm_items(idx.state[1])
    return rows, vals.astype(np.int32)


class slot_of_row:  # noqa: N801 - read like the dense array it stands for
    """``slot_of_row(idx)[rows]``: ``idx.slots_of`` with indexing syntax (the map's former
    form, a dense int32 array over the table, read the same way): an int gives an int, an
    array or a slice of rows an int32 array."""

    def __init__(self, index: CacheIndex):
        self._index = index

    def __getitem__(self, rows):
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self._index.n_rows))
        elif isinstance(rows, (int, np.integer)):
            return int(self._index.slots_of(np.array([rows]))[0])
        return self._index.slots_of(np.asarray(rows)).reshape(np.shape(rows))


def dense_map(idx: CacheIndex) -> np.ndarray:
    """The row map as the dense int32 array over the table it replaced (small tables only),
    after checking the hash table itself: every entry is found by a lookup of its row (the
    probe runs survived every deletion), and it holds at most one key per slot or ghost
    entry, at a load factor of at most 0.8 (rowmap.buckets)."""
    rows, vals = mapped(idx)
    assert np.unique(rows).size == rows.size, "a row has two entries"
    assert np.array_equal(idx.slots_of(rows), vals), "an entry of the map is not found by its row"
    M = idx.state[0]
    assert rows.size <= M[M_CAP] + M[M_GCAP] and 5 * rows.size <= 4 * idx.state[1].size
    sor = np.full(idx.n_rows, -1, np.int32)
    sor[rows] = vals
    return sor
