"""Our policies, one access at a time, against independent implementations: libCacheSim's
(the reference simulator of the cache-policy literature) and cachetools', on a random Zipf
trace and a real one (word ids of the Python standard library's source).

- lru, lfu: the same hits, exactly (libCacheSim LRU and LFU, cachetools.LFUCache).
- s3fifo: within 0.005 of libCacheSim's S3FIFO with the same parameters (10% small queue,
  a row moves to main after one hit in small, ghost of ~90%) at 500 and 2,000 rows. At 50
  rows (a small queue of 5) the two differ by up to 0.007: the queues' rounding and ghost
  bookkeeping differ, which matters only for such tiny caches.

W-TinyLFU and ARC: test_wtinylfu_arc.py; default: test_default.py (its own reference).
"""

from __future__ import annotations

import cachetools
import numpy as np
import pytest

libcachesim = pytest.importorskip("libcachesim")

from tierstore.cache import CacheIndex  # noqa: E402

from ...conftest import ordered_dict_lru_hits, real_text_trace  # noqa: E402

N = 20000


TRACES = {"zipf": lambda: np.random.default_rng(1).zipf(1.1, N) % 20000, "real-text": lambda: real_text_trace(N)}


def ours(trace: np.ndarray, cap: int, policy: str) -> int:
    """One access per lookup through the store's own walk (the simulator's replay)."""
    from tierstore.analysis.simulate import replay

    idx = CacheIndex(int(trace.max()) + 1, cap, policy, rng=0, pinned_rows=np.empty(0, np.int64))
    replay(idx, trace, np.arange(trace.size + 1))
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


@pytest.mark.parametrize("cap", [50, 500, 2000])
def test_lru_and_lfu_hit_for_hit(trace, cap):
    _, t = trace
    assert ours(t, cap, "lru") == ordered_dict_lru_hits(t, cap)
    assert ours(t, cap, "lru") == libcachesim_hits(t, cap, libcachesim.LRU)
    lfu = ours(t, cap, "lfu")
    assert lfu == libcachesim_hits(t, cap, libcachesim.LFU) == cachetools_lfu_hits(t, cap)


@pytest.mark.parametrize("cap", [500, 2000])
def test_s3fifo_within_half_a_percent(trace, cap):
    name, t = trace
    a = ours(t, cap, "s3fifo") / t.size
    b = libcachesim_hits(t, cap, libcachesim.S3FIFO, small_size_ratio=0.1, move_to_main_threshold=1) / t.size
    assert abs(a - b) <= 0.005, f"{name} @ {cap}: ours {a:.4f}, libCacheSim {b:.4f}"
