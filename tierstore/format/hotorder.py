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
    and ``of(rows)`` those of any rows (what a store's order file holds,
    ``tierstore.format.order``). Memory: the hot ids, their sorted copy and each sorted id's
    rank: 12 bytes per hot id below 2**31 rows (24 above), nothing per other row.

    Raises ``ValueError`` when ``hot`` repeats a row or holds one outside ``[0, rows)``."""

    def __init__(self, hot: np.ndarray, rows: int) -> None:
        dt = np.int32 if rows < 2**31 else np.int64
        self.hot = np.asarray(hot).astype(dt, copy=False)  # accessed rows, hottest first
        self.rows = rows
        self._rank = np.argsort(self.hot, kind="stable").astype(dt, copy=False)  # hot position of each sorted id
        self._hs = self.hot[self._rank]  # sorted hot ids
        if self._hs.size and (self._hs[0] < 0 or self._hs[-1] >= rows or (self._hs[1:] == self._hs[:-1]).any()):
            raise ValueError(f"the hot rows must be distinct row ids in [0, {rows})")
        self._cold_key: np.ndarray | None = None  # cold rows below hs[i]: only for ids() past the head

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self.hot.nbytes + self._rank.nbytes + self._hs.nbytes + \
            (self._cold_key.nbytes if self._cold_key is not None else 0)

    def release(self) -> None:
        """Drop what only ``ids`` past the head needed."""
        self._cold_key = None

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Row ids at positions ``start:stop`` (int64): hot ones in rank order, then cold ascending."""
        k = self.hot.size
        head = self.hot[start:min(stop, k)].astype(np.int64)
        if stop <= k:
            return head
        if self._cold_key is None:
            self._cold_key = self._hs.astype(np.int64) - np.arange(self._hs.size, dtype=np.int64)
        c = np.arange(max(start, k) - k, stop - k, dtype=np.int64)
        cold = c + np.searchsorted(self._cold_key, c, side="right")
        return np.concatenate([head, cold]) if head.size else cold

    def hot_between(self, a: int, b: int) -> tuple[int, np.ndarray, np.ndarray]:
        """The hot rows with ids in ``a:b``: (how many hot ids are below ``a``, their ids
        ascending, their file positions; int64). Costs two binary searches and a copy of those."""
        i0, i1 = (int(x) for x in np.searchsorted(self._hs, np.array([a, b], dtype=self._hs.dtype)))
        return i0, self._hs[i0:i1].astype(np.int64), self._rank[i0:i1].astype(np.int64)

    def sorted_ranks(self) -> np.ndarray:
        """The file position of each hot row, the rows taken in ascending id (a view: do not write)."""
        return self._rank

    def of(self, rows: np.ndarray) -> np.ndarray:
        """File position of each of ``rows`` (valid row ids, any order; int64): its rank if it
        is hot, else the hot rows' count plus the cold rows below it. One binary search each."""
        x = np.asarray(rows).astype(self._hs.dtype, copy=False)  # searchsorted must not convert _hs
        j = np.searchsorted(self._hs, x, side="left")  # hot rows below x
        pos = self.hot.size + x.astype(np.int64) - j
        if self._hs.size:
            jj = np.minimum(j, self._hs.size - 1)
            is_hot = self._hs[jj] == x
            pos[is_hot] = self._rank[jj[is_hot]]
        return pos

    def positions(self, start: int, stop: int) -> np.ndarray:
        """File position of rows ``start:stop`` (int64): the inverse of :meth:`ids`."""
        return self.of(np.arange(start, stop, dtype=np.int64))


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
