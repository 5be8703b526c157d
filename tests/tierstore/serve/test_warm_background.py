"""warm="background": open returns before the tiers' placed rows are loaded; one loader
thread fills them while lookups are served, every row exact meanwhile (tiers/warm.py).

The loader is held (``serve.warm.START_PAUSED``) and let through a few small steps at a time
(``tiers.warm.STEP_BYTES``), so lookups really meet pending slots: hits on slots not loaded
yet, placed slots the walk evicts and refills before the loader reaches them, then the loader
finishing. The oracle is the row file itself, read with ``np.memmap`` (not through the
store), and at the end every slot of both tiers is compared with it.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore.cache.index import budget_for
from tierstore.errors import TierStoreError
from tierstore.format.profile import save_profile
from tierstore.format.snapshot import read_snapshot, snapshot_path
from tierstore.format.spec import PAGE_SIZE, read_manifest
from tierstore.serve import warm as warm_mod
from tierstore.tiers import warm as tier_warm

from ...conftest import random_table

T = "blocks.1.engram.memory.weight"
N, DIM = 40_000, 128  # float16: 256-byte rows
HOT = 4096  # scattered profiled rows; the host budget holds them, the device budget 1,024
BUDGETS = dict(device="cpu", device_budget=budget_for(1024, 256, "default"), host_budget=budget_for(HOT, 256, "default"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bgwarm")
    save_file({T: random_table(N, DIM, torch.float16, seed=11)}, str(d / "m.safetensors"))
    store = tierstore.build_store(d / "m.safetensors", d / "store", progress=False)
    rng = np.random.default_rng(5)
    counts = np.zeros(N, np.int64)
    counts[rng.choice(N, size=HOT, replace=False)] = rng.integers(1, 1000, HOT)
    save_profile(store, T, counts)
    tierstore.save_snapshot(store)
    return store


@pytest.fixture
def store(built, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(built, dst)
    return dst


@pytest.fixture
def paused(monkeypatch):
    """Loaders start held, and load 64 rows a step."""
    monkeypatch.setattr(warm_mod, "START_PAUSED", True)
    monkeypatch.setattr(tier_warm, "STEP_BYTES", 64 * 256)


def row_file(path: Path) -> np.ndarray:
    """The table's rows as stored, read with np.memmap (rows packed after the header page)."""
    info = read_manifest(path).tables[T]
    return np.memmap(path / info.file, dtype=np.uint8, mode="r", offset=PAGE_SIZE)[: N * 256].reshape(N, 256)


def check(s: tierstore.Store, rows: np.ndarray, ids: np.ndarray) -> None:
    got = s.lookup(T, ids).contiguous().view(torch.uint8).numpy().reshape(len(ids), -1)
    bad = np.flatnonzero((got != rows[ids]).any(axis=1))
    assert not len(bad), f"{len(bad)} of {len(ids)} rows differ from the row file (first: id {ids[bad[0]]})"


def check_slabs(s: tierstore.Store, rows: np.ndarray) -> None:
    """Every slot that maps a row and is not pending holds that row's bytes."""
    t = s._tables[T]
    for name, tier in (("device", t.dev), ("host", t.host)):
        ros = tier.index.row_of_slot
        held = np.flatnonzero(ros >= 0)
        w = t.warmth.get(name)
        if w is not None:
            held = held[w.pending[held] == 0]
        slab = tier.slab.view(torch.uint8).numpy()
        bad = np.flatnonzero((slab[held] != rows[ros[held]]).any(axis=1))
        assert not len(bad), f"{name} slot {held[bad[0]]} holds other bytes than row {ros[held[bad[0]]]}"


def hot_ids(s: tierstore.Store) -> np.ndarray:
    t = s._tables[T]
    return t.warmth["host"].rows.copy()


@pytest.mark.parametrize("policy", ["static", "default"])
def test_rows_exact_while_the_loader_runs(store, paused, policy):
    rows = row_file(store)
    rng = np.random.default_rng(1)
    with tierstore.open(store, policy=policy, warm="background", **BUDGETS) as s:
        o = s.stats()["open"]
        assert o["mode"] == "background" and o["host"]["warm"] == 0.0 and o["device"]["warm"] == 0.0, o
        assert o["host"]["placed"] > 0 and o["host"]["loading"] == 1
        hot = hot_ids(s)
        t = s._tables[T]
        placed_dev = (t.warmth["device"].slots.copy(), t.warmth["device"].rows.copy())
        check(s, rows, hot[:50])  # device hits on pending slots: from below (disk), then filled
        check(s, rows, hot[3000:3050])  # host hits on pending slots: from disk, then filled
        check(s, rows, hot[:50])  # now hits on the slots they filled
        o = s.stats()["open"]
        assert o["device"]["on_demand"] >= 50 and o["host"]["on_demand"] >= 50, o
        s._warmer.allow(3)
        for k in range(6):
            ids = np.concatenate([rng.choice(hot, 300), rng.integers(0, N, 700)])  # hits and misses (evictions)
            check(s, rows, ids)
            check_slabs(s, rows)
            s._warmer.allow(2)
        slots, placed = placed_dev
        moved = t.dev.index.row_of_slot[slots] != placed
        if policy == "default":  # the walk gave placed, unloaded device slots to other rows
            assert moved.any()
        mid = s.stats()["open"]["host"]
        assert 0.0 < mid["warm"] < 1.0 and mid["from_snapshot"] > 0, mid
        s._warmer.resume()
        assert s._warmer.wait(60)
        o = s.stats()["open"]
        assert o["warm"] == 1.0 and o["host"]["warm"] == 1.0 and o["device"]["warm"] == 1.0, o
        assert o["host"]["loading"] == 0 and o["device"]["loading"] == 0
        assert not s.stats()["tables"][T]["open"]["host"]["snapshot_error"]
        assert o["host"]["rows_loaded"] + o["host"]["on_demand"] <= o["host"]["placed"]
        check_slabs(s, rows)
        check(s, rows, hot)
        check(s, rows, rng.integers(0, N, 5000))
        assert not t._cold and not t._reroutes


def test_a_policy_that_places_nothing_has_no_loader(store):
    rows = row_file(store)
    with tierstore.open(store, policy="lru", warm="background", **BUDGETS) as s:
        assert s._warmer is None and s.stats()["open"]["warm"] == 1.0
        check(s, rows, np.random.default_rng(2).integers(0, N, 3000))


def test_warm_open_loads_before_open_returns(store):
    with tierstore.open(store, policy="static", **BUDGETS) as s:
        o = s.stats()["open"]
        # warm="open" on the CPU: exclusive tiers, the host tier ranks after the device tier's rows
        assert s._warmer is None and o["mode"] == "open" and o["warm"] == 1.0
        assert o["host"]["placed"] + o["device"]["placed"] == HOT, o
    with pytest.raises(TierStoreError, match="warm="):
        tierstore.open(store, warm="later", **BUDGETS)


def test_a_damaged_snapshot_page_mid_load(store, monkeypatch):
    """A row page of the snapshot fails its check while the loader reads it: the rest loads
    from the row file, stats say why, every row exact."""
    monkeypatch.setattr(tier_warm, "STEP_BYTES", 64 * 256)
    snap = snapshot_path(store, T)
    head, _, _ = read_snapshot(snap, 0)
    page = 1 + head["sum_pages"] + head["id_pages"] + 150  # ~60% into the 256 row pages
    with open(snap, "r+b") as f:
        f.seek(page * 4096 + 40)
        b = f.read(1)
        f.seek(page * 4096 + 40)
        f.write(bytes([b[0] ^ 0x10]))
    rows = row_file(store)
    with tierstore.open(store, policy="static", warm="background", **BUDGETS) as s:
        check(s, rows, np.random.default_rng(3).integers(0, N, 2000))
        assert s._warmer.wait(60)
        o = s.stats()["open"]
        h = s.stats()["tables"][T]["open"]["host"]
        assert "checksum" in h["snapshot_error"] and h["from_snapshot"] > 0 and h["from_rows"] > 0, h
        assert o["warm"] == 1.0 and o["snapshot"] == "ignored", o
        check_slabs(s, rows)
        check(s, rows, hot_ids(s))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("when", ["held", "running"])
def test_close_during_the_load(store, paused, when):
    fds = _fds()
    s = tierstore.open(store, policy="default", warm="background", **BUDGETS)
    s._warmer.allow(2)
    if when == "running":
        s._warmer.resume()
    s.close()
    assert not any(th.name.startswith(("tierstore-warm", "tierstore-snapshot")) for th in threading.enumerate())
    assert _fds() == fds
    assert s.stats()["open"]["host"]["loading"] == 0


def test_the_loader_skips_a_placed_slot_the_walk_gave_to_another_row(store, paused):
    """The race the row check in ``TierWarmth.commit`` exists for: a lookup's walk evicts a
    placed, still pending slot and admits another row into it, writes that row's bytes, and
    the loader reaches the slot before the lookup ends. The loader must leave it alone."""
    rows = row_file(store)
    with tierstore.open(store, policy="default", warm="background", **BUDGETS) as s:
        t = s._tables[T]
        dw = t.warmth["device"]
        ids = np.random.default_rng(4).choice(hot_ids(s)[1024:], 600, replace=False)  # device misses
        out = torch.empty((len(ids), DIM), dtype=t.info.raw_dtype)
        lk = t.begin(ids)
        filled = lk.d_slot[lk.d_code == 1]  # FILL
        taken = filled[np.isin(filled, dw.slots) & (dw.pending[filled] != 0)]
        assert len(taken), "no placed pending slot was given to another row: nothing tested"
        t._move(lk, out)  # the new rows' bytes are in their slots; the lookup has not ended
        s._warmer.resume()
        assert s._warmer.wait(60)
        t._end(lk, True)
        assert (out.view(torch.uint8).numpy().reshape(len(ids), -1) == rows[ids]).all()
        check_slabs(s, rows)
        check(s, rows, ids)


def test_a_row_file_error_under_the_loader_leaves_the_rest_on_demand(store, paused):
    """The row file fails under the loader (no snapshot: it reads the row file): the loader
    stops for that tier, stats say why, and lookups fill the pending slots themselves."""
    from tierstore import faults

    snapshot_path(store, T).unlink()
    rows = row_file(store)
    with tierstore.open(store, policy="static", warm="background", **BUDGETS) as s:
        with faults.inject(faults.FaultPlan(nth=1, op="read")) as plan:
            s._warmer.allow(1)  # the loader's first read: the only I/O while it is installed
        assert plan.fired is not None
        s._warmer.resume()
        assert s._warmer.wait(60)
        h = s.stats()["tables"][T]["open"]["host"]
        assert "Input/output error" in h["loader_error"] and h["loading"] == 0 and h["pending"] > 0, h
        check(s, rows, np.random.default_rng(6).integers(0, N, 3000))
        hot = hot_ids(s)
        check(s, rows, hot)
        check(s, rows, hot)
        # every host slot still pending holds a row the device tier serves (those never reach
        # the host tier); the rest were filled on demand
        hw, t = s._tables[T].warmth["host"], s._tables[T]
        still = hw.slots[hw.pending[hw.slots] != 0]
        assert len(still) == hw.left > 0 and t.dev.index.resident(t.host.index.row_of_slot[still]).all()
        assert s.stats()["open"]["host"]["on_demand"] >= len(hot) - len(still) - 64
        check_slabs(s, rows)


def test_concurrent_lookups_while_the_loader_runs_free(store, monkeypatch):
    """Four threads look up hot and cold rows while the loader runs unheld in small steps:
    every row exact, and every slot holds its row's bytes at the end."""
    monkeypatch.setattr(tier_warm, "STEP_BYTES", 32 * 256)
    rows = row_file(store)
    errors: list[BaseException] = []
    with tierstore.open(store, policy="default", warm="background", **BUDGETS) as s:
        hot = hot_ids(s)

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for _ in range(15):
                    ids = np.concatenate([rng.choice(hot, 400), rng.integers(0, N, 200)])
                    check(s, rows, ids)
            except BaseException as e:  # reported below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors[0]
        assert s._warmer.wait(60)
        assert s.stats()["open"]["warm"] == 1.0
        check_slabs(s, rows)
        check(s, rows, hot)


_KILLED_WARMING = """
import os, signal, sys
import numpy as np
import tierstore
from tierstore.serve import warm
from tierstore.tiers import warm as tier_warm
warm.START_PAUSED = True
tier_warm.STEP_BYTES = 64 * 256
store, table, budgets = sys.argv[1], sys.argv[2], eval(sys.argv[3])
s = tierstore.open(store, policy="default", warm="background", **budgets)
s._warmer.allow(5)  # mid-load: some steps done, the next read in flight
s.lookup(table, np.arange(0, 40_000, 97))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_while_warming_leaves_every_file_as_it_was(store):
    """The warm-up only reads: SIGKILL in the middle of it changes no file of the store,
    and the store opens and serves exact rows after."""
    import signal
    import subprocess
    import sys

    before = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    env = {**os.environ, "PYTHONPATH": str(Path(tierstore.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", _KILLED_WARMING, str(store), T, repr(BUDGETS)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    after = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    assert after.keys() == before.keys() and all(after[p] == before[p] for p in before)
    rows = row_file(store)
    with tierstore.open(store, policy="default", warm="background", **BUDGETS) as s:
        check(s, rows, hot_ids(s))
        assert s._warmer.wait(60)
        check_slabs(s, rows)


def test_a_shared_host_tier_loads_at_open_and_the_device_tier_in_the_background(store, paused):
    """``host_shared``: the shared host tier fills at open as always (other processes map
    it); only the device tier is left to the loader, which copies it from the shared slab."""
    rows = row_file(store)
    with tierstore.open(store, policy="static", warm="background", host_shared=True, **BUDGETS) as s:
        t = s._tables[T]
        assert set(t.warmth) == {"device"}
        o = s.stats()["tables"][T]["open"]
        assert o["host"]["mode"] == "open" and o["host"]["warm"] == 1.0 and o["device"]["warm"] == 0.0, o
        check(s, rows, hot_ids_of(t)[:200])  # device hits on pending slots: from the shared host slab
        s._warmer.resume()
        assert s._warmer.wait(60)
        o = s.stats()["tables"][T]["open"]
        assert o["device"]["warm"] == 1.0 and o["device"]["from_source"] > 0 and o["device"]["from_rows"] == 0, o
        check(s, rows, np.random.default_rng(8).integers(0, N, 3000))


def hot_ids_of(t) -> np.ndarray:
    return t.warmth["device"].rows.copy()
