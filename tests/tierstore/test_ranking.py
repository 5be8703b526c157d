"""tierstore.ranking: a sparse profile's order (most accessed first, ties by row)."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.ranking import TopProfile


@pytest.mark.parametrize("high,top", [(384_006_168, 50), (2**31 - 1, 2**40)])
def test_from_pairs_ranks_by_count_then_row_as_lexsort(high, top):
    """The packed-key sort gives np.lexsort((rows, -counts))'s order, many ties included, and
    so does its fallback (counts too large to pack beside 31-bit rows)."""
    rng = np.random.default_rng(3)
    rows = rng.choice(high, 5000, replace=False).astype(np.int64)
    counts = rng.integers(0, 8, rows.size) * (top // 8) + (rng.random(rows.size) < 0.5)
    p = TopProfile.from_pairs(rows, counts, high)
    keep = counts > 0
    order = np.lexsort((rows[keep], -counts[keep]))
    assert np.array_equal(p.rows, rows[keep][order]) and np.array_equal(p.counts, counts[keep][order])
    assert p.rows.dtype == np.int64 and p.counts.dtype == np.int64
