"""One native-AIO queue kept full across a large batch's chunks (the disk tier's cold path).

``DiskTier.read`` works through a large batch in chunks (read a chunk's pages, verify them,
cut the rows out, hand them to the caller). Reading each chunk with its own
``PageReader.read_pages`` call drains the queue at every chunk's end: the call waits for its
last reads with fewer and fewer in flight, and nothing is read while the chunk is verified.
Two such calls at once (the old way) covered part of that, but the reads in flight then
swung between ~0 and twice the reader's depth, so the store could not be compared with fio
at one queue depth, and it fell behind fio at the same depth.

``read_streamed`` keeps one AIO context ``depth`` deep for the whole batch: it submits the
next chunk's reads as soon as earlier ones complete, into one of a few page buffers, and
hands each chunk whose reads have all completed to a worker (verify, gather, admissions)
while the queue stays full. Python work is per syscall and per chunk, never per page.

It keeps the queue full the way fio does: each wait is for the first completion
(``io_getevents`` with min_nr 1), the freed slots are refilled at once, a few reads per
``io_submit`` (``page_reader._submit_grouped``: a refill's first reads start before the
rest are prepared), and only then are the completions booked (one compiled call, ``_record``) and
finished chunks handed on. Before (2026-12-07), each wait was for an eighth of the depth
and ~10 numpy calls booked the completions and handed chunks on before the refill, so at
depth 32 the store ran at 0.72-0.76x fio's QD32 IOPS on a quiet machine. In-process A/B on
a loaded one (docs/benchmarks.md), median of 6-10 rounds per run, three runs: 1.17-1.24x
main's rows/s at depth 32 without tiers (0.94-1.13x with), 1.05-1.14x at depth 256, and
less CPU per row in 10 of 12 cells (the other two within 1.3%).
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import numpy as np

from .. import faults
from ..errors import StoreIOError
from .page_reader import (_CONTEXTS, _IOCB, _IOCB_CMD_PREAD, PAGE_SIZE, PageReader, _io_getevents, _io_submit, _record,
                          _runs, _submit_grouped)

__all__ = ["read_streamed"]


def read_streamed(reader: PageReader, chunks: Sequence[np.ndarray], bufs: Sequence[np.ndarray],
                  process: Callable[[int, np.ndarray], object], pool: ThreadPoolExecutor) -> None:
    """Read every chunk's pages and ``process`` each chunk once its pages are in.

    ``reader``: an ``"aio"`` PageReader; at most ``reader.depth`` reads are in flight at any
    time, and that many whenever reads are left to submit and a buffer is free.
    ``chunks``: per chunk, its pages (int64, sorted unique, non-negative).
    ``bufs``: page-aligned (n, 4096) uint8 buffers (``aligned_empty``), each at least as long
    as the longest chunk; chunk i is read into a free one, which is reused once chunk i's
    ``process`` has returned. Two buffers or more: one is read while another is processed.
    ``process(i, pages)``: runs on ``pool`` with the chunk's pages (a view of its buffer).
    Returns when every chunk is processed. On an error (a failed or short read, or one
    raised by ``process``), nothing more is submitted, every read in flight and every
    ``process`` still running finishes, and the first error is raised.
    """
    n = len(chunks)
    if n == 0:
        return
    with reader._cv:  # close() waits for reads in progress, as for read_pages
        if reader._closed:
            raise StoreIOError(_errno.EBADF, "read from a closed PageReader", reader.path)
        reader._active += 1
    try:
        _stream(reader, chunks, bufs, process, pool)
    finally:
        with reader._cv:
            reader._active -= 1
            reader._cv.notify_all()


def _stream(reader: PageReader, chunks: Sequence[np.ndarray], bufs: Sequence[np.ndarray],
            process: Callable[[int, np.ndarray], object], pool: ThreadPoolExecutor) -> None:
    n = len(chunks)
    fd, depth = reader.fileno(), reader.depth
    runs = [_runs(p) for p in chunks]  # (starts, lengths) per chunk
    n_runs = np.array([len(s) for s, _ in runs], dtype=np.int64)
    base = np.concatenate(([0], np.cumsum(n_runs)))  # chunk i's runs are base[i]:base[i + 1] of the batch
    left = n_runs.copy()  # reads of each chunk not yet completed
    res_all = np.zeros(int(base[-1]), dtype=np.int64)  # bytes read per run, or -errno (8 B per read of the batch)
    ptrs_all = np.zeros(int(base[-1]), dtype=np.uint64)  # iocb addresses in submission order, as io_submit takes them
    short = [0] * n  # per chunk, as read_pages per call: the fault-injection point's byte cap on its first read
    words: list[np.ndarray | None] = [None] * n  # each assigned chunk's iocbs (8 u64 words each), kept alive
    free = list(range(len(bufs)))
    busy: dict[Future[object], int] = {}  # process futures -> their buffer
    buf_of = [-1] * n
    assigned = 0  # chunks 0..assigned-1 have buffers and iocbs: runs up to base[assigned] may be submitted
    sub = 0  # runs submitted (of the batch, in order)
    inflight = 0
    error: BaseException | None = None
    ctx = reader._take_context()
    events = ctx.events
    ev64 = events.view(np.int64).reshape(len(events), 4)
    done = np.zeros(n, dtype=np.int64)
    limits = base.tolist()  # Python ints: the refill between a wake-up and its io_submit is a few statements
    ptr0 = ptrs_all.ctypes.data

    def assign(i: int, b: int) -> None:
        starts, lengths = runs[i]
        off0 = int(chunks[i][starts[0]]) * PAGE_SIZE
        try:
            short[i] = faults.point("read", reader.path, int(lengths[0]) * PAGE_SIZE)
        except OSError as e:
            raise StoreIOError(e.errno, f"read at offset {off0} failed: {e.strerror}", reader.path) from e
        w = np.zeros((len(starts), 8), dtype=np.uint64)
        w[:, 0] = (np.uint64(i) << np.uint64(32)) | np.arange(base[i], base[i + 1], dtype=np.uint64)  # chunk | run
        w[:, 2] = (fd << 32) | _IOCB_CMD_PREAD
        w[:, 3] = bufs[b].ctypes.data + starts * PAGE_SIZE
        w[:, 4] = lengths * PAGE_SIZE
        w[:, 5] = chunks[i][starts] * PAGE_SIZE
        words[i], buf_of[i] = w, b
        ptrs_all[base[i]:base[i + 1]] = w.ctypes.data + np.arange(len(starts), dtype=np.uint64) * np.uint64(_IOCB.itemsize)

    def finished(i: int) -> None:
        """Chunk i's reads are all in: check them, then process it on the pool."""
        nonlocal error
        starts, lengths = runs[i]
        want = lengths * PAGE_SIZE
        res = res_all[base[i]:base[i + 1]]
        res[0] = min(int(res[0]), short[i])
        bad = np.flatnonzero(res != want)
        if len(bad):
            k = int(bad[0])
            r, off = int(res[k]), int(chunks[i][starts[k]]) * PAGE_SIZE
            error = error or (StoreIOError(-r, f"read at offset {off} failed: {os.strerror(-r)}",
                                           reader.path) if r < 0 else reader._truncated(off, r, int(want[k])))
            free.append(buf_of[i])
            return
        words[i] = None
        b = buf_of[i]
        busy[pool.submit(process, i, bufs[b][:len(chunks[i])])] = b

    def reap_done(block: bool) -> None:
        nonlocal error
        if not busy or not (block or len(free) == 0):
            return  # buffers are taken back only when one is needed
        done_f, _ = wait_futures(list(busy), return_when=FIRST_COMPLETED) if block else \
            ([f for f in busy if f.done()], None)
        for f in done_f:
            free.append(busy.pop(f))
            if f.exception() is not None and error is None:
                error = f.exception()

    def submit() -> None:
        """Top the queue up to ``depth`` from the assigned chunks' runs (io_submit calls of a
        few reads, ``_submit_grouped``, so the first start before the rest are prepared)."""
        nonlocal sub, inflight, error
        limit = limits[assigned]
        while error is None and inflight < depth and sub < limit:
            k = min(depth - inflight, limit - sub)
            try:
                got = _submit_grouped(_io_submit, ctx.id, k, ptr0 + 8 * sub, depth)
            except OSError as e:  # EAGAIN with reads in flight: reap some, then retry
                if e.errno != _errno.EAGAIN or inflight == 0:
                    error = StoreIOError(e.errno, f"io_submit failed: {e.strerror}", reader.path)
                return
            inflight += got
            sub += got
            if got < k:
                return

    # The loop keeps the queue full as fio does: it waits for the first completion (min_nr 1,
    # not a batch: at depth 32 a batch of 4 left ~28 in flight), refills the queue at once,
    # and only then books the completions and hands finished chunks on. Python work per wake-up
    # is three calls (io_getevents, io_submit, _record), never per completion or per page.
    try:
        while True:
            reap_done(False)
            while error is None and assigned < n and free:
                assign(assigned, free.pop())
                assigned += 1
            submit()
            if inflight:
                got = _io_getevents(ctx.id, 1, events)
                inflight -= got
                submit()
                for c in done[:_record(ev64, got, res_all, left, done)].tolist():
                    finished(c)
                continue
            if error is not None or (assigned == n and sub == limits[n] and not busy):
                break
            if sub < limits[assigned]:
                continue
            reap_done(True)  # nothing in flight, nothing to submit: wait for a buffer
    except BaseException:
        ctx.destroy()  # io_destroy waits for the reads still in flight into the buffers
        wait_futures(list(busy))
        raise
    _CONTEXTS.give(ctx)
    wait_futures(list(busy))
    for f in busy:
        error = error or f.exception()
    if error is not None:
        raise error
