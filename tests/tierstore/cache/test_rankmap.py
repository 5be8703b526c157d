"""The default policy's rank map (tierstore.cache.rankmap): a hash table that must give
exactly the ranks the sorted arrays' binary search gave, ranked rows or not."""

from __future__ import annotations

import numpy as np

from tierstore.cache import CacheIndex
from tierstore.cache.rankmap import rank_map, rank_map_bytes, rk_get_many


def _ranks_by_search(rows: np.ndarray, ranks: np.ndarray, queries: np.ndarray, m: int) -> np.ndarray:
    order = np.argsort(rows)
    srows, sranks = rows[order], ranks[order]
    i = np.minimum(np.searchsorted(srows, queries), max(0, srows.size - 1))
    found = (srows.size > 0) & (srows[i] == queries) if srows.size else np.zeros(queries.size, bool)
    return np.where(found, sranks[i] if srows.size else 0, m)


def test_rank_map_gives_the_sorted_search_ranks():
    rng = np.random.default_rng(11)
    for m in (1, 7, 8, 9, 1000, 50_000):
        rows = rng.choice(2**31 - 1, size=m, replace=False).astype(np.int64)
        ranks = rng.permutation(m).astype(np.int64)
        RK = rank_map(rows, ranks)
        assert RK.nbytes == rank_map_bytes(m) <= 2 * 8 * m + 128  # at most twice the sorted arrays (+ a minimum)
        queries = np.concatenate([rows, rng.integers(0, 2**31 - 1, 4 * m), rows[: m // 2] + 1, [0, 2**31 - 2]])
        out = np.empty(queries.size, np.int64)
        rk_get_many(RK, queries, m, out)
        assert (out == _ranks_by_search(rows, ranks, queries, m)).all(), m


def test_clustered_rows_and_no_ranking():
    rows = np.arange(5000, 9000, dtype=np.int64)  # consecutive ids: long probe runs if the hash were poor
    ranks = np.arange(rows.size, dtype=np.int64)[::-1].copy()
    RK = rank_map(rows, ranks)
    q = np.arange(4000, 10_000, dtype=np.int64)
    out = np.empty(q.size, np.int64)
    rk_get_many(RK, q, rows.size, out)
    assert (out == _ranks_by_search(rows, ranks, q, rows.size)).all()
    assert rank_map(np.zeros(0, np.int64), np.zeros(0, np.int64)).size == 0 and rank_map_bytes(0) == 0


def test_default_index_keeps_its_ranking_in_the_rank_map():
    """The index's RK holds the profile's ranked rows (hottest = rank 0) and what the budget
    sets aside for it: 10 bytes a ranked row, never more than twice the sorted arrays."""
    cap, n_rows = 4096, 10**6
    rng = np.random.default_rng(5)
    hot = rng.choice(n_rows, size=3 * cap, replace=False)
    idx = CacheIndex(n_rows, cap, "default", profile=(hot, np.arange(hot.size, 0, -1)))
    RK = idx.state[10]
    assert RK.nbytes == rank_map_bytes(cap) <= 2 * 8 * cap
    out = np.empty(hot.size, np.int64)
    rk_get_many(RK, hot.astype(np.int64), cap, out)
    assert (out[:cap] == np.arange(cap)).all() and (out[cap:] == cap).all()
    lru = CacheIndex(n_rows, cap, "lru", profile=(hot, np.arange(hot.size, 0, -1)))
    assert lru.state[10].nbytes == 0
