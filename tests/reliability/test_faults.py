"""The I/O fault matrix: the N-th read, write, fsync or rename fails, for every N of a small
workload and every kind of failure (EIO, ENOSPC, a short transfer).

After each injected fault: every call either returned exact rows or raised a typed
``TierStoreError``; the store at OUT is the old or the new one and verifies; no leftover
directory, file descriptor, thread or shared-memory segment remains. The figures of the
last run are printed (`-s`) and quoted in docs/reliability.md.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore import faults
from tierstore.format.profile import load_profile, save_profile
from tierstore.tiers.shared_host import SHM_DIR, segment_prefix

from ..conftest import bits, random_table

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them

T1, T2 = "blocks.1.engram.memory.weight", "blocks.2.engram.memory.weight"
FIGURES: dict[str, int] = {"faults": 0, "failed_typed": 0, "succeeded_exact": 0, "untyped": 0, "wrong_rows": 0,
                           "lost_stores": 0, "leaks": 0}


def _ckpt(path: Path, seed: int) -> dict[str, torch.Tensor]:
    # 6,000 B rows of T2 span pages; T1's 256 B rows pack 16 to a page
    tensors = {T1: random_table(900, 64, torch.float32, seed=seed), T2: random_table(40, 1500, torch.float32, seed=seed + 1)}
    save_file(tensors, str(path))
    return tensors


@pytest.fixture(autouse=True)
def _young_heap():
    """Freeze what the session allocated before this test, so each ``gc.collect`` below scans
    only what the test made. In a full-suite process a whole-heap collection took ~0.5 s,
    and the matrix collects once per case: half the matrix's time."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _resources() -> tuple[int, int]:
    gc.collect()
    return len(os.listdir("/proc/self/fd")), threading.active_count()


def _settle(before: tuple[int, int]) -> bool:
    """True when fds and threads are back to ``before`` (worker threads exit asynchronously)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        fds, threads = _resources()
        if fds <= before[0] and threads <= before[1]:
            return True
        time.sleep(0.02)
    return False


def _holds(out: Path, a: dict, b: dict) -> str | None:
    """'a' or 'b': which checkpoint the verified store at ``out`` holds (None: no store)."""
    if not (out / "manifest.json").exists():
        return None
    assert tierstore.verify_store(out, progress=False).ok
    with tierstore.open(out, device="cpu") as store:
        got = {t: store.lookup(t, np.arange(store.tables[t].rows)) for t in (T1, T2)}
    for name, ref in (("a", a), ("b", b)):
        if all(torch.equal(bits(got[t]), bits(ref[t])) for t in (T1, T2)):
            return name
    raise AssertionError("the store holds neither build's rows")


def _matrix(run, plan_ops=faults.OPS):
    """Count the workload's I/O points, then run it once per (point, kind)."""
    counting = faults.FaultPlan()
    with faults.inject(counting):
        run(None)
    cases = [(n, kind) for n, (op, _) in enumerate(counting.seen, 1) if op in plan_ops
             for kind in faults.KINDS if kind != "short" or op in ("read", "write")]
    for n, kind in cases:
        plan = faults.FaultPlan(nth=n, kind=kind)
        run(plan)
    return counting.seen, cases


def _call(plan, fn):
    """Run ``fn`` under ``plan``; returns (result or None, the typed error's text or None).
    Untyped errors fail. The exception itself is dropped: its traceback's frames would keep
    what they reference (maps, buffers) alive, which is not a leak of the store's."""
    try:
        if plan is None:
            return fn(), None
        with faults.inject(plan):
            return fn(), None
    except tierstore.TierStoreError as e:
        return None, f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - the point of the test
        FIGURES["untyped"] += 1
        raise AssertionError(f"untyped {type(e).__name__} at {plan}: {e}") from e


@pytest.mark.parametrize("ordered", [False, True], ids=["plain", "hot-ordered"])
def test_build_under_every_io_fault(tmp_path, monkeypatch, ordered):
    """A --force rebuild over a store: any fault leaves the old or the new store, verified,
    and no leftover next to it. Hot-ordered: the sweep's read-ahead threads and its chunks
    written out of order (tail first, the head in two groups, each a sweep of its own)."""
    a, b = _ckpt(tmp_path / "a.safetensors", 1), _ckpt(tmp_path / "b.safetensors", 5)
    out = tmp_path / "store"
    tierstore.build_store(tmp_path / "a.safetensors", out, progress=False)
    order_by = None
    if ordered:
        monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", 32 * 1024)  # T1: 8 chunks
        monkeypatch.setattr("tierstore.format.sweep.HEAD_BYTES", 64 * 1024)  # T1's head (3 chunks): 2 sweeps
        order_by = tierstore.build_store(tmp_path / "a.safetensors", tmp_path / "profiled", progress=False)
        rng = np.random.default_rng(3)
        for t, n in ((T1, 900), (T2, 40)):
            counts = np.zeros(n, dtype=np.int64)
            counts[rng.choice(n, n * 3 // 10, replace=False)] = rng.integers(1, 9, n * 3 // 10)
            save_profile(order_by, t, counts)
    base = _resources()

    def run(plan):
        _, err = _call(plan, lambda: tierstore.build_store(tmp_path / "b.safetensors", out, force=True,
                                                           order_by=order_by, progress=False))
        held = _holds(out, a, b)
        if plan is None:
            assert held == "b"
        else:
            FIGURES["faults"] += 1
            FIGURES["failed_typed" if err else "succeeded_exact"] += 1
            if held is None:
                FIGURES["lost_stores"] += 1
            assert held in ("a", "b"), f"{plan.fired} {plan.kind}: the store was lost ({err})"
            assert err is not None or held == "b", f"{plan.fired} {plan.kind}: success but the old rows"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".store.")]
        assert not leftovers, f"{plan and (plan.fired, plan.kind)}: leftovers {leftovers}"
        if not _settle(base):
            FIGURES["leaks"] += 1
            raise AssertionError(f"{plan and (plan.fired, plan.kind)}: leaked fds or threads")
        if held == "b":  # back to the old store for the next case
            tierstore.build_store(tmp_path / "a.safetensors", out, force=True, progress=False)

    seen, cases = _matrix(run)
    assert {op for op, _ in seen} == set(faults.OPS), "the workload must reach every kind of I/O point"
    assert len(cases) >= 40


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared-host"])
def test_serving_under_every_io_fault(tmp_path, shared):
    """open + lookups through small tiers (or the shared host tier) + close: exact rows or
    typed errors, no leaked fds, threads or segments, and the store is intact afterwards."""
    ref = _ckpt(tmp_path / "a.safetensors", 3)
    out = tierstore.build_store(tmp_path / "a.safetensors", tmp_path / "store", progress=False)
    rng = np.random.default_rng(0)
    batches = [(t, rng.integers(0, ref[t].shape[0], size=n)) for t, n in ((T1, 64), (T2, 7), (T1, 300), (T2, 30))]
    budget = dict(host_budget=10**7, host_shared=True) if shared else dict(device_budget="8KiB", host_budget="24KiB")
    base = _resources()

    def run(plan):
        def serve():
            store = tierstore.open(out, device="cpu", threads=1, **budget)
            try:
                for t, ids in batches:
                    rows = None
                    try:
                        rows = store.lookup(t, ids) if t == T1 else store.prefetch(t, ids).result(timeout=30)
                    except tierstore.TierStoreError:
                        pass
                    if rows is not None:
                        wrong = int((bits(rows) != bits(ref[t][torch.from_numpy(ids)])).any(dim=1).sum())
                        FIGURES["wrong_rows"] += wrong
                        assert wrong == 0, f"{plan and (plan.fired, plan.kind)}: {wrong} wrong rows"
            finally:
                store.close()

        _, err = _call(plan, serve)
        if plan is not None:
            FIGURES["faults"] += 1
            FIGURES["failed_typed" if err else "succeeded_exact"] += 1
        if not _settle(base):
            FIGURES["leaks"] += 1
            raise AssertionError(f"{plan and (plan.fired, plan.kind)}: leaked fds or threads")
        segments = [p for p in SHM_DIR.glob(f"{segment_prefix(out, T1)}*")] if SHM_DIR.is_dir() else []
        assert not segments, f"{plan and (plan.fired, plan.kind)}: shared segments left {segments}"
        assert _holds(out, ref, ref) == "a"  # reads never damage the store

    seen, cases = _matrix(run, plan_ops=("read", "write", "fsync"))
    assert len(cases) >= 10


@pytest.mark.parametrize("chunk", ["32MiB", "256B"], ids=["in-memory", "spilled"])
def test_saving_a_profile_under_every_io_fault(tmp_path, chunk):
    """A profile and its hot-set snapshot replaced under a fault are each the old one or the
    new one, never a mix or none; the snapshot, whole, holds its profile's ranking. Spilled:
    the snapshot's rank pass spills its rows into the file and reads them back (2 KiB of
    memory for 3.2 KiB of rows), so those writes and reads fail too."""
    from safetensors.torch import save_file as _save

    from tierstore.format.profile import hot_rows
    from tierstore.format.snapshot import read_snapshot, snapshot_path

    w = random_table(100, 8, torch.float32)
    _save({T1: w}, str(tmp_path / "m.safetensors"))
    out = tierstore.build_store(tmp_path / "m.safetensors", tmp_path / "store", progress=False)
    rows_of = w.view(torch.uint8).numpy().reshape(100, -1)
    old, new = np.arange(100), np.arange(100)[::-1].copy()
    save_profile(out, T1, old)
    tierstore.save_snapshot(out, [T1])

    def run(plan):
        _, err = _call(plan, lambda: (save_profile(out, T1, new),
                                      tierstore.save_snapshot(out, [T1], chunk_bytes=chunk)))
        got = load_profile(out, T1)
        same_old, same_new = np.array_equal(got, old), np.array_equal(got, new)
        assert same_old or same_new, f"{plan and (plan.fired, plan.kind)}: a profile that was never saved"
        _, ids, rows = read_snapshot(snapshot_path(out, T1))  # raises on a torn snapshot
        assert np.array_equal(rows, rows_of[ids]), f"{plan and (plan.fired, plan.kind)}: snapshot rows"
        snap_new = np.array_equal(ids, hot_rows(new, 100))
        assert snap_new or np.array_equal(ids, hot_rows(old, 100)), f"{plan and (plan.fired, plan.kind)}: snapshot"
        if plan is not None:
            FIGURES["faults"] += 1
            FIGURES["failed_typed" if err else "succeeded_exact"] += 1
            assert err is not None or (same_new and snap_new)
        assert not [p.name for p in (out / "profiles").iterdir() if ".tmp" in p.name]
        save_profile(out, T1, old)
        tierstore.save_snapshot(out, [T1])

    _matrix(run)


def test_zz_report_figures(capsys):
    """Prints the matrix's totals (run last in this module) for docs/reliability.md."""
    with capsys.disabled():
        print("\nfault matrix:", json.dumps(FIGURES))
    assert FIGURES["untyped"] == FIGURES["wrong_rows"] == FIGURES["lost_stores"] == FIGURES["leaks"] == 0
