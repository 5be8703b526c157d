"""Regression tests for paths that once returned wrong rows with no error (issue 9)."""

from __future__ import annotations

import gc
import os
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tierstore.cache.index import budget_for
from tierstore.cache.layout import M_HLIVE
from tierstore import CorruptDataError

from ..conftest import bits, random_table

NAME = "blocks.1.engram.memory.weight"


def _build(tmp_path: Path, rows: int, dim: int, dtype: torch.dtype = torch.float32, name: str = "s"):
    from safetensors.torch import save_file

    w = random_table(rows, dim, dtype, seed=rows + dim)
    ckpt = tmp_path / f"{name}.safetensors"
    save_file({NAME: w}, str(ckpt))
    return tierstore.build_store(ckpt, tmp_path / name, progress=False), w


# budgets (device, host) in rows: resident on the device, resident on the host, small caches,
# disk only; and the shared host tier holding the whole table
_BUDGETS = [("resident", 10**9, 0, False), ("host-resident", 0, 10**9, False), ("cached", 3, 5, False),
            ("disk", 0, 0, False), ("shared", 0, 10**9, True)]


@pytest.mark.parametrize("dim", [1500, 3000, 4096, 16384], ids=lambda d: f"{4 * d}B")
@pytest.mark.parametrize("budget", _BUDGETS, ids=lambda b: b[0])
def test_rows_wider_than_a_page_are_exact(tmp_path, dim, budget):
    """A row spanning three or more 4 KiB pages was cut from the wrong pages (18/40 wrong
    single-row lookups at 6,000 B; IndexError at 12,000 B)."""
    _, dev_rows, host_rows, shared = budget
    out, w = _build(tmp_path, 40, dim)
    row_bytes = 4 * dim
    with tierstore.open(out, device="cpu", device_budget=dev_rows * row_bytes, host_budget=host_rows * row_bytes,
                        host_shared=shared) as store:
        for r in range(40):  # single rows: each a separate read
            got = store.lookup(NAME, [r])
            assert torch.equal(bits(got[0]), bits(w[r])), f"row {r} of {row_bytes} B rows wrong"
        ids = np.random.default_rng(0).integers(0, 40, size=200)
        got = store.lookup(NAME, ids)
        wrong = int((bits(got) != bits(w[torch.from_numpy(ids)])).any(dim=1).sum())
        assert wrong == 0, f"{wrong} of 200 rows wrong"


def test_prefetch_reads_the_ids_as_they_were_at_the_call(tmp_path):
    """prefetch kept a view of the caller's id buffer: a loop refilling it right after the call
    got other rows, and a negative id written after validation came back as header bytes."""
    out, w = _build(tmp_path, 5000, 16)
    with tierstore.open(out, device="cpu", device_budget="8KiB", host_budget="16KiB", threads=1) as store:
        rng = np.random.default_rng(1)
        for _ in range(20):
            ids = rng.integers(0, 5000, size=200)
            want = w[torch.from_numpy(ids.copy())]
            # block the single worker so the prefetch below is still queued when we overwrite
            blocker = store.prefetch(NAME, rng.integers(0, 5000, size=20000))
            fut = store.prefetch(NAME, ids)
            ids[:] = rng.integers(0, 5000, size=200)
            ids[0] = -1
            blocker.result()
            assert torch.equal(bits(fut.result()), bits(want))
        t_ids = torch.arange(100)
        fut = store.prefetch(NAME, t_ids)
        t_ids.fill_(7)
        assert torch.equal(bits(fut.result()), bits(w[:100]))


def test_rebuilt_store_never_maps_the_old_shared_segment(tmp_path, monkeypatch):
    """A worker opening a store rebuilt with --force in the same second as the previous build,
    while another process still held the old shared tier, mapped the old segment and served
    the old build's rows (the segment's name hashed the build's timestamp)."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    import datetime as dt
    import types

    import tierstore.format.build

    # both builds within the same wall-clock second, deterministically
    frozen = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    fake = types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda tz=None: frozen), timezone=dt.timezone)
    monkeypatch.setattr(tierstore.format.build, "_dt", fake)
    old, new = random_table(300, 16, torch.float32, seed=1), random_table(300, 16, torch.float32, seed=2)
    save_file({NAME: old}, str(tmp_path / "old.safetensors"))
    save_file({NAME: new}, str(tmp_path / "new.safetensors"))
    out = tierstore.build_store(tmp_path / "old.safetensors", tmp_path / "s", progress=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, tierstore\n"
         "s = tierstore.open(sys.argv[1], device='cpu', host_budget=10**6, host_shared=True)\n"
         "print('held', flush=True); sys.stdin.readline(); s.close()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        created = json.loads((out / "manifest.json").read_text())["created"]
        tierstore.build_store(tmp_path / "new.safetensors", out, force=True, progress=False)
        assert json.loads((out / "manifest.json").read_text())["created"] == created  # the same second
        with tierstore.open(out, device="cpu", host_budget=10**6, host_shared=True) as store:
            assert store.stats()["tables"][NAME]["host"]["shared"]
            assert torch.equal(bits(store.lookup(NAME, np.arange(300))), bits(new))
    finally:
        holder.communicate("\n", timeout=30)


def test_closing_a_shared_tier_with_live_views_does_not_raise(tmp_path):
    out, w = _build(tmp_path, 300, 16)
    store = tierstore.open(out, device="cpu", host_budget=10**6, host_shared=True)
    slab = store._tables[NAME].host.slab  # a view into the shared map, kept past close()
    store.close()  # raised BufferError: cannot close exported pointers exist
    assert torch.equal(bits(slab[:5]), bits(w[:5]))


def _edit_manifest(store: Path, edit) -> None:
    m = json.loads((store / "manifest.json").read_text())
    edit(m)
    (store / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("field,value", [("dim", 17), ("dim", 15), ("dtype", "bfloat16"), ("rows", 299),
                                          ("row_stride", 80), ("name", "other.weight")])
@pytest.mark.parametrize("with_digest", [True, False], ids=["v2", "v1-no-digest"])
def test_an_edited_manifest_is_refused(tmp_path, field, value, with_digest):
    """Changing "dim": 16 to 17 (one bit) passed verify and open, and lookups returned 17
    values, the last from the next row. The manifest now carries a digest, and every table
    is cross-checked with its row file's own header (which also covers version-1 stores)."""
    out, _ = _build(tmp_path, 300, 16)

    def edit(m):
        t = m["tables"][0]
        t[field] = value
        if field in ("rows", "row_stride", "dim", "dtype"):  # keep the edit self-consistent
            from tierstore.format.spec import TableInfo, row_stride_for
            info = TableInfo(**t)
            if field != "row_stride":
                t["row_stride"] = row_stride_for(info.row_bytes)
            t["file_bytes"] = TableInfo.expected_file_bytes(t["rows"], t["row_stride"])
        if not with_digest:  # what a version-1 store looks like
            m["version"] = 1
            del m["digest"], m["build_id"]

    _edit_manifest(out, edit)
    with pytest.raises(CorruptDataError):
        tierstore.open(out, device="cpu")
    try:
        report = tierstore.verify_store(out, progress=False)
    except CorruptDataError:
        return
    assert not report.ok


def test_manifest_digest_catches_any_edit(tmp_path):
    out, _ = _build(tmp_path, 300, 16)
    _edit_manifest(out, lambda m: m["tables"][0]["source"].update(dtype="float16"))
    with pytest.raises(CorruptDataError, match="digest"):
        tierstore.open(out, device="cpu")


def test_stores_dropped_without_close_release_everything(tmp_path):
    """A store dropped without close() leaked its file descriptors, threads and a 256-event
    AIO context: after ~256 such stores every read in the process failed (EAGAIN)."""
    import threading

    out, w = _build(tmp_path, 3000, 16)
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for i in range(300):
        store = tierstore.open(out, device="cpu", device_budget="4KiB", host_budget="8KiB")
        store.prefetch(NAME, [i % 3000, 7]).result()
        del store
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds + 4
    deadline = __import__("time").monotonic() + 10
    while threading.active_count() > threads + 2 and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    assert threading.active_count() <= threads + 2
    with tierstore.open(out, device="cpu") as store:
        assert torch.equal(bits(store.lookup(NAME, [5])), bits(w[5:6]))


def test_output_pool_is_bounded_and_counted(tmp_path):
    """Pooled output buffers kept +503 MiB after four large lookups until close."""
    out, _ = _build(tmp_path, 4000, 256)
    with tierstore.open(out, device="cpu", pool_bytes="8MiB") as store:
        for n in (5000, 6000, 7000, 8000, 2000, 3000):
            store.lookup(NAME, np.arange(n) % 4000)
        pool = store.stats()["pool"]
        assert pool["bytes"] <= 8 << 20 and pool["max_bytes"] == 8 << 20
        assert pool["buffers"] >= 1


def test_a_request_that_cannot_fit_is_refused_before_allocating(tmp_path):
    """A single request of 200M ids was OOM-killed with no check."""
    from tierstore import CapacityError

    out, _ = _build(tmp_path, 64, 16384)  # 64 KiB rows
    ids = np.zeros(4_000_000, dtype=np.int64)  # 256 GB of output
    with tierstore.open(out, device="cpu") as store:
        with pytest.raises(CapacityError, match="smaller batches"):
            store.lookup(NAME, ids)
        with pytest.raises(CapacityError):
            store.prefetch(NAME, ids)


def test_lookups_leave_no_hints_behind(tmp_path):
    """lookup/prefetch hinted the very batch they read: the device tier consumed the hints at
    once, and the host tier kept permanent "coming soon" hints for every row the device tier
    served (it only sees device misses), refusing to evict them."""
    out, _ = _build(tmp_path, 5000, 16)
    with tierstore.open(out, device="cpu", device_budget=64 * 64, host_budget=64 * 400, policy="default") as store:
        rng = np.random.default_rng(0)
        for _ in range(50):
            ids = rng.zipf(1.2, 256) % 5000
            store.lookup(NAME, ids)
            store.prefetch(NAME, ids).result()
        table = store._tables[NAME]
        for tier in (table.dev, table.host):
            assert tier.index.state[0][M_HLIVE] == 0, f"{tier.name} tier holds stale hints"


def _outstanding(index, rows: np.ndarray) -> np.ndarray:
    from tierstore.cache.hints import hint_outstanding

    M, HT = index.state[0], index.state[9]
    return np.array([hint_outstanding(M, HT, int(r)) for r in rows])


def test_announced_rows_reach_the_tier_that_can_use_them(tmp_path):
    """Store.hint announces future rows: the device tier hears every id, the host tier only
    the ids the device tier does not hold; a lookup consumes them."""
    out, _ = _build(tmp_path, 5000, 16)
    # tiers of 400 and 800 rows (budgets pay for the index's state too: budget_for); the hint
    # tables have a bucket per slot, so 40 hints into 400 buckets lose ~5% to collisions
    dev_b, host_b = budget_for(400, 64, "default"), budget_for(800, 64, "default")
    with tierstore.open(out, device="cpu", device_budget=dev_b, host_budget=host_b, policy="default") as store:
        held = np.arange(40)
        store.lookup(NAME, held)  # now on the device
        table = store._tables[NAME]
        dev, host = table.dev.index, table.host.index
        future = np.arange(20, 60)  # 20..39 on the device, 40..59 not
        store.hint(NAME, future)
        # the hint tables are direct-mapped: a colliding hint is lost (never a false one)
        assert _outstanding(dev, future).mean() >= 0.9
        on_dev = dev.resident(future)
        assert _outstanding(host, future[~on_dev]).mean() >= 0.9
        assert not _outstanding(host, future[on_dev]).any()
        store.lookup(NAME, future)
        assert not _outstanding(dev, future).any()
        with pytest.raises(tierstore.InvalidIdError):
            store.hint(NAME, [5000])


def test_an_announced_row_survives_a_flood(tmp_path):
    """The known future, live: with the default policy, a row announced with Store.hint stays
    on the device through a flood of one-off rows; the same row unannounced is flushed."""
    out, w = _build(tmp_path, 20000, 16)
    kept = {}
    for announce in (True, False):
        with tierstore.open(out, device="cpu", device_budget=budget_for(200, 64, "default"), policy="default") as store:
            store.lookup(NAME, [19999])
            if announce:
                store.hint(NAME, [19999])
            for b in np.array_split(np.arange(5000, 9000), 40):
                store.lookup(NAME, b)
            kept[announce] = bool(store._tables[NAME].dev.index.resident(np.array([19999]))[0])
            assert torch.equal(bits(store.lookup(NAME, [19999])), bits(w[19999:20000]))
    assert kept == {True: True, False: False}


def test_a_failed_chunk_leaves_no_reader_writing_into_the_output(tmp_path):
    """Large reads go chunk by chunk on two threads; when one chunk fails, the lookup must not
    return (raise) while another chunk is still writing into the caller's output buffer."""
    import threading
    import time as _time

    from tierstore import StoreIOError
    from tierstore.tiers.disk import DiskTier

    out, w = _build(tmp_path, 2000, 4096)  # 16 KiB rows: 256 rows per 4 MiB chunk
    with tierstore.open(out, device="cpu") as store:
        disk = store._tables[NAME].disk
        real = DiskTier._read_chunk
        writing = threading.Event()

        def slow_or_failing(self, rows, phys, dst, *rest):
            if rows[0] == 0:
                writing.wait(5)  # fail while another chunk is writing
                raise StoreIOError(5, "injected")
            n = real(self, rows, phys, dst, *rest)
            writing.set()
            _time.sleep(0.2)  # still "writing" after the failing chunk raised
            dst[:] = 0
            writing.clear()
            return n

        disk._read_chunk = slow_or_failing.__get__(disk)
        buf = torch.zeros(1000, 4096)
        with pytest.raises(StoreIOError):
            store.lookup(NAME, np.arange(1000), out=buf)
        assert not writing.is_set(), "a chunk was still writing into the output after the error"
