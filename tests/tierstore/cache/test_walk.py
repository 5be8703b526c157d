"""The one walk: a live store and the simulator run the same compiled code, so their
counters agree exactly, for every policy, with recorded batches and two cache tiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tierstore
from tierstore.cache import CacheIndex, policy_names
from tierstore.format.profile import load_profile, save_profile
from tierstore.analysis.simulate import batch_bounds, replay, simulate, simulate_tiers
from tierstore.analysis.stack_distance import lru_hits

from ...conftest import one_table_store, real_text_trace


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("walk")
    path, w = one_table_store(tmp, "t.engram.memory.weight", 3000, 16)
    np.save(tmp / "w.npy", w.numpy())
    return path


@pytest.mark.parametrize("policy", [pytest.param(p, marks=pytest.mark.slow) if p in ("lfu", "wtinylfu", "arc") else p
                                    for p in policy_names()])  # the fast tier keeps four of the seven
@pytest.mark.parametrize("exclusive", [False, True], ids=["inclusive", "exclusive"])
def test_store_counters_equal_the_simulation(store, policy, exclusive):
    rng = np.random.default_rng(3)
    rows = (rng.zipf(1.2, 20_000) % 3000).astype(np.int64)
    offsets = np.unique(np.r_[0, np.sort(rng.integers(1, rows.size, 400))])
    profile = np.bincount(rng.zipf(1.2, 50_000) % 3000, minlength=3000)
    save_profile(store, "t.engram.memory.weight", profile)  # the store places rows by it, as the simulation
    w = np.load(store.parent / "w.npy")
    dev_rows, host_rows = 60, 400
    with tierstore.open(store, device="cpu", device_budget=dev_rows * 64, host_budget=host_rows * 64,
                        policy=policy, exclusive=exclusive) as st:
        bounds = batch_bounds(rows.size, offsets)
        for a, b in zip(bounds[:-1], bounds[1:]):
            got = st.lookup("t.engram.memory.weight", rows[a:b])
            assert np.array_equal(got.numpy().view(np.uint32), w[rows[a:b]].view(np.uint32))
        live = st.stats()["tables"]["t.engram.memory.weight"]
    # the budgets pay for the bookkeeping too: the tiers hold fewer rows than budget // 64
    dev_rows, host_rows = live["device"]["capacity_rows"], live["host"]["capacity_rows"]
    assert 0 < dev_rows < 60 and 0 < host_rows < 400
    # exclusive: the host tier ranks after the device tier's rows, and the simulation too
    sim = simulate_tiers(rows, dev_rows, host_rows, policy, n_rows=3000, offsets=offsets, profile=profile,
                         exclusive=exclusive)
    for tier in ("device", "host"):
        assert (live[tier]["hits"], live[tier]["misses"]) == (sim[tier]["hits"], sim[tier]["misses"]), tier


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_stack_distances_equal_the_walk_when_batches_fit(batch):
    """LRU from stack distances equals the walk's LRU for recorded batches no longer than the
    capacity (the leased rows of a batch are its most recent: never LRU's victim)."""
    trace = real_text_trace(30_000)
    n = int(trace.max()) + 1
    bounds = batch_bounds(trace.size, np.arange(0, trace.size, batch))
    for cap in (64, 500, 3000):
        idx = CacheIndex(n, cap, "lru")
        replay(idx, trace, bounds)
        assert lru_hits(trace, [cap])[cap][0] == idx.hits, cap
        fast = simulate(trace, [cap], ["lru"], offsets=np.arange(0, trace.size, batch))[0]
        assert fast.hits == idx.hits


def test_a_batch_longer_than_the_capacity_is_replayed_not_estimated():
    trace = real_text_trace(5_000)
    off = np.arange(0, trace.size, 100)
    r = simulate(trace, [50], ["lru"], offsets=off)[0]
    idx = CacheIndex(int(trace.max()) + 1, 50, "lru")
    replay(idx, trace, batch_bounds(trace.size, off))
    assert r.hits == idx.hits


def test_recorded_events_with_hints_replay_to_the_live_counters(store):
    """Lookups and Store.hint calls, recorded in the order the walk saw them, replay through
    fresh tiers to exactly the live counters (the simulator's prediction of a served queue)."""
    from tierstore.analysis.simulate import replay_events

    rng = np.random.default_rng(8)
    with tierstore.open(store, device="cpu", device_budget=50 * 64, host_budget=300 * 64, policy="default") as st:
        t = st._tables["t.engram.memory.weight"]
        t.events = []
        queue = [(rng.zipf(1.3, 200) % 3000).astype(np.int64) for _ in range(30)]
        for i, b in enumerate(queue):
            for j in range(i + 1, min(i + 4, len(queue))):
                st.hint("t.engram.memory.weight", queue[j])
            st.lookup("t.engram.memory.weight", b)
        # two lookups in flight at once (as a worker and the model thread): the second meets
        # rows the first admitted but has not written yet, and reads them from below
        a = t.begin(np.arange(2500, 2600, dtype=np.int64))
        b = t.begin(np.arange(2520, 2620, dtype=np.int64))
        out = torch.empty(100, 16)
        t.complete(b, out)
        t.complete(a, out)
        live = st.stats()["tables"]["t.engram.memory.weight"]
        prof = load_profile(store, "t.engram.memory.weight")  # as the store placed its rows
        dev = CacheIndex(3000, t.dev.capacity, "default", profile=prof)
        host = CacheIndex(3000, t.host.capacity, "default", profile=prof)
        replay_events(dev, t.events, host=host)
    assert (dev.hits, dev.misses) == (live["device"]["hits"], live["device"]["misses"])
    assert (host.hits, host.misses) == (live["host"]["hits"], live["host"]["misses"])
    assert sum(e[0] == "hint" for e in t.events) > 0


@pytest.mark.parametrize("batch", [1, 24])
@pytest.mark.parametrize("policy", policy_names())
def test_the_replay_decides_as_the_store_walk(policy, batch):
    """The simulator's compiled replay (walk.replay, which prefetches the map buckets of the
    accesses ahead) leaves every tier in the very state the store's walk (``Walker.begin`` +
    ``end`` per lookup, no prefetch) does: counters, the map's rows and slots, every state
    array but the lease epochs, over ids spread across a V4.1-sized id space."""
    from tierstore.cache.layout import CACHED, M_EPOCH, NONE
    from tierstore.cache.lookup import Walker
    from tierstore.cache.rowmap import rm_items

    rng = np.random.default_rng(11)
    n_rows = 384_006_168
    hot = rng.choice(n_rows, 6_000, replace=False)
    rows = hot[rng.zipf(1.3, 12_000) % hot.size].astype(np.int64)
    profile = (hot[:3_000].astype(np.int64), np.arange(3_000, 0, -1, dtype=np.int64))
    bounds = batch_bounds(rows.size, None if batch == 1 else np.arange(0, rows.size, batch))
    for cap in (40, 700):
        sim = CacheIndex(n_rows, cap, policy, profile=profile, rng=5)
        replay(sim, rows, bounds)
        live = CacheIndex(n_rows, cap, policy, profile=profile, rng=5)
        w = Walker(live, CACHED, None, NONE)
        for a, b in zip(bounds[:-1], bounds[1:]):
            w.end(w.begin(np.ascontiguousarray(rows[a:b])))
        assert sim.misses > 0 and (sim.evictions > 0 or policy == "static"), "the tier must fill and evict"
        assert (sim.hits, sim.misses, sim.evictions, sim.insertions, sim.bypassed) == \
            (live.hits, live.misses, live.evictions, live.insertions, live.bypassed), cap
        for x, y in zip(rm_items(sim.state[1]), rm_items(live.state[1])):
            assert np.array_equal(x, y), cap
        # every state array but the lease markers (ep: one access per lookup needs none, so
        # the replay's fast path keeps no epochs) and the epoch counter in M
        keep = np.arange(sim.state[0].size) != M_EPOCH
        assert np.array_equal(sim.state[0][keep], live.state[0][keep]), cap
        for i, (x, y) in enumerate(zip(sim.state, live.state)):
            assert i in (0, 4) or np.array_equal(x, y), (cap, i)
