"""Exact LRU at every capacity from stack distances, against independent LRU caches
(an OrderedDict LRU, cachetools.LRUCache) and the store's own LRU one access at a time."""

from __future__ import annotations

from collections import OrderedDict

import cachetools
import numpy as np
import pytest

from tierstore.cache import CacheIndex

from ...conftest import real_text_trace
from tierstore.analysis.stack_distance import dense_ids, lru_hits, stack_distances


def ordered_dict_lru(trace: np.ndarray, cap: int) -> tuple[int, int, int]:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = ins = ev = 0
    for r in trace.tolist():
        if r in cache:
            hits += 1
            cache.move_to_end(r)
            continue
        if cap == 0:
            continue
        if len(cache) >= cap:
            cache.popitem(last=False)
            ev += 1
        cache[r] = None
        ins += 1
    return hits, ins, ev


def cachetools_lru_hits(trace: np.ndarray, cap: int) -> int:
    cache = cachetools.LRUCache(maxsize=cap)
    hits = 0
    for r in trace.tolist():
        if r in cache:
            hits += 1
            cache[r]  # a read refreshes recency
        else:
            cache[r] = True
    return hits


TRACES = {
    "uniform": lambda: np.random.default_rng(0).integers(0, 300, 4000),
    "zipf": lambda: np.random.default_rng(1).zipf(1.2, 6000) % 5000,
    "real-text": lambda: real_text_trace(20000),
    "one-row": lambda: np.zeros(50, dtype=np.int64),
    "huge-ids": lambda: np.random.default_rng(2).integers(0, 300, 3000) * 10**12,
}


@pytest.mark.parametrize("name", TRACES)
def test_lru_at_every_capacity_equals_ordered_dict_and_cachetools(name):
    trace = TRACES[name]()
    caps = [0, 1, 2, 7, 64, 300, 1000, 10**6]
    got = lru_hits(trace, caps)
    for c in caps:
        assert got[c] == ordered_dict_lru(trace, c), f"capacity {c}"
        if c > 0:
            assert got[c][0] == cachetools_lru_hits(trace, c), f"capacity {c} vs cachetools"


@pytest.mark.parametrize("name", ["zipf", "real-text"])
def test_equals_the_stores_lru_one_access_at_a_time(name):
    trace = TRACES[name]()[:5000]
    dense = np.unique(trace, return_inverse=True)[1].reshape(-1)
    for cap in (16, 256):
        idx = CacheIndex(int(dense.max()) + 1, cap, "lru")
        for r in dense:
            idx.lookup(np.array([r]))
        assert lru_hits(dense, [cap])[cap] == (idx.hits, idx.insertions, idx.evictions)


def test_distances_by_hand():
    #                       a  b  a  c  b  a  a
    d = stack_distances(np.array([1, 2, 1, 3, 2, 1, 1]))
    assert d.tolist() == [-1, -1, 1, -1, 2, 2, 0]
    assert stack_distances(np.array([], dtype=np.int64)).size == 0


@pytest.mark.parametrize("name", TRACES)
def test_dense_ids_renumber_rows_in_id_order(name):
    """0..D-1 in ascending id order (np.unique's inverse), int32, or the ids themselves when small; stack distances from them
    are those of the ids themselves (only equalities matter)."""
    trace = TRACES[name]()
    ids, d = dense_ids(trace)
    uniq, inv = np.unique(trace, return_inverse=True)
    assert ids.dtype == np.int32
    if trace.max() >= 4 * trace.size:  # renumbered (small ids are kept as they are)
        assert np.array_equal(ids, inv.reshape(-1)) and d == uniq.size
    else:
        assert np.array_equal(ids, trace) and d == trace.max() + 1
    assert np.array_equal(stack_distances(trace, dense=(ids, d)), stack_distances(inv.reshape(-1)))
    assert dense_ids(np.empty(0, np.int64))[1] == 0


@pytest.mark.parametrize("high", [384_006_168, 2**40, 2**62])
def test_dense_ids_sort_path_equals_the_argsort_renumbering(high):
    """The packed-key sort (row and position in one int64) and its argsort fallback (ids too
    large to pack: 2**62 with 2**15 positions) both give np.unique's inverse exactly."""
    rng = np.random.default_rng(7)
    trace = rng.integers(0, high, 2000, dtype=np.int64)
    trace = np.concatenate([trace, trace[rng.integers(0, trace.size, 30_000)], [0, high - 1]])
    ids, d = dense_ids(trace)
    uniq, inv = np.unique(trace, return_inverse=True)
    assert ids.dtype == np.int32 and d == uniq.size
    assert np.array_equal(ids, inv.reshape(-1))
    assert np.array_equal(dense_ids(trace.astype(np.uint64))[0], ids)
