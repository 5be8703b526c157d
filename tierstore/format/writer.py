"""The build's I/O engine: a row file written at the disk's speed, in bounded memory.

One table's row file is written by a pipeline over a few reusable, page-aligned chunk
buffers (allocated once per table; memory is ``BUFFERS`` chunks plus the caller's read
scratch, whatever the table's size):

* the **filler** (the caller's thread) takes a free buffer, has the caller's ``fill`` read
  and convert the chunk's rows into it, checksums its pages and queues it;
* the **writer** (a worker thread) writes queued buffers in file order with ``pwrite`` and
  hands them back.

So the next chunk is read, converted and checksummed while this one is written, and the
checksums never hold up a write. Before filling a chunk the filler calls ``hint`` for the
chunk after it (the build asks the kernel to read those checkpoint bytes ahead,
``posix_fadvise(WILLNEED)``), so reading overlaps the conversion too.

Writes use ``O_DIRECT`` (no page-cache copy, no dirty-page write-back storms): every write is
a whole number of pages at a page-aligned offset from a page-aligned buffer, which the row
file's layout guarantees (header page, then rows in chunks of whole pages, the last chunk
zero-padded to a page). A filesystem that refuses ``O_DIRECT`` (``EINVAL`` at open or at the
first write: tmpfs on older kernels, some network and FUSE filesystems) gets buffered writes
instead; :func:`write_row_file` says which path ran. Every write and the final fsync pass
through the fault seam (``tierstore.faults``), from whichever thread makes them; an error in
either thread stops both and is raised in the caller's thread.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch

from .. import faults
from ..files import pwrite_all
from .checkpoint import Checkpoint
from .hotorder import HotOrder
from .prefetch import RowPrefetcher, aligned_buffer, small_stacks
from .quant import NAN_SCALE
from .spec import _K, DTYPES, PAGE_SIZE, TableInfo
from .rankspill import widest_word
from .sweep import OrderedSweep

__all__ = ["write_row_file", "table_filler", "Filler", "one_torch_thread", "fast_page_checksums", "aligned_buffer", "BUFFERS", "DIRECT", "BUFFERED"]

BUFFERS = 3  # chunk buffers per table: one filling, one queued, one being written
DIRECT, BUFFERED = "O_DIRECT", "buffered"
_K_T = torch.from_numpy(_K.view(np.int64))


def fast_page_checksums(pages: np.ndarray) -> np.ndarray:
    """mulsum64-v1 of each 4 KiB page, bit for bit :func:`tierstore.format.spec.page_checksums`.

    A matrix-vector product over int64 words (two's-complement arithmetic wraps mod 2**64
    exactly as uint64 does): 10-15 GB/s on one core here against ~0.6-0.8 GB/s for the
    elementwise multiply and sum, which allocates a temporary the size of the chunk. torch
    releases the GIL, so the filler checksums while the writer thread runs.
    ``pages`` must be writable (torch refuses read-only arrays); the build's buffers are.
    """
    words = torch.from_numpy(np.ascontiguousarray(pages).reshape(-1, PAGE_SIZE)).view(torch.int64)
    if words.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    return torch.mv(words, _K_T).numpy().view(np.uint64)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch runs its kernels on one thread inside (process-wide; restored after).

    The build's parallelism is its own threads (read-ahead, filler, writer). torch's intra-op
    pool on top of them oversubscribes the cores: on the loaded 2-core machine every copy,
    gather and checksum took 2-3x the wall time (and the CPU time) with 2 intra-op threads
    that it takes with 1, as a parallel region waits for its slowest thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Stop(Exception):
    """The other thread failed: stop quietly (its error is the one raised)."""


class _Direct:
    """The row file's descriptor: ``O_DIRECT`` until the filesystem refuses it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.mode = DIRECT
        try:
            self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.mode, self.fd = BUFFERED, os.open(path, flags, 0o644)

    def pwrite(self, view: memoryview, offset: int) -> None:
        try:
            pwrite_all(self.fd, view, offset, self.path)
        except OSError as e:
            if e.errno != errno.EINVAL or self.mode != DIRECT:
                raise
            # refused at the write (some filesystems accept the flag, then every transfer):
            # reopen without it and repeat the write
            os.close(self.fd)
            self.mode, self.fd = BUFFERED, os.open(self.path, os.O_WRONLY)
            pwrite_all(self.fd, view, offset, self.path)

    def fsync_close(self) -> None:
        try:
            faults.point("fsync", self.path)
            os.fsync(self.fd)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_row_file(path: Path, head: bytes, rows: int, row_stride: int, step: int,
                   fill: Callable[[int, int, np.ndarray], None], sums: np.ndarray,
                   hint: Callable[[int, int], None] | None = None,
                   progress: Callable[[int], None] | None = None, starts: Sequence[int] | None = None) -> str:
    """Write a row file: ``head`` (one page), then ``rows`` rows at ``row_stride``, in chunks
    of ``step`` rows (``step * row_stride`` a multiple of ``PAGE_SIZE``), the last one padded.

    ``fill(start, stop, out)`` puts rows ``start:stop`` into ``out`` (uint8, (n, row_stride),
    its padding columns zero and to be left so). ``sums`` (uint64, one per page) receives every
    page's checksum. ``starts``: the chunks' first rows in the order to fill and write them
    (multiples of ``step``, each once; default ascending: each chunk is written at its own
    offset, so any order makes the same file). ``hint(start, stop)`` is told the chunk that will be filled next.
    ``progress(n)`` is called, in the caller's thread, as chunks of ``n`` rows are written.
    Returns the write path that ran (``DIRECT`` or ``BUFFERED``); the file is fsynced.
    Raises ``OSError`` (and whatever ``fill`` raises).
    """
    assert step * row_stride % PAGE_SIZE == 0 and len(head) == PAGE_SIZE
    chunk_bytes = step * row_stride
    free: queue.Queue[np.ndarray] = queue.Queue()
    for _ in range(BUFFERS if rows > step else 1):
        free.put(aligned_buffer(chunk_bytes, populate=rows > step))  # each filled whole, but a lone chunk's rows may be few
    full: queue.Queue[tuple[int, int, np.ndarray] | None] = queue.Queue()
    done: queue.Queue[int | None] = queue.Queue()
    failed: list[BaseException] = []
    stop_all = threading.Event()
    head_buf = aligned_buffer(PAGE_SIZE)  # O_DIRECT refuses a bytes object's unaligned address
    head_buf[:] = np.frombuffer(head, dtype=np.uint8)
    sums[0] = fast_page_checksums(head_buf)[0]
    out = _Direct(path)

    def take(q: queue.Queue):  # a get that gives up once the other thread has failed
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if stop_all.is_set():
                    raise _Stop from None

    def report(block: bool) -> bool:  # progress, in the caller's thread; True once the writer is done
        while True:
            try:
                n = take(done) if block else done.get_nowait()
            except queue.Empty:
                return False
            if n is None:
                return True
            if progress is not None:
                progress(n)

    def writer() -> None:
        try:
            out.pwrite(memoryview(head_buf), 0)
            while (job := take(full)) is not None:
                start, stop, buf = job
                nbytes = (stop - start) * row_stride
                padded = (nbytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
                out.pwrite(memoryview(buf[:padded]), PAGE_SIZE + start * row_stride)
                free.put(buf)
                done.put(stop - start)
            out.fsync_close()
            done.put(None)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            failed.append(e)
            stop_all.set()

    with small_stacks():  # address space: a build runs under tight RLIMIT_AS caps (tests do it)
        thread = threading.Thread(target=writer, name="tierstore-build-write", daemon=True)
        thread.start()
    try:  # the caller's thread fills: reads (the read-ahead runs in its own thread), converts, checksums
        order = list(range(0, rows, step)) if starts is None else list(starts)
        assert sorted(order) == list(range(0, rows, step)), "starts must be every chunk once"
        for i, start in enumerate(order):
            stop = min(start + step, rows)
            if hint is not None and i + 1 < len(order):
                hint(order[i + 1], min(order[i + 1] + step, rows))
            buf = take(free)
            nbytes = (stop - start) * row_stride
            padded = (nbytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
            if padded > nbytes:  # the last chunk: the page's tail past the last row is zero
                buf[nbytes:padded] = 0
            fill(start, stop, buf[:nbytes].reshape(stop - start, row_stride))
            first = 1 + start * row_stride // PAGE_SIZE
            sums[first : first + padded // PAGE_SIZE] = fast_page_checksums(buf[:padded])
            full.put((start, stop, buf))
            report(block=False)
        full.put(None)
        report(block=True)
    except _Stop:
        pass  # the writer failed: its error is raised below
    except BaseException:  # fill failed, or KeyboardInterrupt: stop the writer, then re-raise
        stop_all.set()
        raise
    finally:
        thread.join()
        out.close()
    if failed:
        raise failed[0]
    return out.mode


class Filler(NamedTuple):
    """What :func:`write_row_file` needs to write one table: ``fill``, ``hint``, the chunk
    order (``starts``, None for ascending) and ``close()`` for the readers."""

    fill: Callable[[int, int, np.ndarray], None]
    hint: Callable[[int, int], None]
    close: Callable[[], None]
    starts: list[int] | None = None


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[:] = src`` (uint8 matrices) as the widest words both allow: V4.1's 8 scale bytes
    per row into the 272-byte stride cost ~3x the values' copy as single bytes."""
    w = widest_word(dst, src)
    dst.view(w).copy_(src.view(w))


def table_filler(ckpt: Checkpoint, name: str, info: TableInfo, src_dtype: str, step: int,
                 shard: tuple[int, int] | None = None, order: HotOrder | None = None,
                 scale: str | None = None, nan_scales: list[int] | None = None,
                 path: Path | None = None) -> Filler:
    """The :class:`Filler` for :func:`write_row_file` reading table ``name`` of ``ckpt``.

    Rows at file positions ``start:stop``: rows ``start:stop`` of the checkpoint; for a shard
    ``(rank, world)`` position ``i`` holds row ``rank + i * world`` (one sequential read of
    ``world`` x the rows, every ``world``-th kept); for a hot ``order`` the rows
    ``order.ids(start, stop)``, written by one sweep of the checkpoint, tail first
    (:class:`tierstore.format.sweep.OrderedSweep`; ``path``, the row file being written, is
    where a head too large for memory spills). A quantized table stores each row's value
    bytes from ``name`` then its scale bytes from ``scale``, and adds the chunk's NaN scales
    (UE8M0 0xFF) to ``nan_scales[0]`` (the bytes are in hand: no extra pass).
    Plain sequential reads of safetensors tensors go through :class:`RowPrefetcher` (O_DIRECT,
    the next chunk read while this one is filled); other reads through a scratch buffer
    allocated once (a torch checkpoint's rows straight into the chunk buffer when they need
    no change). Copies into the chunk are torch's (they release the GIL: the reader and the
    writer threads run meanwhile). ``close()`` releases the readers.
    """
    stride, rb = info.row_stride, info.row_bytes
    if order is not None:
        assert shard is None, "build_store refuses order_by with shard"
        split = info.quant.value_bytes if info.quant is not None else rb
        parts: list[tuple[str, int, int, str | None]] = [(name, 0, split, None if info.quant else src_dtype)]
        if scale is not None:
            parts.append((scale, split, rb, None))
        assert path is not None, "an ordered table's filler needs the row file's path"
        sweep = OrderedSweep(ckpt, info, step, order, parts, path, scale, nan_scales)
        return Filler(sweep.fill, sweep.hint, sweep.close, sweep.starts)
    tensors = (name, scale) if scale is not None else (name,)
    ahead = {}  # plain sequential reads of a safetensors tensor: O_DIRECT, one chunk ahead
    if shard is None and all(ckpt.tensors[t].file.suffix == ".safetensors" for t in tensors):
        ahead = {t: RowPrefetcher(ckpt, t, step) for t in tensors}
    direct = (info.quant is None and src_dtype == info.dtype and rb == stride and shard is None and not ahead)
    spread = shard[1] if shard is not None else 1
    scratch: dict[str, np.ndarray] = {}

    def rows_of(tensor: str, start: int, stop: int) -> torch.Tensor:
        if ahead:
            return torch.from_numpy(ahead[tensor].rows(start, stop))
        meta = ckpt.tensors[tensor]
        row_bytes = meta.shape[1] * meta.element_size
        if tensor not in scratch:
            scratch[tensor] = np.empty(step * spread * row_bytes, dtype=np.uint8)
        buf = scratch[tensor]
        if shard is not None:
            rank, world = shard
            first, last = rank + start * world, rank + (stop - 1) * world
            return torch.from_numpy(ckpt.read_rows(tensor, first, last + 1, out=buf)[::world])
        return torch.from_numpy(ckpt.read_rows(tensor, start, stop, out=buf))

    def fill(start: int, stop: int, out_np: np.ndarray) -> None:
        if direct:
            ckpt.read_rows(name, start, stop, out=out_np.reshape(-1))
            return
        out = torch.from_numpy(out_np)
        if info.quant is None and src_dtype == info.dtype:
            _copy_bytes(out[:, :rb], rows_of(name, start, stop))
        elif info.quant is None:  # convert (round to nearest) straight into the strided rows
            dst = out[:, :rb].view(DTYPES[info.dtype][0])
            dst.copy_(rows_of(name, start, stop).view(DTYPES[src_dtype][0]))
        else:  # [values | scales]: one page read serves both
            assert scale is not None
            split = info.quant.value_bytes
            _copy_bytes(out[:, :split], rows_of(name, start, stop))
            scales = rows_of(scale, start, stop)
            _copy_bytes(out[:, split:rb], scales)
            if nan_scales is not None:
                nan_scales[0] += int((scales == NAN_SCALE).sum())

    def hint(start: int, stop: int) -> None:
        if ahead:
            for p in ahead.values():
                p.prefetch(start, stop)
            return
        if shard is not None:
            lo, hi = shard[0] + start * shard[1], shard[0] + (stop - 1) * shard[1] + 1
        else:
            lo, hi = start, stop
        for tensor in tensors:
            ckpt.advise(tensor, lo, hi)

    def close() -> None:
        for p in ahead.values():
            p.close()

    return Filler(fill, hint, close)
