"""Our policies, one access at a time, against independent implementations: libCacheSim's
(the reference simulator of the cache-policy literature) and cachetools', on a random Zipf
trace and a real one (word ids of the Python standard library's source).

- lru, lfu: the same hits, exactly (libCacheSim LRU and LFU, cachetools.LFUCache).
- s3fifo: within 0.005 of libCacheSim's S3FIFO with the same parameters (10% small queue,
  a row moves to main after one hit in small, ghost of ~90%) at 500 and 2,000 rows. At 50
  rows (a small queue of 5) the two differ by up to 0.007: the queues' rounding and ghost
  bookkeeping differ, which matters only for such tiny caches.
- wtinylfu: ours deliberately differs from libCacheSim's W-TinyLFU: our main area is an LRU,
  not a segmented LRU (SLRU), and our sketch and doorkeeper differ in detail. Measured at
  500 rows over 20,000 accesses: within 0.005 on Zipf traffic, ahead on the real trace
  (0.768 vs 0.735); the test checks "never worse by more than 0.005". libCacheSim's
  W-TinyLFU reports no hits at all for caches of 50 rows (its 1% window rounds to 0), so it
  is compared at 500 rows only.
"""

from __future__ import annotations

import cachetools
import numpy as np
import pytest

libcachesim = pytest.importorskip("libcachesim")

from tierstore.cache_index import CacheIndex  # noqa: E402

from ..conftest import real_text_trace  # noqa: E402

N = 20000


TRACES = {"zipf": lambda: np.random.default_rng(1).zipf(1.1, N) % 20000, "real-text": lambda: real_text_trace(N)}


def ours(trace: np.ndarray, cap: int, policy: str) -> int:
    idx = CacheIndex(int(trace.max()) + 1, cap, policy, rng=0, pinned_rows=np.empty(0, np.int64))
    for r in trace:
        if idx.lookup(np.array([r]))[0] < 0:
            idx.admit(np.array([r]))
    return idx.hits


def libcachesim_hits(trace: np.ndarray, cap: int, cls, **kw) -> int:
    cache, hits = cls(cache_size=cap, **kw), 0
    for r in trace.tolist():
        req = libcachesim.Request()
        req.obj_id, req.obj_size = int(r) + 1, 1  # id 0 is reserved there
        hits += bool(cache.get(req))
    return hits


def cachetools_lfu_hits(trace: np.ndarray, cap: int) -> int:
    cache, hits = cachetools.LFUCache(cap), 0
    for r in trace.tolist():
        if r in cache:
            hits += 1
            cache[r]  # a read counts as a use
        else:
            cache[r] = True
    return hits


@pytest.fixture(scope="module", params=list(TRACES))
def trace(request):
    return request.param, TRACES[request.param]()


@pytest.mark.parametrize("cap", [50, 500])
def test_lru_and_lfu_hit_for_hit(trace, cap):
    _, t = trace
    assert ours(t, cap, "lru") == libcachesim_hits(t, cap, libcachesim.LRU)
    lfu = ours(t, cap, "lfu")
    assert lfu == libcachesim_hits(t, cap, libcachesim.LFU) == cachetools_lfu_hits(t, cap)


@pytest.mark.parametrize("cap", [500, 2000])
def test_s3fifo_within_half_a_percent(trace, cap):
    name, t = trace
    a = ours(t, cap, "s3fifo") / t.size
    b = libcachesim_hits(t, cap, libcachesim.S3FIFO, small_size_ratio=0.1, move_to_main_threshold=1) / t.size
    assert abs(a - b) <= 0.005, f"{name} @ {cap}: ours {a:.4f}, libCacheSim {b:.4f}"


def test_wtinylfu_is_not_worse_than_the_slru_variant(trace):
    name, t = trace
    a = ours(t, 500, "wtinylfu") / t.size
    b = libcachesim_hits(t, 500, libcachesim.WTinyLFU, window_size=0.01) / t.size
    assert a >= b - 0.005, f"{name}: ours {a:.4f}, libCacheSim {b:.4f}"
