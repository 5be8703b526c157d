"""Fast random reads of whole 4 KiB pages from a row file: the disk tier's cold path.

The disk tier turns a batch of rows into the sorted unique pages that hold them and asks
``PageReader.read_pages`` for those pages. A cold random 4 KiB read costs the device
~40-50 us, so throughput comes only from keeping many reads in flight at once (fio reaches
~65-90K IOPS here at queue depth 32, ~20K at depth 1). Python cannot afford an object
or a future per page at that rate (a budget of ~10 us of CPU per read on 2 cores), so the
reader works on *runs* of adjacent pages (one syscall per run) and hands whole chunks of
runs to a persistent thread pool.

Two mechanisms, chosen by measurement on this machine's virtio disk
(``benchmarks/bench_cold.py``, docs/benchmarks_cold.md):

- ``"fadvise"`` (buffered I/O): for each run, ``posix_fadvise(WILLNEED)`` starts the
  kernel's asynchronous readahead of exactly those pages (the fd is marked
  ``POSIX_FADV_RANDOM`` so nothing more is read), keeping a window of up to
  ``window`` pages in flight ahead of a ``preadv`` that copies each run out of the page
  cache once it lands. One thread reaches a deep queue; two threads add CPU for the
  copies. This matched or beat fio's QD32 IOPS here and is the default (``"auto"``).
  Pages read this way stay in the page cache (kernel-managed, evictable memory).
- ``"pread"``: ``threads`` workers each issue blocking ``preadv`` calls (which release the
  GIL), so the queue depth is the thread count. With ``O_DIRECT`` (default when the
  filesystem supports it) reads bypass the page cache and land in page-aligned buffers
  from ``aligned_empty``. Slightly behind ``"fadvise"`` here: 16-32 threads contend for the GIL.

io_uring was evaluated through the ``liburing`` PyPI binding (2026.3.30): it accepts only
``bytearray`` buffers (not 512-byte aligned, so no O_DIRECT), its batched completion
indexing does not wrap around the ring, and per-completion Python calls left it at
~60-66K IOPS, behind both mechanisms above. It is not used.
"""

from __future__ import annotations

import errno as _errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait_futures

import numpy as np

from .errors import CorruptDataError, InvalidIdError, StoreIOError

__all__ = ["PAGE_SIZE", "METHODS", "PageReader", "aligned_empty", "evict_page_cache"]

PAGE_SIZE = 4096  # the store's page; equals tierstore.format.PAGE_SIZE
METHODS = ("auto", "fadvise", "pread")
_MAX_RUN_PAGES = 256  # longest coalesced read (1 MiB): keeps chunks balanced across workers
_DIRECT_ALIGN = PAGE_SIZE  # O_DIRECT needs the logical block size (512 here); a page is always enough


def aligned_empty(n_pages: int) -> np.ndarray:
    """A page-aligned, uninitialised ``uint8`` array of shape (n_pages, PAGE_SIZE).

    Backed by an anonymous mmap, so it is aligned for ``O_DIRECT`` and its memory goes
    back to the OS when the array is collected. Allocate once and pass it as ``out=``:
    a fresh buffer costs a page fault per 4 KiB on first touch.
    """
    if n_pages < 0:
        raise ValueError(f"n_pages must be >= 0, got {n_pages}")
    if n_pages == 0:
        return np.empty((0, PAGE_SIZE), dtype=np.uint8)
    return np.frombuffer(mmap.mmap(-1, n_pages * PAGE_SIZE), dtype=np.uint8).reshape(n_pages, PAGE_SIZE)


def evict_page_cache(path: str | os.PathLike[str]) -> None:
    """Drop ``path``'s clean pages from the kernel page cache, for honest cold measurements.

    Flushes dirty pages first (``fdatasync``: ``POSIX_FADV_DONTNEED`` skips dirty pages, so
    a file just written would otherwise stay warm), then ``posix_fadvise(DONTNEED)``.
    Caveat: pages that any process still has mapped (a live ``numpy.memmap``, an open LMDB
    environment) are *not* evicted; close every map of the file first or the "cold"
    figure is a warm one. ``fincore PATH`` shows what is still resident.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise StoreIOError(e.errno, f"cannot open for page-cache eviction: {e.strerror}", os.fspath(path)) from e
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        raise StoreIOError(e.errno, f"page-cache eviction failed: {e.strerror}", os.fspath(path)) from e
    finally:
        os.close(fd)


def _runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``pages`` into runs of adjacent pages (at most _MAX_RUN_PAGES each).

    Returns (index into ``pages`` where each run starts, run length). Any order works (a
    run is where page i+1 == page i + 1); sorted unique input coalesces best.
    """
    n = len(pages)
    starts = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate((np.zeros(1, dtype=np.int64), starts))
    lengths = np.diff(np.append(starts, n))
    if lengths.max() > _MAX_RUN_PAGES:  # split long runs so no worker gets one huge read
        pieces = -(-lengths // _MAX_RUN_PAGES)
        run = np.repeat(np.arange(len(starts)), pieces)  # the run each piece comes from
        k = np.arange(len(run)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece number within it
        starts = starts[run] + k * _MAX_RUN_PAGES
        lengths = np.minimum(lengths[run] - k * _MAX_RUN_PAGES, _MAX_RUN_PAGES)
    return starts, lengths


class PageReader:
    """Reads sets of 4 KiB pages of one file at the device's random-read rate.

    Args:
        path: the row file. It is opened read-only for the reader's lifetime.
        threads: worker threads. ``None``: 2 for ``"fadvise"`` (the copies need CPU, the
            queue depth comes from the window), 32 for ``"pread"`` (each thread is one
            outstanding read, so this *is* the queue depth).
        direct: ``True`` forces ``O_DIRECT`` (error if the filesystem refuses it), ``False``
            forces buffered reads, ``None`` lets the method decide: ``"pread"`` uses
            ``O_DIRECT`` when the filesystem supports it, ``"fadvise"`` is buffered by nature.
        method: ``"fadvise"``, ``"pread"`` or ``"auto"`` (``"fadvise"``, or ``"pread"``
            when ``direct=True``). See the module docstring for the measurements.
        window: pages each worker keeps in flight ahead of its reads (``"fadvise"`` only).
        drop_behind: buffered reads only: evict each run from the page cache once copied
            (``POSIX_FADV_DONTNEED``), so the kernel does not keep a second, unbudgeted cache
            of rows the store's own tiers already manage. Costs one more syscall per run.

    Thread-safe: any number of threads may call ``read_pages`` at once; they share the
    pool. ``close`` waits for reads in progress.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        direct: bool | None = None,
        method: str = "auto",
        window: int = 128,
        drop_behind: bool = False,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        if window < 1:
            raise ValueError(f"window must be >= 1 page, got {window}")
        if method == "auto":
            method = "pread" if direct else "fadvise"
        if method == "fadvise" and direct:
            raise ValueError("method='fadvise' reads through the page cache; it cannot be combined with direct=True")
        self.path = os.fspath(path)
        self.method = method
        self.window = window
        self.drop_behind = drop_behind
        self.threads = threads if threads is not None else (2 if method == "fadvise" else 32)
        self._fd = self._open(direct if method == "pread" else False)
        self.n_pages: int = os.fstat(self._fd).st_size // PAGE_SIZE  # whole pages; a partial tail reads short
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="tierstore-rowio") \
            if self.threads > 1 else None
        self._cv = threading.Condition()
        self._active = 0
        self._closed = False

    def _open(self, direct: bool | None) -> int:
        """Open the file; with direct=None try O_DIRECT and fall back to buffered if refused."""
        self.direct = False
        if direct is not False and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError as e:
                if e.errno != _errno.EINVAL or direct:  # EINVAL: the filesystem has no O_DIRECT (tmpfs)
                    raise StoreIOError(e.errno, f"cannot open row file: {e.strerror}", self.path) from e
            else:
                # Some filesystems accept the flag at open and refuse the read: probe one page.
                try:
                    if os.fstat(fd).st_size >= PAGE_SIZE:
                        os.preadv(fd, [memoryview(aligned_empty(1).reshape(-1))], 0)
                    self.direct = True
                    return fd
                except OSError as e:
                    os.close(fd)
                    if e.errno != _errno.EINVAL or direct:
                        raise StoreIOError(e.errno, f"O_DIRECT probe read failed: {e.strerror}", self.path) from e
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise StoreIOError(e.errno, f"cannot open row file: {e.strerror}", self.path) from e
        # No kernel readahead around our reads: every page we need is asked for explicitly.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def fileno(self) -> int:
        return self._fd

    def read_pages(self, pages: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Read ``pages`` (page numbers, sorted unique for best coalescing) into rows of a (len(pages), 4096) uint8 array.

        ``out``: C-contiguous uint8 array of that shape to fill (page-aligned, e.g. from
        ``aligned_empty``, when the reader is ``direct``); a new array otherwise.
        Runs of adjacent pages become one read each. Raises ``StoreIOError`` when the OS
        fails a read and ``CorruptDataError`` when the file ends before a page does.
        """
        pages = np.asarray(pages)
        n = len(pages)
        if out is None:
            out = aligned_empty(n) if self.direct else np.empty((n, PAGE_SIZE), dtype=np.uint8)
        else:
            self._check_out(out, n)
        if n == 0:
            return out
        if pages.dtype.kind not in "iu":
            raise TypeError(f"pages must be an integer array, got dtype {pages.dtype}")
        pages = pages.astype(np.int64, copy=False)
        if pages.min() < 0:
            raise InvalidIdError(f"negative page number {int(pages.min())} for {self.path}")
        run_starts, run_lengths = _runs(pages)
        # Python lists: the per-run loop indexes them, ~3x cheaper than indexing numpy scalars.
        offsets = (pages[run_starts] * PAGE_SIZE).tolist()
        starts, lengths = run_starts.tolist(), run_lengths.tolist()
        flat = memoryview(out.reshape(-1))

        with self._cv:
            if self._closed:
                raise StoreIOError(_errno.EBADF, "read from a closed PageReader", self.path)
            self._active += 1
        try:
            n_runs = len(starts)
            # Chunking: "pread" needs one chunk per thread for queue depth; "fadvise" reaches
            # depth from its window, so a small batch stays in the calling thread (no handoff).
            per_chunk = 1 if self.method == "pread" else self.window // 2
            n_chunks = max(1, min(self.threads, n_runs // per_chunk))
            bounds = [n_runs * k // n_chunks for k in range(n_chunks + 1)]
            futs: list[Future[None]] = []
            if self._pool is not None:
                futs = [self._pool.submit(self._read_chunk, flat, starts, lengths, offsets, bounds[k], bounds[k + 1])
                        for k in range(1, n_chunks)]
            err: BaseException | None = None
            try:
                self._read_chunk(flat, starts, lengths, offsets, bounds[0], bounds[1])
            except BaseException as e:  # re-raised below, after the workers stop writing into `out`
                err = e
            _wait_futures(futs)
            for f in futs:
                if err is None and f.exception() is not None:
                    err = f.exception()
            if err is not None:
                raise err
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()
        return out

    def _check_out(self, out: np.ndarray, n: int) -> None:
        if out.dtype != np.uint8 or out.shape != (n, PAGE_SIZE) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous uint8 array of shape ({n}, {PAGE_SIZE}), "
                             f"got {out.dtype} {out.shape}")
        if not out.flags.writeable:
            raise ValueError("out must be writeable")
        if self.direct and out.ctypes.data % _DIRECT_ALIGN:
            raise ValueError("out is not page-aligned, which O_DIRECT requires: allocate it with rowio.aligned_empty")

    def _read_chunk(self, flat: memoryview, starts: list[int], lengths: list[int], offsets: list[int],
                    lo: int, hi: int) -> None:
        """Read runs lo..hi-1. Cost ~2-4 us of Python per run plus the syscalls."""
        fd = self._fd
        preadv = os.preadv
        advise = self.method == "fadvise"
        drop = self.drop_behind and not self.direct
        fadvise = os.posix_fadvise
        willneed, dontneed = os.POSIX_FADV_WILLNEED, os.POSIX_FADV_DONTNEED
        window = self.window
        a = lo  # next run to advise
        ahead = 0  # pages advised but not yet read
        i = lo
        off = offsets[lo]  # offset of the syscall in progress, for error messages
        try:
            while i < hi:
                if advise:
                    # Keep up to `window` pages in flight: WILLNEED queues the reads and returns.
                    while a < hi and (ahead < window or a == i):
                        off = offsets[a]
                        fadvise(fd, off, lengths[a] * PAGE_SIZE, willneed)
                        ahead += lengths[a]
                        a += 1
                    ahead -= lengths[i]
                off = offsets[i]
                nbytes = lengths[i] * PAGE_SIZE
                pos = starts[i] * PAGE_SIZE
                got = preadv(fd, [flat[pos:pos + nbytes]], off)
                while got < nbytes:  # a short read means end of file, unless a retry makes progress
                    more = preadv(fd, [flat[pos + got:pos + nbytes]], off + got)
                    if more <= 0:
                        raise CorruptDataError(
                            f"{self.path}: file ends inside page {(off + got) // PAGE_SIZE} (read {got} of "
                            f"{nbytes} bytes at offset {off}; file has {self.n_pages} whole pages): "
                            "truncated row file; rebuild the store")
                    got += more
                if drop:
                    fadvise(fd, off, nbytes, dontneed)
                i += 1
        except OSError as e:
            raise StoreIOError(e.errno, f"read at offset {off} failed: {e.strerror}", self.path) from e

    def close(self) -> None:
        """Wait for reads in progress, stop the workers and close the file. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.wait_for(lambda: self._active == 0)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        os.close(self._fd)

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"PageReader({self.path!r}, method={self.method!r}, direct={self.direct}, "
                f"threads={self.threads}, window={self.window}, drop_behind={self.drop_behind}, n_pages={self.n_pages})")
