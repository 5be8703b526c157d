"""Open reads the hot-set snapshot while the cache index is built (``tiers.early.EarlyLoad``).

With ``warm="open"`` and a policy that places a prefix of the snapshot's own ranking in slot
order (``static``, ``default``), the host tier's rows are read into its slab on a thread of
their own from the slab's allocation on, instead of after the index build: the two used to
run one after the other. What is kept is checked (slot i holds rank i for the placed rows),
anything else is loaded the ordinary way, a failed build waits for the reads, and the rows are
exact. No timings: the overlap is shown by making the index build wait for the read to start.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tierstore
from tierstore.tiers import cache as cache_mod
from tierstore.format.spec import TableInfo
from tierstore.tiers.early import EarlyLoad
from tierstore.tiers.hotset import TableSnapshot
from tierstore.tiers.page_reader import aligned_empty

from . import test_snapshot as snapshot_tests
from .test_snapshot import BUDGETS, T, _check_rows, _hot_bytes

table, store = snapshot_tests.table, snapshot_tests.store  # the same fixtures: a 10 MiB store with a profile


def _gate_index_build(monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> list[bool]:
    """Make every cache index build wait (up to 10 s) for a snapshot read to have started;
    returns, per build, whether one had. ``fail``: the build then raises."""
    started = threading.Event()
    real_read_into = TableSnapshot.read_into

    def read_into(self, *a, **kw):
        started.set()
        return real_read_into(self, *a, **kw)

    seen: list[bool] = []
    real_index = cache_mod.CacheIndex

    def index(*a, **kw):
        seen.append(started.wait(timeout=10))
        if fail:
            raise RuntimeError("injected: the index build failed")
        return real_index(*a, **kw)

    monkeypatch.setattr(TableSnapshot, "read_into", read_into)
    monkeypatch.setattr(cache_mod, "CacheIndex", index)
    return seen


@pytest.mark.parametrize("policy", ["static", "default"])
def test_the_snapshot_is_read_while_the_index_is_built(store, monkeypatch, policy):
    """The host tier's snapshot read has started before its index build ends (the build
    waits for it here; on the old code the read began only after both builds, so the wait
    timed out), every placed row comes from the snapshot, and the rows are exact."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    seen = _gate_index_build(monkeypatch)
    with tierstore.open(path, policy=policy, **BUDGETS) as s:
        assert seen and seen[0], "the host index was built before any snapshot read began"
        o = s.stats()["open"]
        assert o["snapshot"] == "ok" and o["host"]["source"] == "snapshot" and o["from_rows"] == 0
        assert o["host"]["from_snapshot"] == _hot_bytes(s) // 256
        assert s._tables[T].host.early is None  # finished: no thread left behind
        _check_rows(s, w, counts)


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_policies_that_place_nothing_read_nothing_early(store, monkeypatch, policy):
    """Only policies whose placement is the snapshot's prefix start an early read."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    calls = []

    class Spy(EarlyLoad):
        def __init__(self, *a):
            calls.append(policy)
            super().__init__(*a)

    monkeypatch.setattr(cache_mod, "EarlyLoad", Spy)
    with tierstore.open(path, policy=policy, **BUDGETS) as s:
        assert calls == []
        _check_rows(s, w, counts)


def test_a_failed_index_build_waits_for_the_early_reads(store, monkeypatch):
    """The index build fails while the snapshot is being read into the slab: open raises the
    build's error, and no early-load thread outlives it (none may write into a freed slab)."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    seen = _gate_index_build(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="injected"):
        tierstore.open(path, policy="static", **BUDGETS)
    assert seen == [True]
    assert not [t for t in threading.enumerate() if t.name == "tierstore-early-load"]


def saved_snapshot(store) -> tuple[TableSnapshot, TableInfo]:
    """The store's hot-set snapshot of table T, saved and opened (the caller closes it), and the
    table's info."""
    path = store[0]
    tierstore.save_snapshot(path)
    with tierstore.open(path, policy="static", **BUDGETS) as s:
        info, build_id = s._tables[T].info, s.manifest.build_id
    snap, status = TableSnapshot.open(path, info, build_id)
    assert status == "ok"
    return snap, info


def test_finish_keeps_only_the_snapshot_prefix_in_slot_order(store):
    """``EarlyLoad.finish`` keeps the rows read only when the placed rows are the snapshot's
    ranks 0..n-1 in slots 0..n-1; a different order, another start slot or a shorter read
    keep what checks out and nothing else."""
    path, w, counts = store
    snap, info = saved_snapshot(store)
    try:
        n = 1000
        ids = snap._prefix(n).copy()
        buf = aligned_empty(-(-n * info.row_bytes // 4096)).reshape(-1)[: n * info.row_bytes].reshape(n, -1)
        slots = np.arange(n, dtype=np.int64)
        early = EarlyLoad(snap, buf)
        assert early.finish(ids, slots) == n
        assert np.array_equal(buf.view(np.float16).reshape(n, -1), w[torch.from_numpy(ids)].numpy())  # the rows, checked
        swapped = ids.copy()
        swapped[[3, 4]] = swapped[[4, 3]]
        assert EarlyLoad(snap, buf).finish(swapped, slots) == 0
        assert EarlyLoad(snap, buf).finish(ids, slots + 1) == 0
        assert EarlyLoad(snap, buf[:100]).finish(ids, slots) == 100  # read 100: keeps 100, the rest loads as usual
        assert EarlyLoad(snap, buf).finish(ids[:10], slots[:10]) == 10  # placed fewer: keeps those
        # exclusive tiers: the host tier's run starts at the device tier's end (``first``)
        tail = EarlyLoad(snap, buf[:600], first=400)
        assert tail.finish(ids[400:], slots[:600]) == 600
        assert np.array_equal(buf[:600].view(np.float16).reshape(600, -1), w[torch.from_numpy(ids[400:])].numpy())
        assert EarlyLoad(snap, buf[:600], first=400).finish(ids[:600], slots[:600]) == 0  # ranks 0.., not 400..
    finally:
        snap.close()


@pytest.mark.parametrize("step", [7, 1 << 16])
def test_the_prefix_check_agrees_with_the_rank_lookup(store, monkeypatch, step):
    """``_snapshot_prefix`` (compared a step at a time) says yes exactly when the old check
    did: every row's rank by ``positions`` is its index and the slots run 0, 1, ...; swaps,
    shifts and a foreign row in a late step are refused."""
    from tierstore.tiers import early as early_mod
    from tierstore.tiers import hotset

    monkeypatch.setattr(early_mod, "_CHECK_STEP", step)
    path, w, counts = store
    snap, info = saved_snapshot(store)

    def old(rows: np.ndarray, slots: np.ndarray) -> bool:  # the whole-array form it replaced
        if not len(rows) or hotset._run_first(slots) != 0:
            return False
        return bool(np.array_equal(snap.positions(rows), np.arange(len(rows))))

    try:
        rng = np.random.default_rng(5)
        ids = snap._prefix(3000).copy()
        for n in (1, 6, 7, 8, 100, 3000):
            rows, slots = ids[:n].copy(), np.arange(n, dtype=np.int64)
            cases = [(rows, slots), (rows, slots + 1)]
            for _ in range(4):
                i, j = rng.integers(0, n, 2)
                r2, s2 = rows.copy(), slots.copy()
                r2[[i, j]] = r2[[j, i]]
                s2[j] = s2[i]
                r3 = rows.copy()
                r3[j] = info.rows - 1 - r3[j]
                cases += [(r2, slots), (rows, s2), (r3, slots)]
            for r, sl in cases:
                assert early_mod._snapshot_prefix(snap, r, sl) == old(r, sl), (n, r[:10], sl[:10])
        assert early_mod._snapshot_prefix(snap, ids[:3000], np.arange(3000))
        assert not early_mod._snapshot_prefix(snap, ids[:0], np.arange(0))
    finally:
        snap.close()
