"""Tier behaviour under pressure: budgets, leases, injected I/O failures, static hot sets."""

from __future__ import annotations

import gc

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore import StoreIOError, TierStoreError
from tierstore.cache import CacheIndex
from tierstore.tiers import placement
from tierstore.cache.index import slots_within
from tierstore.cache.layout import M_NREF

from ...conftest import bits, random_table
from ..cache.helpers import slot_of_row

T1 = "blocks.1.engram.memory.weight"


@pytest.fixture
def store_and_weight(tmp_path, small_ckpt):
    ckpt, tensors = small_ckpt
    return tierstore.build_store(ckpt, tmp_path / "store", progress=False), tensors[T1]


def test_lease_keeps_rows_until_gathered(store_and_weight, monkeypatch):
    """Between looking rows up and copying them out, another lookup evicts the whole cache.

    The seam is the device tier's gather (on the CPU, the compiled placement's copy:
    tiers.placement), wrapped by the test: the outer lookup's bookkeeping is done and its
    rows leased when its bytes are copied out, and right then a nested lookup
    of 8 other rows runs. With leases the outer lookup still returns its rows; with leases
    disabled the same sequence returns rows that were overwritten (so this test can fail).
    """
    path, w = store_and_weight

    def run(leases: bool) -> torch.Tensor:
        with tierstore.open(path, device="cpu", device_budget=8 * 256, host_budget=0, policy="lru") as store:
            table = store._tables[T1]
            store.lookup(T1, np.arange(8))  # fill all 8 device slots
            nested = {"done": False}
            real_gather = table.dev.gather

            def evict_everything():
                if not nested["done"]:
                    nested["done"] = True
                    ref, M = table.dev.index.refcount, table.dev.index.state[0]
                    held, n_ref = ref.copy(), M[M_NREF]
                    if not leases:
                        ref[:] = 0  # drop the outer lookup's leases (restored for its finish)
                        M[M_NREF] = 0
                    table.gather(np.arange(100, 108), torch.empty(8, 64).view(torch.int32))
                    ref[:] = held
                    M[M_NREF] = n_ref

            def evict_everything_then_gather(*args, **kwargs):
                evict_everything()
                return real_gather(*args, **kwargs)

            def entries(args_memory, args_arrived):  # the compiled CPU path copies device hits itself
                memory, arrived = real_entries(args_memory, args_arrived)

                def evict_everything_then_copy(*a):
                    evict_everything()
                    return memory(*a)
                return evict_everything_then_copy, arrived

            real_entries = placement._entries
            monkeypatch.setattr(placement, "_entries", entries)
            monkeypatch.setattr(table.dev, "gather", evict_everything_then_gather)
            got = store.lookup(T1, np.arange(8))
            assert nested["done"], "the outer lookup never reached the device tier's gather"
            return got

    got = run(leases=True)
    assert torch.equal(bits(got), bits(w[:8])), "a leased row was evicted before it was copied out"
    unleased = run(leases=False)
    assert not torch.equal(bits(unleased), bits(w[:8])), "without leases the rows should have been overwritten"


def test_injected_io_failure_surfaces_from_result(store_and_weight):
    path, w = store_and_weight
    with tierstore.open(path, device="cpu", device_budget=0, host_budget=0) as store:
        reader = store._tables[T1].disk.reader
        real = reader.read_pages

        def failing(pages, out=None):
            raise StoreIOError(5, "injected EIO reading pages")

        reader.read_pages = failing
        fut = store.prefetch(T1, [1, 2, 3])
        with pytest.raises(StoreIOError, match="injected EIO"):
            fut.result(timeout=30)
        reader.read_pages = lambda pages, out=None: (_ for _ in ()).throw(RuntimeError("driver bug"))
        with pytest.raises(TierStoreError, match="RuntimeError: driver bug"):
            store.lookup(T1, [4])
        reader.read_pages = real
        assert torch.equal(bits(store.lookup(T1, [1, 2, 3])), bits(w[[1, 2, 3]]))  # still serving


def test_zero_budget_disables_tiers_and_full_budget_is_resident(store_and_weight):
    path, w = store_and_weight
    with tierstore.open(path, device="cpu", device_budget=0, host_budget=0) as store:
        store.lookup(T1, [5, 5, 6])
        s = store.stats()["tables"][T1]
        assert s["device"]["capacity_rows"] == 0 and s["host"]["capacity_rows"] == 0
        assert s["disk"]["rows_read"] == 2
    with tierstore.open(path, device="cpu", device_budget="64MiB") as store:
        s = store.stats()["tables"][T1]
        assert s["device"]["resident"] and s["disk"]["rows_read"] == 0
        ids = torch.randint(0, 5003, (1000,))
        assert torch.equal(bits(store.lookup(T1, ids)), bits(w[ids]))
        assert store.stats()["tables"][T1]["disk"]["rows_read"] == 0


@pytest.mark.slow
def test_budgets_bound_resident_memory(tmp_path):
    """RSS grows by about the budgets, not the table, however many rows are looked up."""
    rows, dim = 1 << 20, 64  # 256 MiB of float32
    ckpt = tmp_path / "big.safetensors"
    save_file({"big.engram.memory.weight": random_table(rows, dim, torch.float32)}, str(ckpt))
    path = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    ckpt.unlink()
    gc.collect()
    proc = psutil.Process()
    dev_b, host_b = 8 << 20, 24 << 20
    before = proc.memory_info().rss
    with tierstore.open(path, device="cpu", device_budget=dev_b, host_budget=host_b) as store:
        rng = np.random.default_rng(0)
        for _ in range(12):
            store.lookup("big.engram.memory.weight", rng.integers(0, rows, 8192))
        grown = proc.memory_info().rss - before
        s = store.stats()
    meta = 2 * rows * 4 + 64 << 20  # slot maps of two tiers, policy state, pools, reader buffers
    # each budget pays for its rows and their bookkeeping (tierstore.cache.index.slots_within)
    assert s["device"]["rows"] <= s["device"]["capacity_rows"] == slots_within(dev_b, dim * 4, "default")
    assert s["host"]["rows"] <= s["host"]["capacity_rows"] == slots_within(host_b, dim * 4, "default")
    assert grown < dev_b + host_b + meta, f"RSS grew {grown >> 20} MiB for budgets of {(dev_b + host_b) >> 20} MiB"
    assert grown < rows * dim * 4 // 2  # far below the table


def test_static_hot_set_from_profile(tmp_path, small_ckpt):
    """With a saved profile, the hottest rows are loaded into the tiers at open."""
    profile_mod = pytest.importorskip("tierstore.format.profile")
    ckpt, tensors = small_ckpt
    path = tierstore.build_store(ckpt, tmp_path / "store", progress=False)
    counts = np.zeros(5003, dtype=np.int64)
    hot = np.random.default_rng(0).choice(5003, 50, replace=False)
    counts[hot] = 1000 + np.arange(50)
    profile_mod.save_profile(path, T1, counts)
    with tierstore.open(path, device="cpu", device_budget=5003 * 256 // 50, host_budget=5003 * 256 // 10,
                        policy="static") as store:
        got = store.lookup(T1, hot)
        s = store.stats()["tables"][T1]
        assert torch.equal(bits(got), bits(tensors[T1][hot]))
        assert s["device"]["hits"] + s["host"]["hits"] == len(hot) and s["disk"]["rows_read"] == 0


def test_hot_set_loads_in_bounded_steps(tmp_path, small_ckpt, monkeypatch):
    """Loading the profile's hot set at open reads at most PRELOAD_BYTES of rows per disk call
    (an 8 GiB host tier must not stage 8 GiB more while it loads), and still loads every row
    exactly: the rows answer from the tiers, bit for bit."""
    from tierstore.format.profile import save_profile
    from tierstore.tiers import hotset as hotset_mod
    from tierstore.tiers.disk import DiskTier

    ckpt, tensors = small_ckpt
    path = tierstore.build_store(ckpt, tmp_path / "store", progress=False)
    counts = np.random.default_rng(1).integers(1, 1000, 5003)
    save_profile(path, T1, counts)
    monkeypatch.setattr(hotset_mod, "PRELOAD_BYTES", 100 * 256)  # 100 rows of 64 float32
    calls: list[int] = []
    real = DiskTier.gather

    def spy(self, rows, out=None):
        calls.append(len(rows))
        return real(self, rows, out)

    monkeypatch.setattr(DiskTier, "gather", spy)
    with tierstore.open(path, device="cpu", device_budget=600 * 256, host_budget=3000 * 256, policy="static",
                        use_profile=True) as store:
        loaded = list(calls)
        hot = np.argsort(-counts, kind="stable")[:400]
        got = store.lookup(T1, hot)
        s = store.stats()["tables"][T1]
    assert sum(loaded) >= 400 and max(loaded) <= 100, f"hot set read in steps of {sorted(set(loaded))[-3:]} rows"
    assert torch.equal(bits(got), bits(tensors[T1][hot]))
    assert s["disk"]["rows_read"] == 0


@pytest.mark.gpu
def test_cuda_tiers_exact_and_within_budget(store_and_weight):
    path, w = store_and_weight
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with tierstore.open(path, device="cuda", device_budget=w.nbytes // 10, host_budget=w.nbytes // 3) as store:
        slab = torch.cuda.memory_allocated() - base
        assert slab <= w.nbytes // 10
        assert store._tables[T1].host.slab.is_pinned()
        ids = torch.randint(0, 5003, (4, 1000), device="cuda")
        fut = store.prefetch(T1, ids)
        got = fut.result()
        assert got.is_cuda
        assert torch.equal(bits(got.cpu()), bits(w[ids.cpu()]))
        for _ in range(5):
            got = store.lookup(T1, ids)
        torch.cuda.synchronize()
        assert torch.equal(bits(got.cpu()), bits(w[ids.cpu()]))


def test_one_lease_per_lookup_not_per_repeat():
    """A lookup leases each distinct slot once; a concurrent lookup holds its own lease."""
    idx = CacheIndex(100, 10, "lru")
    idx.lookup(np.arange(5, dtype=np.int64))
    _, _, a = idx.access(np.array([0, 0, 1], dtype=np.int64))
    _, _, b = idx.access(np.array([0], dtype=np.int64))
    s0, s1 = slot_of_row(idx)[0], slot_of_row(idx)[1]
    assert idx.refcount[s0] == 2 and idx.refcount[s1] == 1
    idx.finish(a)
    assert idx.refcount[s0] == 1 and idx.refcount[s1] == 0
    idx.finish(b)
    assert idx.refcount.max() == 0


def test_a_run_of_slots_is_written_by_a_slice_copy_and_nothing_else_is():
    """The preload at open writes ascending runs of slots; those take a slice copy (~10x
    faster than index_copy_). Anything that is not exactly one ascending run must not."""
    from tierstore.tiers.slab import _run_start

    assert _run_start(np.arange(5, 9)) == 5
    for not_a_run in (np.array([5, 6, 8]), np.array([6, 5]), np.array([3, 3]), np.array([7]), np.arange(4)[::-1].copy(),
                      np.array([1, 2, 4, 3])):
        assert _run_start(not_a_run) is None, not_a_run
    assert _run_start(torch.arange(3)) is None  # tensors (the lookup path's) keep index_copy_
