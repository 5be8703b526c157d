"""The one ranking of table rows by an access profile, and the profile forms that carry it.

Everywhere a profile places rows (the static and default policies' hot sets, the shared
host tier's rows, a hot-ordered build, the hot-set snapshot) the rows are ranked by
:func:`hot_rows`: more accesses first, equal counts in ascending row id. A profile is a
dense count per row, a ``(rows, counts)`` pair, or a :class:`TopProfile` (the hottest rows
only: what a store keeps, sized by its budgets). This is the foundation layer, so the cache
layer ranks rows without importing the on-disk format (``tierstore.format.profile`` saves
and loads profiles and re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

from .errors import IdTypeError, TierStoreError
from .ids import distinct

__all__ = ["Profile", "TopProfile", "as_profile", "hot_rows", "ranks_after"]

_EMPTY = np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class TopProfile:
    """The hottest rows of a profile with their counts, hottest first (``hot_rows``'s
    ranking): what a store keeps of a profile, O(its budgets) instead of a count per table
    row (8 bytes per row is 3 GB at DeepSeek-V4.1's 384M rows).

    ``complete``: ``rows`` holds every row with a nonzero count (the ranking of any k is
    exact); otherwise only ``hot_rows(k)`` for k <= len(rows) is known."""

    rows: np.ndarray  # int64, hottest first; equal counts in ascending row id
    # int64 > 0, non-increasing; None: the ranking alone (read from a hot-set snapshot at open,
    # ``tiers.hotset.TableSnapshot.ranking``: placing rows needs only their order)
    counts: np.ndarray | None
    n_rows: int  # rows of the table
    complete: bool
    # the whole ranking's rank of ``rows[0]``: 0, or the ranks a tier above holds were cut
    # off (``after``); a hot-set snapshot holds rank r at its position r
    first: int = 0

    def after(self, k: int) -> "TopProfile":
        """This ranking without its ``k`` hottest rows (O(1): views): what is left for a tier
        below one that places those ``k`` (``serve.table``: the host tier below a device tier
        in the same memory)."""
        k = max(0, min(int(k), self.rows.size))
        return TopProfile(self.rows[k:], None if self.counts is None else self.counts[k:], self.n_rows,
                          self.complete, self.first + k)

    @classmethod
    def from_pairs(cls, rows: np.ndarray, counts: np.ndarray, n_rows: int) -> "TopProfile":
        """A sparse profile, ``counts[i]`` accesses of ``rows[i]`` (any order, each row once;
        zero counts are dropped), ranked."""
        rows = np.asarray(rows)
        counts = np.asarray(counts)
        if rows.ndim != 1 or counts.shape != rows.shape or rows.dtype.kind not in "iu" or counts.dtype.kind not in "iu":
            raise IdTypeError(f"a sparse profile is (rows, counts), two 1-D integer arrays of one length; got "
                              f"{rows.dtype} {rows.shape} and {counts.dtype} {counts.shape}")
        rows = rows.astype(np.int64)
        counts = counts.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise TierStoreError(f"sparse profile rows must lie in [0, {n_rows}); got "
                                 f"[{int(rows.min())}, {int(rows.max())}]")
        if counts.size and counts.min() < 0:
            raise TierStoreError("profile counts must be non-negative")
        if distinct(rows).size != rows.size:  # not np.unique: see tierstore.ids.distinct
            raise TierStoreError("a sparse profile lists a row twice; sum its counts into one entry")
        keep = counts > 0
        rows, counts = rows[keep], counts[keep]
        return cls(*_by_count_then_row(rows, counts), int(n_rows), True)


def _by_count_then_row(rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` and ``counts`` (each row once, counts > 0) by count, most first, then by row:
    ``np.lexsort((rows, -counts))``'s order. Where ``(max count - count, row)`` packs into one
    int64, one ``np.sort`` of the packed keys gives it ~3x faster (a V4.1 profile trace of
    24M ids ranks 7M rows)."""
    if not rows.size:
        return rows, counts
    top = int(counts.max())
    row_bits = max(1, int(rows.max()).bit_length())
    if top.bit_length() + row_bits > 63:
        order = np.lexsort((rows, -counts))
        return rows[order], counts[order]
    key = (top - counts) << row_bits
    key |= rows
    key.sort()
    mask = (1 << row_bits) - 1
    return key & mask, top - (key >> row_bits)


Profile = Union[np.ndarray, TopProfile, tuple]  # dense counts, a top list, or (rows, counts)


def as_profile(profile: Profile | None, n_rows: int) -> np.ndarray | TopProfile | None:
    """``profile`` checked against a table of ``n_rows`` rows: a dense array of one count per
    row as it is, a ``(rows, counts)`` pair as a :class:`TopProfile`."""
    if profile is None or isinstance(profile, TopProfile):
        if profile is not None and profile.n_rows != n_rows:
            raise TierStoreError(f"the profile is of a table of {profile.n_rows} rows, this one has {n_rows}")
        return profile
    if isinstance(profile, tuple):
        if len(profile) != 2:
            raise TierStoreError(f"a sparse profile is a (rows, counts) pair, got a tuple of {len(profile)}")
        return TopProfile.from_pairs(profile[0], profile[1], n_rows)
    profile = np.asarray(profile)
    if profile.shape != (n_rows,):
        raise TierStoreError(f"profile has shape {profile.shape}, expected ({n_rows},): one count per row "
                             "(or a sparse (rows, counts) pair)")
    return profile


def ranks_after(profile: Profile | None, k: int, n_rows: int) -> np.ndarray | TopProfile | None:
    """``profile``'s ranking without its ``k`` hottest rows (a :class:`TopProfile`; dense
    counts are ranked first, O(accessed rows)): what a host tier below a device tier of ``k``
    rows in the same memory places (``StoreOptions.exclusive``). ``profile`` itself where there
    is no such tier (``k <= 0``) or it is resident (``k >= n_rows``); None stays None."""
    if profile is None or not 0 < k < n_rows:
        return profile
    p = as_profile(profile, n_rows)
    if p is None:
        return p
    if not isinstance(p, TopProfile):
        nz = np.flatnonzero(p)
        p = TopProfile.from_pairs(nz, p[nz], n_rows)
    return p.after(k)


def _top_fill(p: TopProfile, k: int, fill: bool) -> np.ndarray:
    """``hot_rows`` of a top list."""
    top = p.rows[:k]
    if top.size < k and not p.complete:
        raise TierStoreError(f"this profile keeps only its {p.rows.size} hottest rows, {k} were asked for; "
                             f"load it with load_profile(..., top={k})")
    if fill and top.size < k:
        # the lowest ids not in the hot list: among [0, k) at most len(top) are hot
        cand = np.arange(min(k, p.n_rows), dtype=np.int64)
        cold = np.setdiff1d(cand, top, assume_unique=True)[: k - top.size]
        top = np.concatenate([top, cold])
    return top.astype(np.int64, copy=False)


def hot_rows(profile: np.ndarray | TopProfile | None, k: int, *, fill: bool = False) -> np.ndarray:
    """The ``k`` hottest rows of a profile, hottest first: the one ranking of rows by a profile.

    The rule, everywhere a profile places rows (the static and default policies' hot sets,
    the shared host tier's rows, a hot-ordered build): more accesses first; equal counts in
    ascending row id, so every process, run and machine picks the same rows. Rows never
    accessed (count 0) are not hot: they are left out, so a policy does not pin rows the
    profile knows nothing about. ``fill=True`` is for callers that must place exactly ``k``
    rows (a tier of fixed size, a full permutation of the table): the never-accessed rows
    then follow the hot ones, in ascending row id. Returns int64 row ids (at most ``k``).

    Cost: one partition over the accessed rows plus a sort of the ``k`` chosen (a full
    argsort only when ``k`` covers them all); of a :class:`TopProfile`, O(k).
    """
    if profile is None or k <= 0:
        return _EMPTY
    if isinstance(profile, TopProfile):
        return _top_fill(profile, k, fill)
    counts = np.asarray(profile)
    if counts.dtype.kind == "u":  # -count of an unsigned count would wrap
        counts = counts.astype(np.int64)
    nz = np.flatnonzero(counts > 0)
    if nz.size > k:
        c = counts[nz]
        thresh = c[np.argpartition(-c, k - 1)[k - 1]]  # the k-th largest count
        above = nz[c > thresh]
        tied = nz[c == thresh][: k - above.size]  # the lowest ids among the tied
        nz = np.concatenate([above, tied])
    top = nz[np.lexsort((nz, -counts[nz]))]
    if fill and top.size < k:
        cold = np.flatnonzero(counts <= 0)[: k - top.size]
        top = np.concatenate([top, cold])
    return top.astype(np.int64, copy=False)
