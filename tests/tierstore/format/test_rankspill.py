"""The rank pass (tierstore.format.rankspill): records in any order out in position order,
against a plain numpy reference, resident and spilled over many buckets, memory bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tierstore import faults
from tierstore.errors import TierStoreError
from tierstore.format import rankspill
from tierstore.format.rankspill import RankSpill
from tierstore.format.spec import PAGE_SIZE


def _records(n: int, rec: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, rec), dtype=np.uint8)


def _run(path, n, rec, batches, data, *, memory, bucket_bytes, multiple=1, stage_bytes=rankspill.STAGE_BYTES,
         base=PAGE_SIZE, step=None):
    """Feed ``batches`` (position arrays) into a RankSpill over ``path`` and gather every
    position back in ``step``-record runs (whole buckets when None)."""
    path.write_bytes(b"\xee" * (base + n * rec + 3 * PAGE_SIZE))
    spill = RankSpill(path, base, n, rec, memory=memory, bucket_bytes=bucket_bytes, multiple=multiple,
                      stage_bytes=stage_bytes)
    try:
        for pos in batches:
            # a non-contiguous source (rows of a wider matrix), as the sweep's read chunks are
            wide = np.zeros((len(pos), rec + 8), np.uint8)
            wide[:, 4:4 + rec] = data[pos]
            spill.add(pos, torch.from_numpy(wide)[:, 4:4 + rec])
        got = np.zeros((n, rec), np.uint8)
        run = step or spill.bucket
        for s in range(0, n, run):
            e = min(n, s + run, (s // spill.bucket + 1) * spill.bucket)
            spill.gather(s, e, torch.from_numpy(got[s:e]))
        return spill, got
    finally:
        spill.close()


@pytest.mark.parametrize("rec", [264, 272, 48, 5000, 8])
@pytest.mark.parametrize("mode", ["resident", "spilled"])
def test_positions_come_out_in_order_bit_exact(tmp_path, rec, mode):
    """Random positions in random batch sizes, sizes not multiples of a page, a head larger than
    the bucket budget (many buckets, several staging flushes each): out exactly ``data``."""
    n = 3001
    data = _records(n, rec, rec)
    rng = np.random.default_rng(rec + 1)
    perm = rng.permutation(n)
    cuts = np.sort(rng.choice(np.arange(1, n), 40, replace=False))
    batches = np.split(perm, cuts)
    memory = n * rec if mode == "resident" else n * rec - 1
    spill, got = _run(tmp_path / "f", n, rec, batches, data, memory=memory, bucket_bytes=50 * rec,
                      stage_bytes=1)
    assert spill.resident == (mode == "resident")
    if mode == "spilled":
        assert spill.n_buckets >= 3, spill.n_buckets
    bad = np.flatnonzero((got != data).any(axis=1))
    assert not len(bad), f"{len(bad)} records wrong, first at position {bad[:5]}"


def test_spilled_bucket_is_whole_chunks_and_gathers_in_pieces(tmp_path):
    """``multiple``: buckets are whole chunks of the caller's, so a chunk never straddles two;
    gathered a chunk at a time (as the build's head chunks are)."""
    n, rec, chunk = 5000, 48, 256
    data = _records(n, rec, 7)
    batches = np.array_split(np.random.default_rng(8).permutation(n), 17)
    spill, got = _run(tmp_path / "f", n, rec, batches, data, memory=0, bucket_bytes=3 * chunk * rec,
                      multiple=chunk, step=chunk)
    assert spill.bucket % chunk == 0 and spill.n_buckets > 3
    assert np.array_equal(got, data)


def test_spilled_pass_writes_only_its_region(tmp_path):
    """The scratch is the region itself: the bytes before ``base`` and after the last record's
    page are untouched (the header page of a row file, the next part of a snapshot)."""
    n, rec, base = 1000, 264, 3 * PAGE_SIZE
    data = _records(n, rec, 9)
    path = tmp_path / "f"
    spill, got = _run(path, n, rec, np.array_split(np.arange(n)[::-1], 9), data, memory=0,
                      bucket_bytes=100 * rec, base=base)
    raw = np.fromfile(path, np.uint8)
    end = base + -(-n * rec // PAGE_SIZE) * PAGE_SIZE
    assert (raw[:base] == 0xEE).all() and (raw[end:] == 0xEE).all()
    assert np.array_equal(got, data)


def test_memory_is_one_bucket_and_the_staging_not_the_head(tmp_path, monkeypatch):
    """Every buffer the spilled pass allocates (the staging buffers and the bucket read back)
    together stay within bucket + staging budgets, far below the records' bytes; holding the
    head whole (the resident mode, or the old head buffer) fails this."""
    sizes: list[int] = []
    real = rankspill.aligned_buffer

    def counted(nbytes, populate=False):
        sizes.append(nbytes)
        return real(nbytes, populate)

    monkeypatch.setattr(rankspill, "aligned_buffer", counted)
    n, rec = 40_000, 264  # 10 MiB of records
    data = _records(n, rec, 10)
    bucket, stage = 2 << 20, 128 * 1024
    spill, got = _run(tmp_path / "f", n, rec, np.array_split(np.random.default_rng(2).permutation(n), 23), data,
                      memory=bucket, bucket_bytes=bucket, stage_bytes=stage)
    assert np.array_equal(got, data)
    unit = PAGE_SIZE // 8 * rec  # a bucket's least staging: one whole-page run of records (264 B: 512 of them)
    staging = 2 * spill.n_buckets * spill.stage_rows * rec  # two halves per bucket
    assert staging <= max(stage, 2 * spill.n_buckets * unit)
    limit = bucket + PAGE_SIZE + max(stage, 2 * spill.n_buckets * unit)
    assert sum(sizes) <= limit < n * rec // 2, (sum(sizes), limit, n * rec)
    sizes.clear()
    _run(tmp_path / "g", n, rec, [np.arange(n)], data, memory=n * rec, bucket_bytes=bucket)
    assert sum(sizes) >= n * rec, "the negative control: a resident pass holds every record"


@pytest.mark.parametrize("kind", faults.KINDS)
def test_every_io_fault_raises_or_comes_out_exact(tmp_path, kind):
    """Each read and write of a spilled pass failed in turn (EIO, ENOSPC, a short transfer):
    the pass raises a typed error or its output is exact; never wrong records, never an
    untyped error."""
    n, rec = 2000, 264
    data = _records(n, rec, 11)
    batches = np.array_split(np.random.default_rng(12).permutation(n), 10)
    args = dict(memory=0, bucket_bytes=200 * rec, stage_bytes=1)
    with faults.inject(faults.FaultPlan()) as count:
        _run(tmp_path / "f", n, rec, batches, data, **args)
    points = len(count.seen)
    assert points >= 8, count.seen  # a write and a read back per bucket at least
    raised = 0
    for nth in range(1, points + 1):
        try:
            with faults.inject(faults.FaultPlan(nth, kind)):
                _, got = _run(tmp_path / "f", n, rec, batches, data, **args)
        except TierStoreError:  # StoreIOError, CapacityError: typed
            raised += 1
            continue
        assert np.array_equal(got, data), f"fault {nth} ({kind}): wrong records, no error"
    assert raised > 0


def test_records_taken_through_a_selection_come_out_exact(tmp_path):
    """``add(pos, src, sel)`` takes ``src[sel]`` straight from the caller's buffer (the sweep's
    read window: rows at a stride wider than a record, most rows not asked for), resident and
    spilled: out exactly the records."""
    n, rec = 3001, 264
    data = _records(n, rec, 21)
    rng = np.random.default_rng(22)
    for memory in (n * rec, 0):
        path = tmp_path / f"f{memory}"
        path.write_bytes(b"\xee" * (PAGE_SIZE + n * rec + 3 * PAGE_SIZE))
        spill = RankSpill(path, PAGE_SIZE, n, rec, memory=memory, bucket_bytes=200 * rec)
        try:
            for pos in np.array_split(rng.permutation(n), 7):
                window = np.zeros((3 * len(pos), rec + 16), np.uint8)  # the asked rows among others
                sel = rng.permutation(len(window))[: len(pos)]
                window[sel, 8:8 + rec] = data[pos]
                spill.add(pos, torch.from_numpy(window)[:, 8:8 + rec], torch.from_numpy(sel.astype(np.int64)))
            got = np.zeros((n, rec), np.uint8)
            for s in range(0, n, spill.bucket):
                e = min(n, s + spill.bucket)
                spill.gather(s, e, torch.from_numpy(got[s:e]))
        finally:
            spill.close()
        assert np.array_equal(got, data), f"memory={memory}"


def test_spill_writes_of_several_buckets_are_in_flight_at_once(tmp_path, monkeypatch):
    """Regression: the spill's writes went through one writer thread, one at a time, and each
    bucket's staging half waited for its other half's write behind every other bucket's: the
    sweep stalled on the disk's one-deep queue. Now ``WRITERS`` (3) writes run at once: the
    first is held until a second has started (main: never; the wait ran out)."""
    import threading

    second = threading.Event()
    overlapped: list[bool] = []
    calls = [0]
    lock = threading.Lock()
    real = rankspill.pwrite_all

    def gated(fd, view, at, path):
        with lock:
            calls[0] += 1
            first = calls[0] == 1
        if first:
            overlapped.append(second.wait(timeout=30))
        else:
            second.set()
        return real(fd, view, at, path)

    monkeypatch.setattr(rankspill, "pwrite_all", gated)
    n, rec = 20_000, 264
    data = _records(n, rec, 23)
    _, got = _run(tmp_path / "f", n, rec, np.array_split(np.random.default_rng(24).permutation(n), 13), data,
                  memory=0, bucket_bytes=1 << 20, stage_bytes=256 << 10)
    assert np.array_equal(got, data)
    assert overlapped == [True], "no second spill write started while the first was in flight"
    assert calls[0] >= 2 * 6
