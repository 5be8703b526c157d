"""Reading a safetensors tensor's rows one chunk ahead, with direct I/O.

The build reads each table once, front to back. Through the page cache that costs a kernel
copy and page-cache upkeep per byte on the build's own (two, shared) cores, and evicts what
the machine was caching; ``dd iflag=direct``, the baseline, pays neither. So the build reads
the way dd does: ``O_DIRECT`` into two page-aligned buffers that alternate, the next chunk's
read issued in a background thread (:meth:`RowPrefetcher.prefetch`) while this chunk is
converted and checksummed. A tensor's bytes rarely start on a 4 KiB boundary (the header's
length is arbitrary), so each read covers the enclosing whole pages and the rows are a view
into it. Memory: two chunks plus two pages, allocated once.

A filesystem or file that refuses ``O_DIRECT`` (``EINVAL``) is read through the page cache
instead (``Checkpoint.read_rows``), from then on. Reads pass the fault seam as ``read``.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .. import faults
from ..errors import CheckpointError, StoreIOError
from ..files import os_error
from .checkpoint import Checkpoint
from .spec import PAGE_SIZE

__all__ = ["RowPrefetcher", "aligned_buffer", "small_stacks"]

_STACK = 2 << 20  # the build's threads run shallow numpy/torch calls; the default is 8 MiB


@contextmanager
def small_stacks() -> Iterator[None]:
    """Threads started inside get a 2 MiB stack (of address space: builds run under RLIMIT_AS)."""
    old = threading.stack_size(_STACK)
    try:
        yield
    finally:
        threading.stack_size(old)


def aligned_buffer(nbytes: int, populate: bool = False) -> np.ndarray:
    """A zeroed, page-aligned uint8 array of ``nbytes`` (anonymous memory, returned to the OS
    when the array is dropped): what ``O_DIRECT`` transfers need. ``populate``: its pages are
    mapped at once (``MAP_POPULATE``), for a buffer that will be filled whole: a fault per 4 KiB
    page cost more than the copy that touched it (the ordered build's 1 GiB head buffer: 5-7 s
    of faults against 2-3 s populated, on the loaded 2-core machine)."""
    size = max(PAGE_SIZE, (nbytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    return np.frombuffer(mmap.mmap(-1, size, flags=flags), dtype=np.uint8)[:nbytes]


class RowPrefetcher:
    """Rows of tensor ``name`` in chunks of at most ``step`` rows, each chunk's read started
    one chunk ahead. Chunk ``start:stop`` lives in buffer ``(start // step) % 2`` until the
    chunk two after it is read: the caller copies the rows out before asking for that one.
    Not thread-safe: one caller thread (the build's filler). ``close()`` when done."""

    def __init__(self, ckpt: Checkpoint, name: str, step: int) -> None:
        self.ckpt, self.name, self.step = ckpt, name, step
        meta = ckpt.tensors[name]
        self.path, self.base = meta.file, meta.offset
        self.row_bytes = meta.shape[1] * meta.element_size
        self.fd = -1
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise os_error(e, f"opening {self.path}") from e
        self.direct = self.fd >= 0
        self.bufs = [aligned_buffer(step * self.row_bytes + 2 * PAGE_SIZE) for _ in range(2)] if self.direct else []
        self.pool = None
        if self.direct:
            with small_stacks():  # start its one thread now, inside the window
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="tierstore-build-read")
                self.pool.submit(int).result()
        self.pending: dict[int, Future[np.ndarray]] = {}

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop read with O_DIRECT into their buffer: the enclosing whole pages."""
        first = self.base + start * self.row_bytes
        n = (stop - start) * self.row_bytes
        lo = first // PAGE_SIZE * PAGE_SIZE
        span = (first + n - lo + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        buf = self.bufs[(start // self.step) % 2]
        view = memoryview(buf)[:span]
        limit = faults.point("read", self.path, span)  # the first transfer only, as read_full
        got = 0
        while got < span:
            try:
                k = os.preadv(self.fd, [view[got:limit]], lo + got)
            except OSError as e:
                raise os_error(e, f"reading {self.name} from {self.path}") from e
            if k <= 0:
                break
            got, limit = got + k, span
            if got % 512:  # O_DIRECT moves whole sectors: a ragged count is the end of the file
                break
        if got < first - lo + n:
            raise CheckpointError(f"{self.path}: truncated: tensor {self.name!r} rows {start}:{stop} need "
                                  f"{n} bytes, got {max(0, got - (first - lo))}")
        return buf[first - lo : first - lo + n].reshape(stop - start, self.row_bytes)

    def prefetch(self, start: int, stop: int) -> None:
        """Start reading rows start:stop (the chunk after the one being consumed)."""
        if self.direct and start not in self.pending:
            assert self.pool is not None
            self.pending[start] = self.pool.submit(self._read, start, stop)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop (uint8, (n, row_bytes)): the prefetched read's, else read now."""
        fut = self.pending.pop(start, None)
        if self.direct:
            try:
                return fut.result() if fut is not None else self._read(start, stop)
            except StoreIOError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.close()  # the file refuses direct reads: through the page cache from now on
        return self.ckpt.read_rows(self.name, start, stop)

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pool.shutdown(wait=True)
            self.pool = None
        self.pending.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.direct = False
