"""A hot-ordered build's row order, in memory sized by the profile's accessed rows, not the table.

The order (the one rule, :func:`tierstore.format.profile.hot_rows` with ``fill=True``): the
rows a saved profile counts, most accessed first, ties by ascending id; then every other
("cold") row in ascending id. Only the ``k`` accessed rows are held (as ids and their
sorted copy, ~24 B each); the cold rows, nearly all of a large table, are computed a chunk
at a time: cold row number ``c`` is ``c + #{i : hs[i] - i <= c}`` for the sorted hot ids
``hs`` (``hs[i] - i`` counts the cold rows below ``hs[i]``). Only the profile's accessed
rows are loaded (``load_profile(top=...)``), and the row -> position file is written
the same way (``order.write_order_streamed``), so nothing here is an array over the table
(at 384M rows a dense permutation was 3 GB, its inverse 1.5 GB, the counts 3 GB).
"""

from __future__ import annotations

import os
import numpy as np

from ..errors import CheckpointError
from .profile import TopProfile, load_profile, profile_info, profile_paths

__all__ = ["HotOrder", "load_hot_order", "CHUNK"]

CHUNK = 1 << 20  # ids per step when streaming counts or writing positions (~8-40 MB of temporaries)


class HotOrder:
    """The physical order of one table's rows: ``ids(start, stop)`` are the rows at file
    positions ``start:stop``; ``positions(start, stop)`` the positions of rows ``start:stop``
    (what the store's order file holds, ``tierstore.format.order.write_order_streamed``)."""

    def __init__(self, hot: np.ndarray, rows: int) -> None:
        self.hot = hot.astype(np.int64, copy=False)  # accessed rows, hottest first
        self.rows = rows
        self._rank = np.argsort(self.hot, kind="stable")  # hot position of each sorted hot id
        self._hs = self.hot[self._rank]  # sorted hot ids
        self._cold_key = self._hs - np.arange(self._hs.size, dtype=np.int64)  # cold rows below hs[i]

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Row ids at positions ``start:stop`` (int64): hot ones in rank order, then cold ascending."""
        k = self.hot.size
        head = self.hot[start:min(stop, k)]
        if stop <= k:
            return head.copy()
        c = np.arange(max(start, k) - k, stop - k, dtype=np.int64)
        cold = c + np.searchsorted(self._cold_key, c, side="right")
        return np.concatenate([head, cold]) if head.size else cold

    def hot_between(self, a: int, b: int) -> tuple[int, np.ndarray, np.ndarray]:
        """The hot rows with ids in ``a:b``: (how many hot ids are below ``a``, their ids
        ascending, their file positions). Costs two binary searches and views."""
        i0, i1 = (int(x) for x in np.searchsorted(self._hs, [a, b]))
        return i0, self._hs[i0:i1], self._rank[i0:i1]

    def positions(self, start: int, stop: int) -> np.ndarray:
        """File position of rows ``start:stop`` (int64): the inverse of :meth:`ids`."""
        x = np.arange(start, stop, dtype=np.int64)
        j = np.searchsorted(self._hs, x, side="left")  # hot rows below x
        pos = self.hot.size + x - j
        if self._hs.size:
            is_hot = self._hs[np.minimum(j, self._hs.size - 1)] == x
            pos[is_hot] = self._rank[j[is_hot]]
        return pos


def load_hot_order(store: str | os.PathLike[str], table: str, rows: int) -> HotOrder | None:
    """``table``'s saved profile in ``store`` as a :class:`HotOrder` over ``rows`` rows, or None
    when there is none. Only the accessed rows are loaded (``load_profile(top=...)`` streams a
    dense version-1 file; a version-2 file is sparse already); a profile of another length
    raises ``CheckpointError``, a damaged one ``CorruptDataError``, as ``load_profile``."""
    _, meta_path = profile_paths(store, table)
    if not meta_path.is_file():
        return None
    info = profile_info(store, table)
    if info["rows"] != rows:
        raise CheckpointError(f"profile of {table!r} in {store} has {info['rows']} rows, the table {rows}")
    top = load_profile(store, table, n_rows=rows, missing_ok=False, top=max(1, info["nonzero"]))
    assert isinstance(top, TopProfile) and top.complete
    return HotOrder(top.rows, rows)  # hottest first, ties by ascending id: hot_rows' ranking
