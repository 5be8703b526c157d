"""Fast random reads of whole 4 KiB pages from a row file: the disk tier's cold path.

The disk tier turns a batch of rows into the sorted unique pages that hold them and asks
``PageReader.read_pages`` for those pages. A cold random 4 KiB read costs the device
~40-50 us, so throughput comes only from keeping many reads in flight at once (fio reaches
~65-90K IOPS here at queue depth 32, ~20K at depth 1). Python cannot afford an object or
a future per page at that rate (~11 us per read at 90K IOPS, on 2 shared cores), so the
reader coalesces runs of adjacent pages into one read and never loops per page in Python
where the kernel can take a whole batch.

Mechanisms (``method=``), measured on this machine's virtio disk by
``benchmarks/bench_cold.py`` (figures in docs/benchmarks_cold.md):

- ``"aio"`` (default where available): Linux native AIO with ``O_DIRECT``, driven through
  ``ctypes`` syscalls (``io_setup``/``io_submit``/``io_getevents``; the kernel ABI, no
  compiled code of ours). The I/O control blocks for a whole batch are one numpy array;
  each wake-up reaps every completion and refills the queue in a few ``io_submit`` calls,
  so Python work per read is near zero and the queue stays ~``depth`` deep from a single
  thread (~3-4 us of CPU per page, mostly kernel, as fio's). Reads land directly
  in page-aligned buffers (``aligned_empty``) and bypass the page cache, so the kernel keeps
  no unbudgeted second copy of the table.
- ``"fadvise"`` (buffered; the fallback when the filesystem refuses ``O_DIRECT``, e.g.
  tmpfs): ``posix_fadvise(WILLNEED)`` starts the kernel's asynchronous read of exactly the
  pages of a run (the fd is ``POSIX_FADV_RANDOM``, so nothing around them), keeping up to
  ``depth`` pages in flight ahead of a ``preadv`` that copies each run out of the page cache.
  Close to ``"aio"`` at ~1.8x its CPU; pages stay cached unless ``drop_behind=True``
  (a syscall per run, ~2x the CPU again).
- ``"pread"``: ``threads`` workers issue blocking ``preadv`` calls (they release the GIL),
  so the queue depth is the thread count. 32 threads contending for the GIL cost ~2.2x the
  CPU of ``"aio"`` and fall behind first when the machine is busy.

io_uring (the ``liburing`` PyPI binding, 2026.3.30) is not used: ``bytearray`` buffers only
(no ``O_DIRECT``), and per-completion Python calls left it at 39-66K IOPS (fio: 86K).
"""

from __future__ import annotations

import atexit
import ctypes
import errno as _errno
import functools
import mmap
import os
import platform
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as _wait_futures

import numpy as np

from .. import faults
from ..errors import CorruptDataError, IdTypeError, InvalidIdError, ReaderParamError, StoreIOError
from ..files import os_error, read_full
from ..format.spec import PAGE_SIZE  # the store's page: the unit of every read
from ..jit import kernel

__all__ = ["METHODS", "PageReader", "aligned_empty", "evict_page_cache", "aio_available"]

METHODS = ("auto", "aio", "fadvise", "pread")
_MAX_RUN_PAGES = 256  # longest coalesced read (1 MiB): keeps chunks balanced across workers
_DIRECT_ALIGN = PAGE_SIZE  # O_DIRECT needs the logical block size (512 here); a page is always enough


# ----------------------------------------------------------------------------- Linux native AIO
# Syscall numbers per architecture (asm/unistd.h): io_setup, io_destroy, io_submit, io_getevents.
_AIO_SYSCALLS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}.get(platform.machine())
# struct iocb and struct io_event of linux/aio_abi.h (little-endian layout), 64 and 32 bytes.
_IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<u4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                  ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                  ("flags", "<u4"), ("resfd", "<u4")])
_IO_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
_IOCB_CMD_PREAD = 0
_libc_syscall = None
if _AIO_SYSCALLS is not None and os.name == "posix" and _IOCB.itemsize == 64 and _IO_EVENT.itemsize == 32:
    try:
        _libc_syscall = ctypes.CDLL(None, use_errno=True).syscall
        _libc_syscall.restype = ctypes.c_long
    except (OSError, AttributeError):
        _libc_syscall = None


def _sys(nr: int, *args: ctypes.c_long | ctypes.c_ulong | ctypes.c_void_p | None) -> int:
    """One raw syscall (ctypes releases the GIL around it); raises OSError on failure."""
    while True:
        r = _libc_syscall(ctypes.c_long(nr), *args)  # type: ignore[misc]
        if r >= 0:
            return int(r)
        err = ctypes.get_errno()
        if err != _errno.EINTR:
            raise OSError(err, os.strerror(err))


def _io_submit(ctx: int, n: int, iocb_ptrs: int) -> int:
    """Queue ``n`` iocbs (``iocb_ptrs``: address of n pointers); returns how many were queued."""
    return _sys(_AIO_SYSCALLS[2], ctypes.c_ulong(ctx), ctypes.c_long(n), ctypes.c_void_p(iocb_ptrs))  # type: ignore[index]


def _io_getevents(ctx: int, min_nr: int, events: np.ndarray) -> int:
    """Wait for at least ``min_nr`` completions, store up to len(events) of them; returns the count."""
    return _sys(_AIO_SYSCALLS[3], ctypes.c_ulong(ctx), ctypes.c_long(min_nr),  # type: ignore[index]
                ctypes.c_long(len(events)), ctypes.c_void_p(events.ctypes.data), None)


# iocbs per io_submit call. A call of more than two plugs the block layer (fs/aio.c): no read
# of it reaches the disk until all are prepared (~3 us each), so a 32-slot refill in one call
# idled the disk ~100 us and the reads came back in convoys. fio submits one at a time. At
# depth 32 (in-process, 6 rounds, loaded): 1.30x / 1.42x (store / +tiers) the IOPS of one call
# per refill, CPU +0.2 / -0.5 us per row; 2 then the rest: 0.94x / 0.27x (docs/benchmarks_cold.md).
# A deep queue hides the plug: depth/8 per call there (depth 256: same IOPS, ~0.5 us less CPU per row).
_SUBMIT_GROUP = 4


def _submit_grouped(submit: Callable[[int, int, int], int], ctx: int, n: int, iocb_ptrs: int, depth: int) -> int:
    """Queue ``n`` iocbs (``iocb_ptrs``: address of n pointers) with ``submit`` (an
    ``_io_submit``) in calls of at most max(_SUBMIT_GROUP, depth // 8); returns how many were
    queued, fewer when the kernel takes fewer. Raises OSError as ``submit`` only when it queued none."""
    group = max(_SUBMIT_GROUP, depth // 8)
    done = 0
    while done < n:
        k = min(group, n - done)
        try:
            got = submit(ctx, k, iocb_ptrs + 8 * done)
        except OSError:
            if done:
                return done  # the caller reaps, then retries the rest
            raise
        done += got
        if got < k:
            break
    return done


@kernel
def _record(events: np.ndarray, got: int, res: np.ndarray, left: np.ndarray, done: np.ndarray) -> int:
    """Book ``got`` completions of ``events`` (int64 (depth, 4): data, obj, res, res2): each
    read's result into ``res`` at its run (data's low 32 bits), one fewer read ``left`` in its
    chunk (the high bits); chunks whose last read this was go into ``done``; returns how many.
    One compiled call per reap, for both readers (``read_pages`` and ``read_streamed``)."""
    n_done = 0
    for j in range(got):
        data = events[j, 0]
        c = data >> 32
        res[data & 0xFFFFFFFF] = events[j, 2]
        left[c] -= 1
        if left[c] == 0:
            done[n_done] = c
            n_done += 1
    return n_done


def warm_kernels() -> None:
    """Compile (or load) ``_record`` now: ``tierstore warmup`` calls it."""
    z = np.zeros(1, dtype=np.int64)
    _record(np.zeros((1, 4), dtype=np.int64), 0, z, z, z)


class _AioContext:
    """One kernel AIO context with room for ``depth`` reads in flight, and its event buffer."""

    def __init__(self, depth: int) -> None:
        ctx = ctypes.c_ulong(0)
        _sys(_AIO_SYSCALLS[0], ctypes.c_long(depth), ctypes.c_void_p(ctypes.addressof(ctx)))  # type: ignore[index]
        self.id = ctx.value
        self.depth = depth
        self.events = np.zeros(depth, dtype=_IO_EVENT)

    def destroy(self) -> None:
        """Release the context; the kernel cancels or waits for reads still in flight."""
        if self.id:
            _sys(_AIO_SYSCALLS[1], ctypes.c_ulong(self.id))  # type: ignore[index]
            self.id = 0


class _ContextPool:
    """The process's idle AIO contexts, shared by every reader of every table and store.

    A context is not tied to a file (each iocb names its fd), so a call takes any idle one
    of its depth and gives it back. Contexts in use are bounded by concurrent reads (the
    threads reading at once), idle ones by ``max_idle``: opening many tables or stores no
    longer multiplies contexts, whose events count against the system-wide fs.aio-max-nr.
    A forked child starts with an empty pool (its parent's contexts are not its own).
    """

    def __init__(self, max_idle: int = 8) -> None:
        self.max_idle = max_idle
        self._idle: list[_AioContext] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def take(self, depth: int) -> _AioContext:
        with self._lock:
            if self._pid != os.getpid():
                self._idle, self._pid = [], os.getpid()
            for i, ctx in enumerate(self._idle):
                if ctx.depth == depth:
                    return self._idle.pop(i)
        return _AioContext(depth)

    def give(self, ctx: _AioContext) -> None:
        with self._lock:
            if ctx.id and self._pid == os.getpid() and len(self._idle) < self.max_idle:
                self._idle.append(ctx)
                return
        ctx.destroy()

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    def clear(self) -> None:
        """Destroy every idle context (at exit; or to hand the kernel's events back)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for ctx in idle:
            ctx.destroy()


_CONTEXTS = _ContextPool()
atexit.register(_CONTEXTS.clear)


@functools.cache
def aio_available() -> bool:
    """True when native AIO can be used here (Linux on x86_64/aarch64, and io_setup works)."""
    if _libc_syscall is None:
        return False
    try:
        _AioContext(1).destroy()
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- public helpers
def aligned_empty(n_pages: int) -> np.ndarray:
    """A page-aligned, uninitialised ``uint8`` array of shape (n_pages, PAGE_SIZE).

    Backed by an anonymous mmap, so it is aligned for ``O_DIRECT`` and its memory goes
    back to the OS when the array is collected. Allocate once and pass it as ``out=``:
    a fresh buffer costs a page fault per 4 KiB on first touch.
    """
    if n_pages < 0:
        raise ReaderParamError(f"n_pages must be >= 0, got {n_pages}")
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
        raise os_error(e, "cannot open for page-cache eviction", path) from e
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


def _release(fd: int, pool: ThreadPoolExecutor | None) -> None:
    """Stop a reader's workers and close its file (close() or garbage collection). No read
    is in flight by then (close() waits for them; an unreachable reader has none), so the
    idle workers need not be joined, which could deadlock if the collector ran in one."""
    if pool is not None:
        pool.shutdown(wait=False)
    os.close(fd)


class PageReader:
    """Reads sets of 4 KiB pages of one file at the device's random-read rate.

    Args:
        path: the row file. It is opened read-only for the reader's lifetime.
        threads: worker threads for ``"fadvise"`` (default 2: the copies out of the page
            cache need CPU) and ``"pread"`` (default 32: each thread is one outstanding
            read, so this *is* the queue depth). ``"aio"`` needs no threads: the calling
            thread keeps ``depth`` reads in flight.
        direct: ``True`` forces ``O_DIRECT`` (error if the filesystem refuses it), ``False``
            forces buffered reads, ``None`` uses ``O_DIRECT`` when the filesystem supports it.
        method: ``"auto"``, ``"aio"``, ``"fadvise"`` or ``"pread"`` (module docstring).
            ``"auto"``: ``"aio"`` when native AIO works and the file opens with ``O_DIRECT``
            (and ``direct`` is not False), else ``"fadvise"``.
        depth: reads in flight per call (``"aio"``) or pages advised ahead of the reads per
            worker (``"fadvise"``). Deeper than fio's 32: the disk gains a little up to ~128,
            and a deep queue keeps it busy through the few milliseconds a busy 2-core machine
            leaves the submitting thread descheduled.
        drop_behind: buffered reads only: evict each run from the page cache once copied
            (``POSIX_FADV_DONTNEED``), so the kernel does not keep a second, unbudgeted cache
            of rows the store's own tiers already manage. One more syscall per run.

    Thread-safe: any number of threads may call ``read_pages`` at once (``"aio"``: each
    call takes a kernel context from the process-wide pool of idle ones; the others share
    one worker pool). ``close`` waits for reads in progress; a reader that is garbage
    collected without ``close`` releases its file and threads all the same.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        direct: bool | None = None,
        method: str = "auto",
        depth: int = 256,
        drop_behind: bool = False,
    ) -> None:
        if method not in METHODS:
            raise ReaderParamError(f"method must be one of {METHODS}, got {method!r}")
        if threads is not None and threads < 1:
            raise ReaderParamError(f"threads must be >= 1 or None, got {threads}")
        if depth < 1:
            raise ReaderParamError(f"depth must be >= 1, got {depth}")
        if method == "fadvise" and direct:
            raise ReaderParamError("method='fadvise' reads through the page cache; it cannot be combined with direct=True")
        if method == "aio" and direct is False:
            raise ReaderParamError("method='aio' needs O_DIRECT (buffered native AIO is synchronous); "
                             "use method='fadvise' for buffered reads")
        if method == "aio" and not aio_available():
            raise ReaderParamError("native AIO is not available here (needs Linux on x86_64/aarch64); use method='auto'")
        self.path = os.fspath(path)
        self.depth = depth
        self.drop_behind = drop_behind
        if method == "auto":
            want_aio = direct is not False and aio_available()
            self._fd = self._open(direct if want_aio else False)
            method = "aio" if self.direct else "fadvise"
        else:
            self._fd = self._open(False if method == "fadvise" else direct)
        self.method = method
        if method == "aio":
            self.threads = 1
        else:
            self.threads = threads if threads is not None else (2 if method == "fadvise" else 32)
        self.n_pages: int = os.fstat(self._fd).st_size // PAGE_SIZE  # whole pages; a partial tail reads short
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="tierstore-rowio") \
            if self.threads > 1 else None
        # a reader dropped without close() still gives its fd and threads back
        self._finalizer = weakref.finalize(self, _release, self._fd, self._pool)
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
        """Read ``pages`` into the rows of a (len(pages), 4096) uint8 array, in the given order.

        ``pages``: integer page numbers, sorted unique for best coalescing (adjacent pages
        become one read). ``out``: C-contiguous uint8 array of that shape to fill
        (page-aligned, e.g. from ``aligned_empty``, when the reader is ``direct``); a new
        array otherwise. Raises ``StoreIOError`` when the OS fails a read (errno, path and
        offset in the message) and ``CorruptDataError`` when the file ends before a page does.
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
            raise IdTypeError(f"pages must be an integer array, got dtype {pages.dtype}")
        pages = pages.astype(np.int64, copy=False)
        if pages.min() < 0:
            raise InvalidIdError(f"negative page number {int(pages.min())} for {self.path}")
        starts, lengths = _runs(pages)
        offsets = pages[starts] * PAGE_SIZE

        with self._cv:
            if self._closed:
                raise StoreIOError(_errno.EBADF, "read from a closed PageReader", self.path)
            self._active += 1
        try:
            if self.method == "aio":
                self._read_aio(out, starts, lengths, offsets)
            else:
                self._read_threads(out, starts, lengths, offsets)
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()
        return out

    def _check_out(self, out: np.ndarray, n: int) -> None:
        if out.dtype != np.uint8 or out.shape != (n, PAGE_SIZE) or not out.flags.c_contiguous:
            raise ReaderParamError(f"out must be a C-contiguous uint8 array of shape ({n}, {PAGE_SIZE}), "
                             f"got {out.dtype} {out.shape}")
        if not out.flags.writeable:
            raise ReaderParamError("out must be writeable")
        if self.direct and out.ctypes.data % _DIRECT_ALIGN:
            raise ReaderParamError("out is not page-aligned, which O_DIRECT requires: allocate it with tierstore.tiers.page_reader.aligned_empty")

    def _truncated(self, offset: int, got: int, nbytes: int) -> CorruptDataError:
        return CorruptDataError(
            f"{self.path}: file ends inside page {(offset + max(got, 0)) // PAGE_SIZE} (read {got} of {nbytes} "
            f"bytes at offset {offset}; the file has {self.n_pages} whole pages): truncated row file; "
            "rebuild the store")

    # ------------------------------------------------------------------ native AIO
    def _take_context(self) -> _AioContext:
        try:
            return _CONTEXTS.take(self.depth)
        except OSError as e:  # EAGAIN: the system-wide fs.aio-max-nr is used up
            raise StoreIOError(e.errno, f"io_setup({self.depth}) failed: {e.strerror} (see fs.aio-max-nr)",
                               self.path) from e

    def _read_aio(self, out: np.ndarray, starts: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> None:
        """Keep up to ``depth`` runs in flight, as ``aio_stream.read_streamed`` (fio's way): wait
        for the first completion (min_nr 1), refill the freed slots at once, then book
        (``_record``). Python cost is per syscall, not per page; results are checked at the end.
        """
        n_runs = len(starts)
        # The iocbs as 8 little-endian u64 words each (layout in _IOCB): data, key|rw_flags,
        # opcode|reqprio|fildes, buf, nbytes, offset, reserved2, flags|resfd. Column stores are
        # ~3x cheaper than structured-field stores, which matters for small batches.
        words = np.zeros((n_runs, 8), dtype=np.uint64)
        words[:, 0] = np.arange(n_runs, dtype=np.uint64)  # aio_data: the run index (chunk 0 in the high bits)
        words[:, 2] = (self._fd << 32) | _IOCB_CMD_PREAD
        words[:, 3] = out.ctypes.data + starts * PAGE_SIZE
        words[:, 4] = lengths * PAGE_SIZE
        words[:, 5] = offsets
        iocbs = words.view(_IOCB).reshape(n_runs)
        ptrs = iocbs.ctypes.data + np.arange(n_runs, dtype=np.uint64) * np.uint64(_IOCB.itemsize)
        ptr_base = ptrs.ctypes.data
        results = np.zeros(n_runs, dtype=np.int64)  # bytes read per run, or -errno
        left, done = np.array([n_runs], dtype=np.int64), np.zeros(1, dtype=np.int64)  # _record's chunk counters
        try:  # one fault-injection point per call: the kernel reports per run, we check at the end
            short = faults.point("read", self.path, int(lengths[0]) * PAGE_SIZE)
        except OSError as e:
            raise StoreIOError(e.errno, f"read at offset {int(offsets[0])} failed: {e.strerror}", self.path) from e
        ctx = self._take_context()
        depth, events = ctx.depth, ctx.events
        ev64 = events.view(np.int64).reshape(len(events), 4)
        submitted = inflight = 0
        submit_err: StoreIOError | None = None

        def refill() -> None:
            nonlocal submitted, inflight, submit_err
            if submit_err is None and submitted < n_runs and inflight < depth:
                try:
                    got = _submit_grouped(_io_submit, ctx.id, min(depth - inflight, n_runs - submitted),
                                          ptr_base + 8 * submitted, depth)
                except OSError as e:  # EAGAIN with reads in flight: reap some, then retry
                    if e.errno != _errno.EAGAIN or inflight == 0:
                        submit_err = StoreIOError(e.errno, f"io_submit of the read at offset "
                                                  f"{int(offsets[submitted])} failed: {e.strerror}", self.path)
                    return
                submitted += got
                inflight += got

        try:
            refill()
            while inflight:
                got = _io_getevents(ctx.id, 1, events)
                inflight -= got
                refill()
                _record(ev64, got, results, left, done)
        except BaseException:
            # Reads may still be in flight into `out` and `iocbs`: io_destroy waits for them.
            ctx.destroy()
            raise
        _CONTEXTS.give(ctx)
        if submit_err is not None:
            raise submit_err
        want = lengths * PAGE_SIZE
        results[0] = min(int(results[0]), short)
        bad = np.flatnonzero(results != want)
        if len(bad):
            k = int(bad[0])
            r = int(results[k])
            if r < 0:
                raise StoreIOError(-r, f"read at offset {int(offsets[k])} failed: {os.strerror(-r)}", self.path)
            raise self._truncated(int(offsets[k]), r, int(want[k]))

    # ------------------------------------------------------------------ thread workers
    def _read_threads(self, out: np.ndarray, starts: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> None:
        # Python lists: the per-run loop indexes them, ~3x cheaper than indexing numpy scalars.
        st, ln, of = starts.tolist(), lengths.tolist(), offsets.tolist()
        flat = memoryview(out.reshape(-1))
        n_runs = len(st)
        # "pread" needs one chunk per thread for queue depth; "fadvise" reaches depth from
        # its window, so a small batch stays in the calling thread (no handoff).
        per_chunk = 1 if self.method == "pread" else max(1, self.depth // 2)
        n_chunks = max(1, min(self.threads, n_runs // per_chunk))
        bounds = [n_runs * k // n_chunks for k in range(n_chunks + 1)]
        futs: list[Future[None]] = []
        if self._pool is not None:
            futs = [self._pool.submit(self._read_chunk, flat, st, ln, of, bounds[k], bounds[k + 1])
                    for k in range(1, n_chunks)]
        err: BaseException | None = None
        try:
            self._read_chunk(flat, st, ln, of, bounds[0], bounds[1])
        except BaseException as e:  # re-raised below, after the workers stop writing into `out`
            err = e
        _wait_futures(futs)
        for f in futs:
            if err is None and f.exception() is not None:
                err = f.exception()
        if err is not None:
            raise err

    def _read_chunk(self, flat: memoryview, starts: list[int], lengths: list[int], offsets: list[int],
                    lo: int, hi: int) -> None:
        """Read runs lo..hi-1 with preadv (after fadvise WILLNEED for "fadvise"). ~2-4 us of Python per run."""
        fd = self._fd
        advise = self.method == "fadvise"
        drop = self.drop_behind and not self.direct
        fadvise = os.posix_fadvise
        willneed, dontneed = os.POSIX_FADV_WILLNEED, os.POSIX_FADV_DONTNEED
        window = self.depth
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
                got = read_full(fd, flat[pos:pos + nbytes], off, self.path)
                if got < nbytes:
                    raise self._truncated(off, got, nbytes)
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
        self._finalizer()

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"PageReader({self.path!r}, method={self.method!r}, direct={self.direct}, threads={self.threads}, "
                f"depth={self.depth}, drop_behind={self.drop_behind}, n_pages={self.n_pages})")
