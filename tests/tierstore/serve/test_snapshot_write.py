"""The snapshot write's pipeline (``tierstore.save_snapshot``): the row file's reads, the rank
pass's spill writes and the bucket pass's writes each stay in flight while the CPU works on
something else. Pinned without timings: each test gates one transfer until a second one (or
the next gather) has started, and counts; on the serial code the gate's wait ran out. Rows
are checked bit-exact against the checkpoint in every test."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore.format import rankspill, snapshot as snapshot_mod
from tierstore.format.profile import hot_rows, save_profile
from tierstore.format.snapshot import read_snapshot, snapshot_path
from tierstore.tiers import disk as disk_module
from tierstore.tiers.page_reader import PageReader

from ...conftest import bits, random_table

T = "blocks.1.engram.memory.weight"
N, DIM = 40_000, 128  # float16: 256-byte rows, a 10 MiB table
HOT = 12_000  # scattered: every page holds profiled rows
WAIT = 30  # seconds a gate waits for its second party (the serial code ran it out)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, torch.Tensor, np.ndarray]:
    d = tmp_path_factory.mktemp("snapwrite")
    w = random_table(N, DIM, torch.float16, seed=11)
    save_file({T: w}, str(d / "m.safetensors"))
    path = tierstore.build_store(d / "m.safetensors", d / "store", progress=False)
    rng = np.random.default_rng(4)
    counts = np.zeros(N, np.int64)
    counts[rng.choice(N, size=HOT, replace=False)] = rng.integers(1, 1000, HOT)
    save_profile(path, T, counts)
    return path, w, counts


def _check(path: Path, w: torch.Tensor, counts: np.ndarray) -> None:
    _, ids, rows = read_snapshot(snapshot_path(path, T))
    assert np.array_equal(ids, hot_rows(counts, N))
    want = bits(w[torch.from_numpy(ids)]).view(torch.uint8).numpy().reshape(len(ids), -1)
    assert np.array_equal(rows, want)


def test_sweep_keeps_several_windows_of_reads_in_flight(store, monkeypatch):
    """Regression: the sweep read one window at a time, one ahead, on one thread, so the disk's
    queue drained at every window's end. Now ``SWEEP_AHEAD`` windows are queued on
    ``SWEEP_THREADS`` threads: the first window's read is held until a second window's read
    has started (main: never; the wait ran out), and the reads still cover each page once."""
    path, w, counts = store
    monkeypatch.setattr(disk_module, "SWEEP_BYTES", 256 << 10, raising=False)  # 40 windows of the 10 MiB table
    second = threading.Event()
    overlapped: list[bool] = []
    pages: list[np.ndarray] = []
    lock = threading.Lock()
    real = PageReader.read_pages

    def gated(reader, p, out=None):
        if reader.path.endswith(".rows") and threading.current_thread().name.startswith("tierstore-sweep"):
            with lock:
                pages.append(np.asarray(p).copy())
                first = len(pages) == 1
            if first:
                overlapped.append(second.wait(timeout=WAIT))
            else:
                second.set()
        return real(reader, p, out)

    monkeypatch.setattr(PageReader, "read_pages", gated)
    tierstore.save_snapshot(path, chunk_bytes="64KiB")
    assert overlapped == [True], "no second window's read started while the first window's was in flight"
    allp = np.sort(np.concatenate(pages))
    assert len(pages) >= 8 and (np.diff(allp) > 0).all(), "each page read once, over many windows"
    _check(path, w, counts)


def test_sweep_hands_out_views_of_its_read_windows(store):
    """Regression: each window's rows were gathered into a fresh array in the read thread and
    copied again into the rank pass (two copies, and a fresh allocation per window: a page
    fault per 4 KiB). Now a batch is ``src[sel]`` with ``src`` a view of the window's read
    buffer: over 40 windows the batches come from at most ``SWEEP_AHEAD + 1`` buffers, and
    ``src[sel]`` are exactly the asked rows."""
    path, w, counts = store
    rows = np.flatnonzero(counts)[::-1].copy()  # any order: the sweep answers in file order
    with tierstore.open(path, device="cpu", device_budget=0, host_budget=0, use_profile=False) as s:
        disk = s._table(T).disk
        buffers, batches, seen = set(), 0, 0
        for idx, src, sel in disk.sweep(rows, window=256 << 10):
            buffers.add(src.data_ptr() >> 12)  # the page its read buffer starts on (a window starts in its first page)
            got = src[sel].numpy()
            want = bits(w[torch.from_numpy(rows[idx])]).view(torch.uint8).numpy().reshape(len(idx), -1)
            assert np.array_equal(got, want)
            batches += 1
            seen += len(idx)
    assert seen == len(rows) and batches >= 8
    assert len(buffers) <= disk_module.SWEEP_AHEAD + 1, f"{len(buffers)} buffers for {batches} windows"


def test_ranked_rows_are_written_while_the_next_piece_is_gathered(store, monkeypatch):
    """Regression: the bucket pass gathered a whole bucket into a bucket-sized buffer, then
    wrote it from the same thread, so the disk idled during every gather and the CPU during
    every write. Now the rows go out in ``OUT_CHUNK_BYTES`` pieces from a ring of buffers
    through a writer thread: the first piece's write is held until the next piece's gather
    has started (main: never; the wait ran out). The rows are exact, spilled or in memory."""
    path, w, counts = store
    monkeypatch.setattr(snapshot_mod, "OUT_CHUNK_BYTES", 64 << 10, raising=False)
    started = threading.Event()
    gathered = threading.Event()
    overlapped: list[bool] = []
    real_write, real_gather = snapshot_mod.pwrite_all, rankspill.RankSpill.gather
    rows_at = snapshot_mod.SnapshotLayout(HOT, 2 * DIM, 4).rows_offset

    def gated_write(fd, data, offset, where):
        if offset >= rows_at and not started.is_set():  # the first piece of ranked rows
            started.set()
            overlapped.append(gathered.wait(timeout=WAIT))
        return real_write(fd, data, offset, where)

    def gather(spill, start, stop, out):
        if started.is_set():
            gathered.set()
        return real_gather(spill, start, stop, out)

    monkeypatch.setattr(snapshot_mod, "pwrite_all", gated_write)
    monkeypatch.setattr(rankspill.RankSpill, "gather", gather)
    for chunk in ("64KiB", "32MiB"):  # spilled in buckets; in memory
        started.clear(), gathered.clear()
        tierstore.save_snapshot(path, chunk_bytes=chunk)
        _check(path, w, counts)
    assert overlapped == [True, True], "the next piece was not gathered while a piece's write was in flight"


def test_the_first_bucket_never_goes_through_the_file(store, monkeypatch):
    """Regression: a spilled snapshot wrote every row into its bucket's region and read it back
    (each row written twice, read once). Bucket 0 is gathered first, so its rows now stay in
    the buffer the buckets are read back into: the spill writes exactly the rows of the other
    buckets (main: every row, 3 MiB for 3 MiB), and the rows are exact."""
    path, w, counts = store
    spilled = [0]
    buckets: list[int] = []
    real, real_init = rankspill.pwrite_all, rankspill.RankSpill.__init__

    def counted(fd, view, at, where):
        spilled[0] += len(view)
        return real(fd, view, at, where)

    def init(spill, *a, **k):
        real_init(spill, *a, **k)
        buckets.append(spill.bucket)

    monkeypatch.setattr(rankspill, "pwrite_all", counted)
    monkeypatch.setattr(rankspill.RankSpill, "__init__", init)
    tierstore.save_snapshot(path, chunk_bytes="64KiB")  # 512 KiB buckets for 3 MiB of rows
    rb = 2 * DIM
    assert buckets[0] * rb <= 512 << 10 and HOT > 4 * buckets[0]
    assert spilled[0] == -(-(HOT - buckets[0]) * rb // 4096) * 4096, (spilled[0], HOT * rb)
    _check(path, w, counts)
