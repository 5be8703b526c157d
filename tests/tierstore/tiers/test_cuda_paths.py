"""The CUDA paths' helpers (tierstore.tiers.cuda), run on the CPU with stand-ins.

What runs here: the one-buffer index packing, the cross-stream ordering bookkeeping of
``StreamFences`` (stand-in streams and events that log every wait and record), exact-size
registration of host slabs (a stand-in CUDA runtime that logs cudaHostRegister calls), the
GPU room check (stand-in free-memory figures) and the Store options' errors on a CPU store.
What never runs here: any of it against a real CUDA device (tests/tierstore/serve/test_gpu.py).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import tierstore
from tierstore import CapacityError, TierStoreError
from tierstore.format.profile import save_profile
from tierstore.format.spec import read_manifest
from tierstore.tiers import CacheTier, DiskTier, SharedHostTier
from tierstore.tiers import cuda as cuda_mod
from tierstore.tiers.cuda import HEADROOM, PinnedRegion, StreamFences, _pack, check_device_room, to_device
from tierstore.tiers.shared_host import SHM_DIR

from ...conftest import bits, one_table_store

NAME = "c.engram.memory.weight"
ROWS, DIM = 800, 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path, w = one_table_store(tmp_path_factory.mktemp("cuda_paths"), NAME, ROWS, DIM, seed=5)
    save_profile(path, NAME, np.arange(ROWS)[::-1].copy())
    return path, w, read_manifest(path).tables[NAME]


# ----------------------------------------------------------------------------- index arrays
def test_indices_stay_zero_copy_on_the_cpu():
    a, b = np.arange(5, dtype=np.int64), np.array([], dtype=np.int64)
    ta, tb = to_device([a, b], torch.device("cpu"))
    assert ta.data_ptr() == a.ctypes.data, "the CPU path must not copy the index arrays"
    assert tb.numel() == 0


def test_one_buffer_holds_every_index_array():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 1 << 40, n) for n in (3, 0, 17, 1)]
    got = _pack(arrays, torch.device("cpu"), pin=False)
    assert [g.tolist() for g in got] == [a.tolist() for a in arrays]
    assert len({g.untyped_storage().data_ptr() for g in got}) == 1, "one buffer, one copy"
    assert _pack([], torch.device("cpu"), pin=False) == []


# ----------------------------------------------------------------------------- stream ordering
class _Log:
    """Stand-in streams and events: every record and wait goes into ``ops``."""

    def __init__(self):
        self.ops: list[tuple] = []
        self.current = "A"
        self.n = 0

    def stream(self, device):
        log = self

        class S:
            cuda_stream = hash(log.current)
            name = log.current

            def wait_event(self, e):
                log.ops.append(("wait", self.name, e.name))

        return S()

    def event(self):
        log = self
        log.n += 1

        class E:
            name = f"e{log.n}"
            synced = False

            def record(self, s):
                self.stream = s.name
                log.ops.append(("record", s.name, self.name))

            def synchronize(self):
                log.ops.append(("sync", self.name))

        return E()


def _fences():
    log = _Log()
    return log, StreamFences(torch.device("cuda"), stream=log.stream, event=log.event)


def test_a_fill_waits_for_other_streams_reads_and_fills():
    log, f = _fences()
    log.current = "A"
    f.before_read(); f.after_read()  # a gather on A (recorded as e1)
    log.current = "B"
    f.before_write()  # B is about to overwrite a slot A's gather may still read
    assert ("wait", "B", "e1") in log.ops
    f.after_write()  # e2
    log.current = "C"
    f.before_write()
    assert {("wait", "C", "e1"), ("wait", "C", "e2")} <= set(log.ops), "C must wait for A's read and B's fill"


def test_a_read_waits_for_new_fills_once():
    log, f = _fences()
    log.current = "B"
    f.before_write(); f.after_write()  # e1: B fills a slot and the lookup ends: the slot is visible
    log.current = "A"
    f.before_read()
    assert log.ops[-1] == ("wait", "A", "e1"), "A must not read the slot before B's fill ran"
    f.after_read()
    n = len(log.ops)
    f.before_read()  # no fill since: nothing to wait for
    assert not [op for op in log.ops[n:] if op[0] == "wait"]
    log.current = "B"
    f.before_read()  # B's own fills are in its stream order
    assert not [op for op in log.ops[n:] if op[0] == "wait"]


def test_negative_control_without_fences_nothing_orders_streams():
    """What the fences add: the same sequence with no fence calls records and waits nothing,
    so a fill on B could run before A's gather (the race issue 12 found)."""
    log, f = _fences()
    log.current = "A"
    f.after_read()
    log.current = "B"
    f.after_write()
    assert not [op for op in log.ops if op[0] == "wait"]


def test_cpu_writes_of_a_zero_copy_host_slab_wait_for_gpu_reads():
    log, f = _fences()
    for s in ("A", "B"):
        log.current = s
        f.after_read()
    f.before_cpu_write()
    assert [op for op in log.ops if op[0] == "sync"] == [("sync", "e1"), ("sync", "e2")]


# ----------------------------------------------------------------------------- pinned host memory
class _Runtime:
    """A stand-in CUDA runtime: logs cudaHostRegister/Unregister; ``refuse`` returns an error."""

    def __init__(self, refuse: int = 0):
        self.registered: dict[int, tuple[int, int]] = {}
        self.calls: list[tuple] = []
        self.refuse = refuse

    def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 (CUDA's name)
        self.calls.append(("register", ptr, size, flags))
        if self.refuse:
            return self.refuse
        self.registered[ptr] = (size, flags)
        return 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        self.calls.append(("unregister", ptr))
        return 0 if self.registered.pop(ptr, None) else 1


@pytest.fixture
def runtime(monkeypatch):
    rt = _Runtime()
    monkeypatch.setattr(cuda_mod, "_cudart", lambda: rt)
    return rt


def test_pinned_region_registers_exactly_the_tensor(runtime):
    t = torch.empty((1000, 24), dtype=torch.int32)
    r = PinnedRegion(t)
    assert runtime.registered == {t.data_ptr(): (1000 * 24 * 4, 1 | 2)}  # portable | mapped
    r.close()
    r.close()  # idempotent
    assert runtime.registered == {} and sum(c[0] == "unregister" for c in runtime.calls) == 1
    PinnedRegion(torch.empty(0))  # nothing to pin
    assert len(runtime.calls) == 2


def test_pinning_refused_is_a_capacity_error(monkeypatch):
    rt = _Runtime(refuse=2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(cuda_mod, "_cudart", lambda: rt)
    with pytest.raises(CapacityError, match="ulimit -l"):
        PinnedRegion(torch.empty(10))


def test_host_cache_tier_pins_its_budget_exactly(built, runtime):
    path, w, info = built
    for rows in (ROWS // 3, ROWS):  # cached and resident
        tier = CacheTier("host", info, rows, device=torch.device("cpu"), pin=True, policy="lru")
        assert runtime.registered == {tier.slab.data_ptr(): (rows * info.row_bytes, 3)}
        assert tier.stats()["pinned_bytes"] == rows * info.row_bytes == tier.nbytes
        tier.close()
        assert runtime.registered == {}
    unpinned = CacheTier("host", info, 10, device=torch.device("cpu"), pin=False, policy="lru")
    assert unpinned.stats()["pinned_bytes"] == 0 and len(runtime.calls) == 4


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_shared_host_tier_pins_its_read_only_map(built, runtime):
    path, w, info = built
    disk = DiskTier(path, info)
    try:
        for rows in (ROWS // 2, ROWS):
            tier = SharedHostTier(path, info, rows, disk, profile=np.arange(ROWS)[::-1].copy(), build_id="b",
                                  pin=True)
            (ptr, (size, flags)), = runtime.registered.items()
            assert ptr == tier.slab.data_ptr() and size == rows * info.row_bytes and flags == 1 | 2 | 8
            tier.close()
            assert runtime.registered == {}
    finally:
        disk.close()


# ----------------------------------------------------------------------------- GPU memory budget
def test_device_room_is_checked_before_allocating():
    free = lambda dev: 1 << 30  # noqa: E731
    check_device_room((1 << 30) - HEADROOM, torch.device("cuda"), what="device_budget=x", free=free)
    with pytest.raises(CapacityError, match="device_budget=x needs 1.0 GiB.*lower device_budget"):
        check_device_room(1 << 30, torch.device("cuda"), what="device_budget=x", free=free)


def test_capacity_error_names_the_fix():
    e = cuda_mod.capacity_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore"),
                                torch.device("cuda", 1), "looking up rows")
    assert isinstance(e, CapacityError) and "cuda:1" in str(e) and "smaller batches" in str(e)


# ----------------------------------------------------------------------------- Store options on the CPU
def test_cuda_only_options_refused_on_a_cpu_store(built):
    path, w, info = built
    with pytest.raises(TierStoreError, match="zero_copy=True.*device='cuda'"):
        tierstore.open(path, device="cpu", zero_copy=True)
    with pytest.raises(TierStoreError, match="needs device='cuda'"):
        tierstore.open(path, device="cpu", disk_reader="kvikio")
    with pytest.raises(TierStoreError, match="must be one of"):
        tierstore.open(path, device="cpu", disk_reader="gds")
    with tierstore.open(path, device="cpu", device_budget=ROWS * 64 // 4, host_budget=ROWS * 64 // 2,
                        disk_reader="posix") as store:
        ids = np.random.default_rng(0).integers(0, ROWS, 500)
        assert torch.equal(bits(store.lookup(NAME, ids)), bits(w[ids]))
        s = store.stats()
        assert s["disk"]["reader"] == "posix" and isinstance(s["disk"]["reader_mode"], str)
        assert s["host"]["pinned_bytes"] == 0 and s["device_type"] == "cpu"


# ----------------------------------------------------------------------------- Table's CUDA move path, on the CPU
@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("layout", [(ROWS // 10, ROWS // 4), (0, ROWS // 3), (ROWS // 10, 0), (ROWS // 8, ROWS)])
def test_cuda_move_path_bookkeeping_runs_exact_on_the_cpu(built, monkeypatch, zero_copy, layout):
    """``Table._move_cuda`` (the CUDA path's index bundle, staging, admissions into both
    tiers, fenced gathers and fills, and with ``zero_copy`` the host slab read through its
    device view) run on CPU tensors: pinning is stubbed out, the device view is the slab
    itself, streams and events are stand-ins. Every row must equal the checkpoint's and the
    fences must have been used. What this cannot show: anything about real CUDA streams."""
    from tierstore.serve.table import Table

    path, w, info = built
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    log = _Log()
    table = Table(path, info, device=torch.device("cpu"), device_rows=layout[0], host_rows=layout[1], policy="lru")
    try:
        table.cuda = True  # take the CUDA path from here on
        if table.dev.kind != 0:
            table.dev.fences = StreamFences(torch.device("cpu"), stream=log.stream, event=log.event)
        if zero_copy and table.host.kind != 0:
            table.zero_copy = True
            table.host._on_gpu = table.host.slab  # "the GPU's view" of the pinned slab
            table.host.fences = StreamFences(torch.device("cpu"), stream=log.stream, event=log.event)
        rng = np.random.default_rng(7)
        for step in range(12):
            log.current = "AB"[step % 2]  # two "streams" take turns
            ids = rng.zipf(1.3, 600) % ROWS
            out = torch.empty((len(ids), DIM), dtype=torch.float32)
            table.gather(ids, out)
            assert torch.equal(bits(out), bits(w[ids])), f"step {step}"
        s = table.stats()
        assert (s["disk"]["rows_read"] > 0) == (table.host.kind != 2)  # 2: RESIDENT, the host holds the table
        if table.dev.kind == 1:  # CACHED: fills and gathers went through the fences
            assert {op[0] for op in log.ops} >= {"record", "wait"} and s["device"]["evictions"] > 0
        if zero_copy and table.host.kind != 0:
            assert s["host"]["hits"] > 0
    finally:
        table.close()
