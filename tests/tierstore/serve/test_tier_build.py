"""Open builds a table's host and device tiers' indexes at once (``table._both_tiers``): the
same tiers, each built once, on two threads when both are large; a failure of either is
raised after both ended, with the tier that was built closed."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore.cache.index import budget_for
from tierstore.format.profile import save_profile
from tierstore.serve import table as table_mod

from ...conftest import random_table

T = "blocks.1.engram.memory.weight"


class _Tier:
    def __init__(self, name, fail=False):
        if fail:
            raise RuntimeError(f"{name} failed")
        self.name, self.thread, self.closed = name, threading.get_ident(), False

    def close(self):
        self.closed = True


@pytest.mark.parametrize("parallel", [False, True])
def test_both_tiers_are_built_and_returned_in_order(parallel):
    h, d = table_mod._both_tiers(lambda: _Tier("host"), lambda: _Tier("device"), parallel=parallel)
    assert (h.name, d.name) == ("host", "device") and not h.closed and not d.closed
    assert (h.thread != d.thread) == parallel  # two threads only when asked


@pytest.mark.parametrize("parallel", [False, True])
def test_a_failed_tier_closes_the_other(parallel):
    built = []

    def ok(name):
        def make():
            built.append(_Tier(name))
            return built[-1]
        return make
    with pytest.raises(RuntimeError, match="device failed"):
        table_mod._both_tiers(ok("host"), lambda: _Tier("device", fail=True), parallel=parallel)
    assert [t.closed for t in built] == [True]
    built.clear()
    with pytest.raises(RuntimeError, match="host failed"):
        table_mod._both_tiers(lambda: _Tier("host", fail=True), ok("device"), parallel=parallel)
    assert [t.closed for t in built] == ([True] if parallel else [])  # in order, the device tier never starts


def test_open_builds_the_tiers_on_two_threads(tmp_path, monkeypatch):
    """With both tiers past the threshold, open builds them on two threads; the indexes and
    the rows served are those of the one-thread build."""
    n, dim = 20_000, 64
    save_file({T: random_table(n, dim, torch.float16, seed=3)}, str(tmp_path / "m.safetensors"))
    store = tierstore.build_store(tmp_path / "m.safetensors", tmp_path / "store", progress=False)
    counts = np.zeros(n, np.int64)
    counts[np.random.default_rng(1).choice(n, size=3000, replace=False)] = np.arange(3000, 0, -1)
    save_profile(store, T, counts)
    threads = []
    real = table_mod.CacheTier

    def spy(*a, **k):
        threads.append((a[0], threading.get_ident()))
        return real(*a, **k)
    monkeypatch.setattr(table_mod, "CacheTier", spy)
    opts = dict(device="cpu", device_budget=budget_for(500, 128, "default"),
                host_budget=budget_for(2500, 128, "default"))
    states, served = [], []
    ids = np.random.default_rng(2).integers(0, n, 5000)
    for limit in (1, 1 << 30):  # two threads, then one
        monkeypatch.setattr(table_mod, "_PARALLEL_TIERS", limit)
        threads.clear()
        with tierstore.open(store, **opts) as s:
            t = s._tables[T]
            states.append([a.copy() for tier in (t.host, t.dev) for a in tier.index.state])
            served.append(s.lookup(T, ids).clone())
        assert sorted(name for name, _ in threads) == ["device", "host"]
        assert (threads[0][1] != threads[1][1]) == (limit == 1)
    assert all(np.array_equal(a, b) for a, b in zip(*states))
    assert torch.equal(served[0], served[1])
