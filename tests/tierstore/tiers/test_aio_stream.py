"""tiers.aio_stream: one AIO queue kept ``depth`` deep across a large batch's chunks."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tierstore import CorruptDataError, StoreIOError, faults
from tierstore.format.spec import PAGE_SIZE
from tierstore.tiers import aio_stream
from tierstore.tiers.page_reader import PageReader, aligned_empty


@pytest.fixture
def reader(tmp_path):
    path = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 256, (700, PAGE_SIZE), dtype=np.uint8)
    path.write_bytes(data.tobytes())
    r = PageReader(path, method="auto", depth=16)
    if r.method != "aio":
        r.close()
        pytest.skip(f"no native AIO with O_DIRECT on {tmp_path} ({r.method})")
    yield r, data
    r.close()


def _chunks(seed: int, n_chunks: int = 9) -> list[np.ndarray]:
    pages = np.sort(np.random.default_rng(seed).choice(700, 450, replace=False)).astype(np.int64)
    return np.array_split(pages, n_chunks)


def count_in_flight(monkeypatch) -> dict[str, int]:
    """Patch the stream's syscalls to track reads in flight (submitted - reaped) and their peak."""
    c = {"now": 0, "peak": 0}
    lock = threading.Lock()
    submit, getevents = aio_stream._io_submit, aio_stream._io_getevents

    def sub(ctx, n, ptrs):
        got = submit(ctx, n, ptrs)
        with lock:
            c["now"] += got
            c["peak"] = max(c["peak"], c["now"])
        return got

    def get(ctx, n, events):
        got = getevents(ctx, n, events)
        with lock:
            c["now"] -= got
        return got

    monkeypatch.setattr(aio_stream, "_io_submit", sub)
    monkeypatch.setattr(aio_stream, "_io_getevents", get)
    return c


def test_every_chunk_is_read_whole_and_the_queue_stays_at_depth(reader, monkeypatch):
    r, data = reader
    chunks = _chunks(1)
    bufs = [aligned_empty(max(map(len, chunks))) for _ in range(3)]
    got: dict[int, np.ndarray] = {}
    c = count_in_flight(monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        aio_stream.read_streamed(r, chunks, bufs, lambda i, b: got.__setitem__(i, b.copy()), pool)
    assert sorted(got) == list(range(len(chunks)))
    for i, pages in enumerate(chunks):
        assert np.array_equal(got[i], data[pages]), i
    assert c["peak"] == r.depth, f"peak reads in flight {c['peak']}, depth {r.depth}"
    assert c["now"] == 0


def test_one_buffer_still_reads_every_chunk(reader):
    r, data = reader
    chunks = _chunks(2)
    got: dict[int, np.ndarray] = {}
    with ThreadPoolExecutor(2) as pool:
        aio_stream.read_streamed(r, chunks, [aligned_empty(max(map(len, chunks)))],
                                 lambda i, b: got.__setitem__(i, b.copy()), pool)
    assert all(np.array_equal(got[i], data[p]) for i, p in enumerate(chunks))


@pytest.mark.parametrize("kind,error", [("EIO", StoreIOError), ("short", CorruptDataError)])
def test_a_failed_read_mid_batch_is_typed_and_the_reader_still_reads(reader, kind, error):
    r, data = reader
    chunks = _chunks(3)
    bufs = [aligned_empty(max(map(len, chunks))) for _ in range(2)]
    done: list[int] = []
    with ThreadPoolExecutor(2) as pool:
        with faults.inject(faults.FaultPlan(nth=4, kind=kind, op="read")):  # the fourth chunk's first read
            with pytest.raises(error):
                aio_stream.read_streamed(r, chunks, bufs, lambda i, b: done.append(i), pool)
        assert 3 not in done, "a chunk whose read failed was processed"
        got: dict[int, np.ndarray] = {}
        aio_stream.read_streamed(r, chunks, bufs, lambda i, b: got.__setitem__(i, b.copy()), pool)
    assert all(np.array_equal(got[i], data[p]) for i, p in enumerate(chunks))


def test_an_error_in_process_is_raised_after_every_chunk_in_progress_ended(reader):
    r, _ = reader
    chunks = _chunks(4)
    bufs = [aligned_empty(max(map(len, chunks))) for _ in range(3)]
    running = [0]
    lock = threading.Lock()

    def process(i, b):
        with lock:
            running[0] += 1
        try:
            if i == 2:
                raise ValueError("bad chunk")
        finally:
            with lock:
                running[0] -= 1

    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(ValueError, match="bad chunk"):
            aio_stream.read_streamed(r, chunks, bufs, process, pool)
    assert running[0] == 0


def test_a_closed_reader_is_refused(reader):
    r, _ = reader
    r.close()
    with ThreadPoolExecutor(1) as pool, pytest.raises(StoreIOError, match="closed"):
        aio_stream.read_streamed(r, _chunks(5), [aligned_empty(100)], lambda i, b: None, pool)


class _LoggingPool(ThreadPoolExecutor):
    """A pool that logs each chunk handed to it, in the order of the stream's other seams."""

    def __init__(self, log: list[tuple], workers: int) -> None:
        super().__init__(workers)
        self.log = log

    def submit(self, fn, /, *args, **kwargs):
        self.log.append(("process", args[0]))
        return super().submit(fn, *args, **kwargs)


def test_the_queue_is_refilled_at_the_first_completion_before_any_booking(reader, monkeypatch):
    """fio's way at one queue depth: the reader waits for the first completion (min_nr 1),
    refills the freed slots with its next io_submit, and only then books the completions and
    hands a finished chunk on. Before, it waited for an eighth of the depth (2 of 16 here; 4
    of 32, which left ~28 in flight at QD32) and handed finished chunks on before refilling.
    Counted through the syscall seams, not timed."""
    r, data = reader
    chunks = _chunks(6)
    total = sum(len(aio_stream._runs(p)[0]) for p in chunks)
    log = _log_syscalls(monkeypatch, aio_stream, r.depth, total)
    bufs = [aligned_empty(max(map(len, chunks))) for _ in chunks]  # every chunk has a buffer at once
    got: dict[int, np.ndarray] = {}
    with _LoggingPool(log, 2) as pool:
        aio_stream.read_streamed(r, chunks, bufs, lambda i, b: got.__setitem__(i, b.copy()), pool)
    assert all(np.array_equal(got[i], data[p]) for i, p in enumerate(chunks))
    waits = [e for e in log if e[0] == "wait"]
    assert len(waits) >= 3
    assert {e[1] for e in waits} == {1}, f"waited for {sorted({e[1] for e in waits})} completions, not the first"
    assert all(e[2] for e in waits), "the reader waited with fewer reads in flight than it could have queued"
    for k, e in enumerate(log):  # after a wait that freed slots while reads remain, the next step is the refill
        if e[0] == "wait" and e[3]:
            assert log[k + 1][0] == "submit", f"step {k + 1} after a wait was {log[k + 1]}, not the refill"


def _read_exactly(r, data, chunks, streamed: bool) -> None:
    """Read ``chunks`` with the streamed reader (two buffers, two overlap threads) or as one
    ``read_pages`` batch, and check every page against ``data``."""
    if streamed:
        got: dict[int, np.ndarray] = {}
        bufs = [aligned_empty(max(map(len, chunks))) for _ in range(2)]
        with ThreadPoolExecutor(2) as pool:
            aio_stream.read_streamed(r, chunks, bufs, lambda i, b: got.__setitem__(i, b.copy()), pool)
        assert all(np.array_equal(got[i], data[p]) for i, p in enumerate(chunks))
    else:
        pages = np.concatenate(chunks)
        assert np.array_equal(r.read_pages(pages), data[pages])


def _log_syscalls(monkeypatch, module, depth: int, total: int) -> list[tuple]:
    """Patch ``module``'s io_submit and io_getevents to log each call: ("submit", n asked,
    n queued) and ("wait", min_nr, queue full before it, reads left to submit)."""
    log: list[tuple] = []
    c = {"now": 0, "done": 0, "sub": 0}
    submit, getevents = module._io_submit, module._io_getevents

    def sub(ctx, n, ptrs):
        got = submit(ctx, n, ptrs)
        c["now"] += got
        c["sub"] += got
        log.append(("submit", n, got))
        return got

    def get(ctx, min_nr, events):
        full = c["now"] == min(depth, total - c["done"])
        got = getevents(ctx, min_nr, events)
        c["now"] -= got
        c["done"] += got
        log.append(("wait", min_nr, full, c["sub"] < total))
        return got

    monkeypatch.setattr(module, "_io_submit", sub)
    monkeypatch.setattr(module, "_io_getevents", get)
    return log


def test_read_pages_refills_at_the_first_completion_as_the_stream_does(reader, monkeypatch):
    """``PageReader.read_pages`` (a batch of one chunk: every small lookup's misses) keeps its
    queue as ``read_streamed`` does: each wait is for the first completion, with as many reads
    in flight as it may have (min(depth, reads not yet completed)), and a wait that leaves
    reads to submit is followed by the refill. Before, it waited for depth/8 (2 of 16 here).
    Counted through the syscall seams, not timed."""
    from tierstore.tiers import page_reader

    r, data = reader
    pages = np.sort(np.random.default_rng(3).choice(700, 300, replace=False)).astype(np.int64)
    total = len(page_reader._runs(pages)[0])
    assert total > 3 * r.depth
    log = _log_syscalls(monkeypatch, page_reader, r.depth, total)
    got = r.read_pages(pages)
    assert np.array_equal(got, data[pages])
    waits = [e for e in log if e[0] == "wait"]
    assert len(waits) >= 3
    assert {e[1] for e in waits} == {1}, f"waited for {sorted({e[1] for e in waits})} completions, not the first"
    assert all(e[2] for e in waits), "read_pages waited with fewer reads in flight than it could have queued"
    for k, e in enumerate(log):
        if e[0] == "wait" and e[3]:
            assert log[k + 1][0] == "submit", f"step {k + 1} after a wait was {log[k + 1]}, not the refill"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_refill_is_queued_a_few_reads_per_call(reader, monkeypatch, streamed):
    """Every io_submit call of both readers asks for at most 4 reads (``_SUBMIT_GROUP``): the kernel
    plugs the block layer for a call of more than two, so no read of a 32-read call reached the
    disk until all 32 were prepared (~100 us at depth 32), and the reads came back in the same
    convoys. Before, one call asked for every free slot (16 here at the start)."""
    from tierstore.tiers import page_reader

    r, data = reader
    chunks = _chunks(8, 3)
    pages = np.concatenate(chunks)
    total = sum(len(page_reader._runs(p)[0]) for p in (chunks if streamed else [pages]))
    log = _log_syscalls(monkeypatch, aio_stream if streamed else page_reader, r.depth, total)
    _read_exactly(r, data, chunks, streamed)
    asked = [e[1] for e in log if e[0] == "submit"]
    assert sum(e[2] for e in log if e[0] == "submit") == total
    assert max(asked) <= 4 < r.depth, f"io_submit calls asked for {sorted(set(asked))} reads, not at most 4"
    calls: list[int] = []  # a deep queue hides the plug: depth/8 per call (fewer syscalls)
    assert page_reader._submit_grouped(lambda ctx, n, p: calls.append(n) or n, 0, 256, 0, 256) == 256
    assert calls == [32] * 8


def test_submit_grouped_keeps_what_it_queued_when_a_later_call_fails():
    """A refill queued in several io_submit calls: when a later call fails (EAGAIN), the reads
    already queued are returned as queued (the caller reaps, then retries the rest); the error
    is raised only when the first call queued nothing."""
    import errno

    from tierstore.tiers import page_reader

    calls: list[int] = []

    def flaky(ctx, n, ptrs):  # the second call fails
        calls.append(n)
        if len(calls) == 2:
            raise OSError(errno.EAGAIN, "try again")
        return n

    assert page_reader._submit_grouped(flaky, 0, 12, 0, 32) == 4
    assert calls == [4, 4]

    def refused(ctx, n, ptrs):
        raise OSError(errno.EAGAIN, "try again")

    with pytest.raises(OSError):
        page_reader._submit_grouped(refused, 0, 12, 0, 32)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_refill_cut_short_by_eagain_is_retried_and_rows_are_exact(reader, monkeypatch, streamed):
    """Every third io_submit call made while reads are in flight fails with EAGAIN (the kernel's
    queue full), also in the middle of a refill that already queued some reads: both readers
    count what was queued, reap, retry the rest, and return every page exactly, with no read
    lost or read twice."""
    import errno

    from tierstore.tiers import page_reader

    module = aio_stream if streamed else page_reader
    submit, getevents = module._io_submit, module._io_getevents
    c = {"calls": 0, "failed": 0, "queued": 0, "reaped": 0}

    def flaky(ctx, n, ptrs):  # EAGAIN only with reads in flight: with none it is an error
        c["calls"] += 1
        if c["calls"] % 3 == 0 and c["queued"] > c["reaped"]:
            c["failed"] += 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        got = submit(ctx, n, ptrs)
        c["queued"] += got
        return got

    def reap(ctx, min_nr, events):
        got = getevents(ctx, min_nr, events)
        c["reaped"] += got
        return got

    monkeypatch.setattr(module, "_io_submit", flaky)
    monkeypatch.setattr(module, "_io_getevents", reap)
    r, data = reader
    chunks = _chunks(11, 3)
    total = sum(len(page_reader._runs(p)[0]) for p in chunks) if streamed else \
        len(page_reader._runs(np.concatenate(chunks))[0])
    _read_exactly(r, data, chunks, streamed)
    assert c["failed"] >= 3, c
    assert c["queued"] == total, (c, total)  # each read queued exactly once
