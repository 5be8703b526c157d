"""Open fills the device tier from the host slab while the indexes are built (``tiers.early.EarlyCopy``).

With ``warm="open"`` and a policy that places a prefix of the snapshot's ranking in slot
order (``static``, ``default``), the host tier's early load (``EarlyLoad``) reads ranks
0 .. n into host slots 0 .. n; the device tier places ranks 0 .. d in its slots 0 .. d, so its
rows are copied from the host slab step by step as the reads are checked, instead of after
both index builds and the whole host load (a probe of the host's row map per device row, then
copies, all after the read). What is kept is checked (slot i holds rank i), anything else
fills the ordinary way, a failed build stops the copies, and the rows are exact. No timings:
the overlap is shown by what the device slab holds before its index is built.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tierstore
from tierstore.serve import table as table_mod
from tierstore.tiers import cache as cache_mod
from tierstore.tiers import early as early_mod
from tierstore.tiers import hotset
from tierstore.tiers.hotset import TableSnapshot

from . import test_snapshot as snapshot_tests
from .test_early_load import saved_snapshot
from .test_snapshot import BUDGETS, T, _check_rows

table, store = snapshot_tests.table, snapshot_tests.store  # the same fixtures: a 10 MiB store with a profile


def _device_slab_exact(s: tierstore.Store, w: torch.Tensor) -> int:
    """Checks that every placed device slot holds its row's bytes; returns how many are placed."""
    dev = s._tables[T].dev
    ros = dev.index.row_of_slot
    slots = np.flatnonzero(ros >= 0)
    assert len(slots), "the device tier placed no row"
    got, want = dev.slab[torch.from_numpy(slots)], w[torch.from_numpy(ros[slots].astype(np.int64))]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), "a device slot holds other bytes"
    return len(slots)


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("policy", ["static", "default"])
def test_device_rows_are_copied_from_the_host_slab_before_its_index_is_built(store, monkeypatch, policy, parallel):
    """Each index build waits here for the host tier's snapshot read to end and for the copy
    thread to copy what it checked; the device tier's placed rows are then in its slab before
    its index says which rows it places. On the old code nothing was copied until both builds
    and the host load had ended."""
    from tierstore.tiers.early import EarlyCopy

    path, w, counts = store
    tierstore.save_snapshot(path)
    if parallel:  # the two builds on two threads, as at a real size
        monkeypatch.setattr(table_mod, "_PARALLEL_TIERS", 1)
    read_done = threading.Event()
    real_read_into = TableSnapshot.read_into

    def read_into(self, *a, **kw):
        try:
            return real_read_into(self, *a, **kw)
        finally:
            read_done.set()

    copies: list[EarlyCopy] = []
    real_init = EarlyCopy.__init__

    def init(self):
        real_init(self)
        copies.append(self)

    copied_before_build: list[int] = []
    real_index = cache_mod.CacheIndex

    def index(*a, **kw):
        assert read_done.wait(timeout=10), "the host tier's snapshot read never ended"
        copier = copies[0]._thread  # the copy thread ends once it has copied what the reads checked
        if copier is not None:
            copier.join(timeout=10)
        copied_before_build.append(copies[0].copied)
        return real_index(*a, **kw)

    monkeypatch.setattr(TableSnapshot, "read_into", read_into)
    monkeypatch.setattr(EarlyCopy, "__init__", init)
    monkeypatch.setattr(cache_mod, "CacheIndex", index)
    with tierstore.open(path, policy=policy, **BUDGETS) as s:
        d = _device_slab_exact(s, w)
        assert max(copied_before_build) >= d, f"{copied_before_build} rows copied before a build, {d} placed"
        o = s.stats()["open"]["device"]
        assert o["from_source"] == d and o["from_snapshot"] == o["from_rows"] == 0
        assert s._tables[T].dev.fed_by is None  # finished: no slab left open to copies
        _check_rows(s, w, counts)


@pytest.mark.parametrize("policy", ["static", "default"])
def test_device_fill_probes_no_host_row(store, monkeypatch, policy):
    """After the indexes are built, the device tier's fill looks no row up in the host
    tier's row map (main probed every placed device row there, then copied them)."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    probed: list[int] = []
    real = hotset.host_slots

    def host_slots(source, rows):
        probed.append(len(rows))
        return real(source, rows)

    monkeypatch.setattr(hotset, "host_slots", host_slots)
    with tierstore.open(path, policy=policy, **BUDGETS) as s:
        _device_slab_exact(s, w)
        assert sum(probed) == 0, f"the device fill probed {sum(probed)} rows in the host tier"
        _check_rows(s, w, counts)


def test_rows_not_copied_fill_the_ordinary_way(store, monkeypatch):
    """The copies stop part way (the host tier's early load stops after its first step): the
    device rows copied are kept, the rest come from the host slab as before, all exact."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    monkeypatch.setattr(hotset, "PRELOAD_BYTES", 64 << 10)  # steps of 256 rows of 256 bytes
    real_advance = early_mod.EarlyCopy.advance

    def advance(self, k):
        real_advance(self, min(k, 100))  # only the first 100 rows ever reach the device slab
        raise early_mod._Enough

    monkeypatch.setattr(early_mod.EarlyCopy, "advance", advance)
    with tierstore.open(path, policy="static", **BUDGETS) as s:
        d = _device_slab_exact(s, w)
        o = s.stats()["open"]["device"]
        assert o["from_source"] == d and o["from_rows"] == 0
        _check_rows(s, w, counts)


def test_finish_keeps_only_the_snapshot_prefix_in_slot_order(store):
    """``EarlyCopy.finish`` keeps the copied rows only when the placed device rows are the
    snapshot's ranks 0..n-1 in slots 0..n-1; another order or start slot keeps nothing."""
    path, w, counts = store
    snap, info = saved_snapshot(store)
    try:
        n, d = 1000, 300
        ids = snap._prefix(n).copy()
        src = np.zeros((n, info.row_bytes), np.uint8)
        slots = np.arange(d, dtype=np.int64)

        def copy() -> tuple[early_mod.EarlyCopy, np.ndarray]:
            feed, dst = early_mod.EarlyCopy(), np.zeros((d, info.row_bytes), np.uint8)
            early = early_mod.EarlyLoad(snap, src, feed=feed)
            early.wait()
            feed.follow(dst)
            return feed, dst

        feed, dst = copy()
        assert feed.finish(ids[:d], slots) == d
        assert np.array_equal(dst.view(np.float16), w[torch.from_numpy(ids[:d])].numpy())
        assert feed._dst is None  # after finish: no copy lands in the slab any more
        swapped = ids[:d].copy()
        swapped[[3, 4]] = swapped[[4, 3]]
        assert copy()[0].finish(swapped, slots) == 0
        assert copy()[0].finish(ids[:d], slots + 1) == 0
        assert copy()[0].finish(ids[:10], slots[:10]) == 10  # placed fewer: keeps those
    finally:
        snap.close()


def test_a_failed_device_build_stops_the_copies(store, monkeypatch):
    """The device index build fails: open raises its error, the copies have stopped (no slab
    is open to them) and no early-load thread outlives the open."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    copies = []
    real_init = early_mod.EarlyCopy.__init__

    def init(self):
        real_init(self)
        copies.append(self)

    real_index = cache_mod.CacheIndex

    def index(n_rows, capacity, *a, **kw):
        if capacity < 2000:  # the device tier's (1,024 slots and a few)
            raise RuntimeError("injected: the device index build failed")
        return real_index(n_rows, capacity, *a, **kw)

    monkeypatch.setattr(early_mod.EarlyCopy, "__init__", init)
    monkeypatch.setattr(cache_mod, "CacheIndex", index)
    with pytest.raises(RuntimeError, match="injected"):
        tierstore.open(path, policy="static", **BUDGETS)
    assert copies and all(c._dst is None for c in copies)
    assert not [t for t in threading.enumerate() if t.name == "tierstore-early-load"]


def _open_state(s: tierstore.Store) -> dict:
    """Each cache tier's placed slots, their bytes and what open says it loaded (less seconds)."""
    out = {}
    for name in ("host", "device"):
        tier = getattr(s._tables[T], "host" if name == "host" else "dev")
        ros = tier.index.row_of_slot.copy()
        held = torch.from_numpy(np.flatnonzero(ros >= 0))
        stats = {k: v for k, v in s.stats()["open"][name].items() if k != "seconds"}
        out[name] = (ros, tier.slab[held].view(torch.int16).clone(), stats)
    return out


@pytest.mark.parametrize("policy", ["static", "default"])
def test_open_ends_in_the_state_of_the_ordinary_load(store, monkeypatch, policy):
    """With the early read and copy (their rows checked on the slot table itself, no int64
    copy of it: ``placed_slots`` is never called) open ends with the same placed slots, the
    same bytes in them and the same counts as the ordinary load (early loads switched off)."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    calls: list[int] = []
    real = cache_mod.placed_slots

    def placed_slots(ros, size):
        calls.append(size)
        return real(ros, size)

    monkeypatch.setattr(cache_mod, "placed_slots", placed_slots)
    with tierstore.open(path, policy=policy, **BUDGETS) as s:
        early = _open_state(s)
        _check_rows(s, w, counts)
    assert calls == [], "a tier loaded early still made the int64 copies of its slot table"
    monkeypatch.setattr(early_mod.EarlyLoad, "POLICIES", ())  # the control: every tier loads the ordinary way
    with tierstore.open(path, policy=policy, **BUDGETS) as s:
        ordinary = _open_state(s)
    assert len(calls) == 2
    for name in ("host", "device"):
        (ros_a, bytes_a, st_a), (ros_b, bytes_b, st_b) = early[name], ordinary[name]
        assert np.array_equal(ros_a, ros_b) and torch.equal(bytes_a, bytes_b), name
        assert st_a == st_b, (name, st_a, st_b)
