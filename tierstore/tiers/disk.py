"""The disk tier: the table's row file, the bottom of every lookup.

Reads whole 4 KiB pages and verifies every page it reads against the stored checksums
before a row leaves it. Its addresses are row ids (``kind`` DISK); it holds every row and
is never written.

One disk tier, two page readers (the seam is :class:`DevicePageSource`):

- ``reader``: the POSIX ``page_reader.PageReader`` (native AIO with O_DIRECT, or buffered),
  into host memory; numpy verifies and cuts the rows. Every read whose destination is host
  memory goes here, and every read at all when no device reader is plugged in.
- ``device_reader``: a page reader into device memory, chosen at open
  (:func:`choose_device_reader`): ``kvikio_reader.KvikioPageReader`` when the store runs on
  CUDA and kvikio is importable, else none. Reads whose destination is on its device go
  here; torch verifies the pages (``page_checksums_torch``) and cuts the rows on that
  device, so cold rows reach GPU memory without a bounce through host memory.

``stats()`` says which reader serves device-bound reads (``reader``: "posix" or "kvikio"),
how (``reader_mode``: the POSIX method, or kvikio's "gds" / "cufile-compat" / "compat") and
how many pages went through it (``device_pages_read``).

All methods take whole batches (numpy int64 row arrays); there is no per-row Python work.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import CorruptDataError, TierStoreError
from ..format.order import load_order
from ..format.writer import fast_page_checksums
from ..format.spec import (PAGE_SIZE, TableInfo, check_header_page, load_checksums, page_checksums,
                           page_checksums_torch)
from .base import DISK
from .cuda import to_device
from .kvikio_reader import KvikioPageReader, load_kvikio
from .aio_stream import read_streamed
from .page_reader import PageReader, aligned_empty

__all__ = ["DiskTier", "CHUNK_ROWS", "DevicePageSource", "choose_device_reader", "READERS"]

CHUNK_ROWS = 1024  # rows per read+verify+gather step: at most 2048 pages (8 MiB) in flight
CHUNK_BYTES = 4 << 20  # ...and at most this many row bytes per step (rows wider than 4 KiB)
READERS = ("auto", "posix", "kvikio")
_Spans = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # DiskTier._spans: start, first, last, pages
SWEEP_BYTES = 16 << 20  # one read of ``sweep``: 16 runs of 1 MiB in flight
SWEEP_AHEAD = 4  # windows of ``sweep`` queued ahead of the one its caller holds
SWEEP_THREADS = 2  # ...read and checked at once: 32 runs of 1 MiB in flight


@runtime_checkable
class DevicePageSource(Protocol):
    """A page reader whose pages land in torch tensors on ``device`` (the disk tier's seam).

    ``KvikioPageReader`` is the one the product plugs in; the tests plug in stand-ins."""

    kind: str  # reported as stats()["reader"], e.g. "kvikio"
    mode: str  # reported as stats()["reader_mode"], e.g. "gds" or "compat"
    device: torch.device  # where read_pages puts the pages

    def read_pages(self, pages: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """``pages`` (sorted unique int64) as a (len(pages), 4096) uint8 tensor on ``device``
        (the reader's per-thread staging when ``out`` is None). StoreIOError / CorruptDataError
        as ``PageReader.read_pages``."""
        ...

    def release(self) -> None:
        """The reads of the last returned staging are queued (this thread): it may be reused
        once they have run."""
        ...

    def staging_bytes(self) -> int: ...

    def close(self) -> None: ...


def choose_device_reader(path: Path, device: torch.device, reader: str = "auto"
                         ) -> DevicePageSource | None:
    """The device page reader of a disk tier whose lookups return rows on ``device``.

    ``"auto"``: kvikio when ``device`` is CUDA and kvikio is importable, else None (POSIX
    reads into host memory, then a copy). ``"posix"``: None. ``"kvikio"``: kvikio or a
    ``TierStoreError`` saying what is missing.
    """
    if reader not in READERS:
        raise TierStoreError(f"disk_reader={reader!r} must be one of {READERS}")
    if reader == "posix" or (reader == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise TierStoreError(f"disk_reader='kvikio' reads into GPU memory: it needs device='cuda', not {device}")
    kvikio = load_kvikio()
    if kvikio is None:
        if reader == "kvikio":
            raise TierStoreError("disk_reader='kvikio' but kvikio is not installed: pip install -e '.[gpu]'")
        return None
    try:  # never run: needs CUDA
        return KvikioPageReader(path, device, kvikio=kvikio)
    except (RuntimeError, OSError) as e:  # kvikio cannot open the file here (e.g. no libcufile, no libcuda)
        if reader == "kvikio":
            raise TierStoreError(f"disk_reader='kvikio': kvikio cannot open {path} ({e}); use disk_reader='posix'") \
                from None
        return None  # "auto": the POSIX reader serves, and stats()["disk"]["reader"] says so


def _malloc_trim() -> None:
    """Give the C heap's free memory back to the OS (glibc; a no-op elsewhere). A large batch's
    per-chunk page lists are small arrays from the C heap: freed, they stayed in it (~20 MiB of
    RssAnon after open on a 52M-row table, test_memory_bound.py's static-16MiB case)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: ctypes.CDLL | bool | None = None


class DiskTier:
    """Cold rows, read from the table's row file with per-page checksum verification.

    Thread-safe: concurrent lookups may read at once (the reader is thread-safe and the
    counters are updated under a small lock).
    """

    name = "disk"
    kind = DISK
    arrives_filled = True  # the row file holds every row
    # reads in flight per unit of the reader's depth, on a large batch: one AIO queue for the
    # whole batch (tiers.aio_stream) keeps exactly `depth` (two chunk calls at once did 2x)
    in_flight_per_depth = 1
    index = None  # no bookkeeping: row r is at its place in the file
    slab = None  # nothing in memory

    def __init__(self, root: Path, info: TableInfo, *, direct: bool | None = None, threads: int | None = None,
                 method: str = "auto", depth: int = 256, device: torch.device | None = None,
                 device_reader: str | Callable[[Path], DevicePageSource] = "auto", build_id: str | None = None):
        """``direct``, ``threads``, ``method`` and ``depth`` configure the POSIX page reader
        (tierstore.tiers.page_reader.PageReader): the store sets only the first two, the
        cold-read benchmark compares the reader's methods through this tier. device: where
        lookups want rows (the store's device); device_reader: "auto", "posix", "kvikio"
        (:func:`choose_device_reader`) or a ``path -> DevicePageSource`` factory (tests).
        build_id: the manifest's (version 3+ stores): the row file's header and the order
        file must carry it (``StoreChangedError`` otherwise), and the checksum file's first
        entry must be the header page's checksum. Each file is opened once and checked on
        the opened file; every later read uses that file, whatever its path names by then."""
        self.info = info
        self.path = root / info.file
        size = self.path.stat().st_size if self.path.exists() else -1
        if size != info.file_bytes:
            raise CorruptDataError(
                f"{self.path}: row file of table {info.name!r} has {size} bytes, expected "
                f"{info.file_bytes}: truncated or replaced; rebuild the store (`tierstore verify` for details)"
            )
        self.sums = load_checksums(root, info)
        # hotness-ordered layout: row id <-> file position (format.order: the hot ids only, or an
        # older store's position per row, memory-mapped); checked by one full read of the file here
        self.pos = load_order(root, info, build_id) if info.order_file else None
        self._local = threading.local()  # per-thread aligned read buffer
        self._pool: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()
        self.reader = PageReader(self.path, direct=direct, threads=threads, method=method, depth=depth)
        self.device_reader: DevicePageSource | None = None
        try:
            fd = self.reader.fileno()
            if os.fstat(fd).st_size != info.file_bytes:  # the file opened, not the one stat'ed above
                raise CorruptDataError(f"{self.path}: row file of table {info.name!r} was replaced while it was "
                                       "opened (another size); open the store again")
            # the device reader opens the same file again through the POSIX reader's descriptor
            # (Linux: /proc/self/fd/N reopens that inode, whatever the path names by now)
            same = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else self.path
            self.device_reader = device_reader(Path(same)) if callable(device_reader) else \
                choose_device_reader(Path(same), device or torch.device("cpu"), device_reader)
            self._check_header(build_id)
        except BaseException:  # release the file and the checksum map now, not when the traceback goes
            self.close()
            raise
        self.rows_read = 0
        self.pages_read = 0
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.device_pages_read = 0

    @property
    def device(self) -> torch.device:
        """Where ``gather`` puts rows when given no ``out``: the device reader's device, else the CPU."""
        return self.device_reader.device if self.device_reader is not None else torch.device("cpu")

    def _check_header(self, build_id: str | None) -> None:
        """The row file's header page must pass its checksum and agree with the manifest
        (one 4 KiB read per table at open): a damaged or edited manifest must not re-slice rows.
        Its checksum is the checksum file's first entry, so (version 3+, the header holding the
        build id) that file is of the same build too."""
        head = self.reader.read_pages(np.zeros(1, dtype=np.int64))
        if page_checksums(head)[0] != self.sums[0]:
            raise CorruptDataError(f"{self.path}: the header page fails its checksum (or {self.info.checksum_file} "
                                   "is of another build); rebuild the store")
        check_header_page(head[0], self.info, str(self.path), build_id)

    def _row_spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start = PAGE_SIZE + rows * self.info.row_stride  # byte offset of each row in the file
        first = start // PAGE_SIZE
        last = (start + self.info.row_bytes - 1) // PAGE_SIZE  # == first unless the row straddles a page
        return start, first, last

    def _overlap(self) -> ThreadPoolExecutor:
        """The two threads that read large batches chunk by chunk (started on first use)."""
        with self.lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="tierstore-disk")
            return self._pool

    def _scratch(self, n_pages: int) -> np.ndarray:
        """This thread's page-aligned read buffer (reused: a fresh one page-faults per 4 KiB)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n_pages:
            buf = self._local.buf = aligned_empty(max(n_pages, 2 * CHUNK_ROWS, 2 + CHUNK_BYTES // PAGE_SIZE))
        return buf[:n_pages]

    def gather(self, rows: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tier protocol's gather: ``read`` into ``out`` (a new tensor on ``device`` when None)."""
        if out is None:
            out = torch.empty((len(rows), self.info.dim), dtype=self.info.raw_dtype, device=self.device)
        self.read(rows, out)
        return out

    def write(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        raise TierStoreError(f"table {self.info.name!r}: the disk tier is read-only (rebuild the store to change rows)")

    def preload(self, disk: DiskTier, source: object = None, snapshot: object = None) -> None:
        """Nothing to load: the disk tier holds every row."""

    def read(self, rows: np.ndarray, out: torch.Tensor,
             on_chunk: Callable[[np.ndarray, torch.Tensor], None] | None = None) -> None:
        """Fill ``out`` (len(rows), dim) with the stored rows. ``rows``: int64, unique.

        Works through the rows in file order, CHUNK_ROWS at a time: read the pages that hold
        them into a reused buffer, verify every page's checksum, cut the rows out with one
        vectorized gather. Chunks keep the buffer small and cache-warm.

        ``out`` on the device reader's device: pages land there and are verified and cut
        there (torch). ``out`` in host memory: the POSIX reader (numpy). ``out`` on a CUDA
        device with no device reader: POSIX into pinned host memory, one copy up.

        A batch of several chunks read with ``"aio"`` into host memory is one AIO queue kept
        at the reader's depth across the chunks (``tiers.aio_stream``): reads in flight are
        that depth, not twice it, and never drain at a chunk's end.

        ``on_chunk(sel, got)``: called as each chunk's rows are in place (verified), from
        the thread that verified the chunk (one of the two overlap threads for a batch of
        several chunks, so at most two calls run at once, on disjoint ``sel``): ``sel`` (int64) are
        the positions in ``rows`` of that chunk, ``got`` their rows (``out[sel]``; a view of
        ``out`` when the positions are consecutive). The caller's per-chunk work (copies of
        the rows into caches and into a result) then overlaps the next chunk's reads instead
        of waiting for the last one. An error it raises is the read's error.
        """
        if len(rows) == 0:
            return
        dr = self.device_reader
        on_device = dr is not None and out.device == dr.device
        if not on_device and out.device.type != "cpu":  # never run: needs CUDA
            staged = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self.read(rows, staged, on_chunk)
            out.copy_(staged, non_blocking=True)  # the caching host allocator keeps `staged` until it ran
            return
        t0 = time.perf_counter()
        phys = rows if self.pos is None else self.pos.of(rows)
        if on_device:
            dst = out.view(torch.uint8).reshape(len(rows), self.info.row_bytes)
        else:
            dst = out.view(torch.uint8).numpy().reshape(len(rows), self.info.row_bytes)
        in_order = len(phys) < 2 or bool((phys[1:] > phys[:-1]).all())
        order = None if in_order else np.argsort(phys, kind="stable")
        step = max(1, min(CHUNK_ROWS, CHUNK_BYTES // max(1, self.info.row_bytes)))

        # CUDA: the overlap pool's threads must queue their gathers on the caller's stream, not
        # on their own default one, or the caller's next kernel could read rows before they land
        stream = torch.cuda.current_stream(dst.device) if on_device and dst.device.type == "cuda" else None

        def chunk(c: int) -> int:
            if stream is None:
                return chunk_here(c)
            with torch.cuda.stream(stream):  # never run: needs CUDA
                return chunk_here(c)

        def chunk_here(c: int, spans: _Spans | None = None, buf: np.ndarray | None = None) -> int:
            sel = slice(c, c + step) if order is None else order[c : c + step]
            if order is None:
                n = self._read_chunk(rows[sel], phys[sel], dst[sel], spans, buf)
                if on_chunk is not None:
                    on_chunk(np.arange(c, min(c + step, len(rows)), dtype=np.int64), out[sel])
                return n
            if not on_device:
                part = np.empty((len(sel), self.info.row_bytes), dtype=np.uint8)
                n = self._read_chunk(rows[sel], phys[sel], part, spans, buf)
                dst[sel] = part
                if on_chunk is not None:
                    on_chunk(sel, torch.from_numpy(part).view(out.dtype).view(len(sel), -1))
                return n
            part_t = torch.empty((len(sel), self.info.row_bytes), dtype=torch.uint8, device=dst.device)
            n = self._read_chunk(rows[sel], phys[sel], part_t)
            dst.index_copy_(0, to_device([sel], dst.device)[0], part_t)
            if on_chunk is not None:  # never run: needs CUDA
                on_chunk(sel, part_t.view(out.dtype).view(len(sel), -1))
            return n

        starts = range(0, len(rows), step)
        if len(starts) == 1:
            n_pages = chunk(0)
        elif not on_device and self.reader.method == "aio":
            # One AIO queue kept `depth` deep across the chunks (tiers.aio_stream): each chunk is
            # verified, cut out and handed to on_chunk on an overlap thread while the next
            # chunks' reads keep the queue full. Every chunk has finished before this returns.
            spans = [self._spans(phys[c : c + step] if order is None else phys[order[c : c + step]]) for c in starts]
            bufs = self._stream_bufs(max(len(sp[3]) for sp in spans))
            read_streamed(self.reader, [sp[3] for sp in spans], bufs,
                          lambda i, buf: chunk_here(starts[i], spans[i], buf), self._overlap())
            n_pages = sum(len(sp[3]) for sp in spans)
        else:
            # Two chunks in flight: while one is verified and gathered, the other's reads keep
            # the disk busy (one at a time, the queue drained at every chunk's end: ~0.8x the
            # device's random-read rate instead of ~1x). Each thread uses its own scratch.
            # Every chunk has finished before this returns or raises: a chunk still writing
            # into ``out`` after an error would corrupt a buffer the caller reuses.
            futs = [self._overlap().submit(chunk, c) for c in starts]
            wait_futures(futs)
            n_pages = sum(f.result() for f in futs)  # re-raises the first chunk's error
        dt = time.perf_counter() - t0
        with self.lock:
            self.rows_read += len(rows)
            self.pages_read += n_pages
            self.bytes_read += n_pages * PAGE_SIZE
            self.read_seconds += dt
            if on_device:
                self.device_pages_read += n_pages

    def _spans(self, phys: np.ndarray) -> _Spans:
        """(start, first, last, pages) of rows at file positions ``phys``: each row's byte
        offset, first and last page, and the sorted unique pages they touch."""
        start, first, last = self._row_spans(phys)
        # Every page a row touches, not just its first and last: a row wider than a page
        # spans several. Rows have one width, so each spans `span` or `span - 1` pages.
        span = int((last - first).max()) + 1
        touched = first[:, None] + np.arange(span)
        return start, first, last, np.unique(np.minimum(touched, last[:, None]))

    def release_buffers(self) -> None:
        """Drop this thread's cached read buffers (``_scratch``, ``_stream_bufs``: up to 3 x
        2,048 pages). Open preloads on the opening thread, which may never read again: kept,
        they were ~20 MiB of anonymous memory after open on a 52M-row table with 16 MiB of
        budgets (``test_memory_bound.py``'s static-16MiB case). The next read allocates anew."""
        for name in ("buf", "stream"):
            self._local.__dict__.pop(name, None)
        _malloc_trim()

    def _stream_bufs(self, n_pages: int, count: int = 3) -> list[np.ndarray]:
        """This thread's ``count`` page buffers of ``n_pages`` for a streamed read (reused)."""
        buf = getattr(self._local, "stream", None)
        if buf is None or len(buf) < count * n_pages:
            buf = self._local.stream = aligned_empty(count * max(n_pages, CHUNK_ROWS))
        return [buf[i * n_pages:(i + 1) * n_pages] for i in range(count)]

    def _read_chunk(self, rows: np.ndarray, phys: np.ndarray, dst: np.ndarray | torch.Tensor,
                    spans: _Spans | None = None, buf: np.ndarray | None = None) -> int:
        """Read, verify and cut out one chunk's rows into ``dst`` (rows, row_bytes): a numpy
        array through the POSIX reader, a tensor through the device reader. ``spans``
        (``_spans(phys)``) and ``buf`` (its pages, already read): a streamed chunk."""
        info = self.info
        start, first, last, pages = spans if spans is not None else self._spans(phys)
        if buf is not None:
            sums = page_checksums(buf)
        elif isinstance(dst, np.ndarray):
            buf = self.reader.read_pages(pages, out=self._scratch(len(pages)))
            sums = page_checksums(buf)
        else:
            buf = self.device_reader.read_pages(pages)
            # verified where the pages are; 8 bytes per page come back (this waits for the stream)
            sums = page_checksums_torch(buf).cpu().numpy().view(np.uint64)
        bad = np.flatnonzero(sums != self.sums[pages])
        if len(bad):
            page = int(pages[bad[0]])
            hit = rows[(first <= page) & (page <= last)]
            raise CorruptDataError(
                f"table {info.name!r}: page {page} (byte offset {page * PAGE_SIZE} of {self.path}) fails its "
                f"checksum; rows {hit[:4].tolist()} are affected. Run `tierstore verify` and rebuild the store"
            )
        # All pages of a row are consecutive entries of `pages`, so each row is one contiguous
        # run in the flat buffer starting at (its first page's position, in-page offset).
        pos = np.searchsorted(pages, first) * PAGE_SIZE + start % PAGE_SIZE
        if isinstance(dst, np.ndarray):
            flat = buf.reshape(-1)
            if info.row_bytes % 8 == 0:  # stride is a multiple of 16, so offsets are 8-aligned
                idx = (pos // 8)[:, None] + np.arange(info.row_bytes // 8)
                np.take(flat.view(np.uint64), idx, out=dst.view(np.uint64))
            else:
                np.take(flat, pos[:, None] + np.arange(info.row_bytes), out=dst)
        else:
            self._cut_rows(buf, pos, dst)
        return len(pages)

    def _cut_rows(self, buf: torch.Tensor, pos: np.ndarray, dst: torch.Tensor) -> None:
        """Rows starting at byte ``pos`` of the pages ``buf`` into ``dst``, on their device:
        the row offsets go over (one copy), the (rows, words) index is built there."""
        rb = self.info.row_bytes
        wide = rb % 8 == 0
        (start,) = to_device([pos // 8 if wide else pos], buf.device)
        if wide:
            idx = start[:, None] + torch.arange(rb // 8, device=buf.device)
            torch.index_select(buf.reshape(-1).view(torch.int64), 0, idx.reshape(-1), out=dst.view(torch.int64).reshape(-1))
        else:
            idx = start[:, None] + torch.arange(rb, device=buf.device)
            torch.index_select(buf.reshape(-1), 0, idx.reshape(-1), out=dst.reshape(-1))
        self.device_reader.release()  # the staging may be reused once this gather has run

    def sweep(self, rows: np.ndarray, window: int | None = None
              ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """The stored bytes of ``rows`` (valid ids, distinct) in file order, as ``(index into
        rows, src, sel)`` batches: the batch's rows are ``src[sel]`` (``src`` a uint8 view of
        the window read, rows at the row stride; ``sel`` int64), valid until the next batch is
        asked for, so the caller gathers them straight to where they go (one copy, no
        temporary). The row file is read front to back, only the spans that hold asked rows,
        in windows of ``window`` bytes (``SWEEP_BYTES``; runs of 1 MiB direct reads): ``SWEEP_AHEAD`` windows
        queued ahead on ``SWEEP_THREADS`` threads, each read and checked against its checksums
        there while the caller uses an earlier one, so the disk's queue does not drain at a
        window's end. Every page read is checked (``CorruptDataError``). For the bulk readers
        (the hot-set snapshot): a lookup's page-per-row reads ran at 26 MB/s there. Memory:
        ``SWEEP_AHEAD + 1`` windows and the rows' order (8-16 bytes per row asked)."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        if n == 0:
            return
        phys = rows if self.pos is None else self.pos.of(rows)
        order = np.argsort(phys, kind="stable")
        sphys = phys[order]
        start, first, last = self._row_spans(sphys)  # sorted: so are first and last
        stride = self.info.row_stride
        del phys
        wp = max(1, (window or SWEEP_BYTES) // PAGE_SIZE)
        wins = []  # (rows i:j, pages p0:p1): from the first page of the next row left, a window long
        i = 0
        while i < n:  # one step per window, not per row
            p0 = int(first[i])
            j = max(i + 1, int(np.searchsorted(last, p0 + wp - 1, side="right")))
            wins.append((i, j, p0, int(last[j - 1]) + 1))
            i = j
        span = max(p1 - p0 for _, _, p0, p1 in wins)
        ahead = min(SWEEP_AHEAD, len(wins))
        # one buffer per window queued, and the one the caller holds: window w + ahead (queued
        # once the caller asks past w) reuses window w - 1's, which the caller is done with
        bufs = [aligned_empty(span) for _ in range(min(len(wins), ahead + 1))]
        rb = self.info.row_bytes

        def load(w: int) -> tuple[torch.Tensor, torch.Tensor]:
            i, j, p0, p1 = wins[w]
            t0 = time.perf_counter()
            buf = self.reader.read_pages(np.arange(p0, p1, dtype=np.int64), out=bufs[w % len(bufs)][: p1 - p0])
            bad = np.flatnonzero(fast_page_checksums(buf) != self.sums[p0:p1])
            if len(bad):
                page = p0 + int(bad[0])
                raise CorruptDataError(
                    f"table {self.info.name!r}: page {page} (byte offset {page * PAGE_SIZE} of {self.path}) fails "
                    "its checksum. Run `tierstore verify` and rebuild the store")
            # the window as rows at the row stride from its first asked row (a view), and the
            # asked rows' places in it: one index per row, not one per byte or word
            first_row = int(sphys[i])
            o0 = int(start[i]) - p0 * PAGE_SIZE
            span_rows = int(sphys[j - 1]) - first_row + 1
            view = np.lib.stride_tricks.as_strided(buf.reshape(-1)[o0:], shape=(span_rows, rb), strides=(stride, 1))
            with self.lock:
                self.rows_read += j - i
                self.pages_read += p1 - p0
                self.bytes_read += (p1 - p0) * PAGE_SIZE
                self.read_seconds += time.perf_counter() - t0
            return torch.from_numpy(view), torch.from_numpy(sphys[i:j] - first_row)

        pool = ThreadPoolExecutor(min(SWEEP_THREADS, ahead), thread_name_prefix="tierstore-sweep")
        queued = deque(pool.submit(load, w) for w in range(ahead))
        try:
            for w in range(len(wins)):
                src, sel = queued.popleft().result()
                if w + ahead < len(wins):
                    queued.append(pool.submit(load, w + ahead))
                yield order[wins[w][0]: wins[w][1]], src, sel
        finally:
            for f in queued:
                f.cancel()
            pool.shutdown(wait=True)  # no read left writing into a buffer

    def read_range(self, start: int, stop: int, out: torch.Tensor) -> np.ndarray:
        """The rows at file positions ``start:stop`` (one sequential read, e.g. loading a resident
        table) into ``out``; returns their row ids (``start:stop`` unless the layout is ordered)."""
        rows = np.arange(start, stop, dtype=np.int64) if self.pos is None else self.pos.ids(start, stop)
        self.read(rows, out)
        return rows

    def load_table(self, slab: torch.Tensor, progress: Callable[[int], None] | None = None) -> None:
        """Read the whole table into ``slab`` (rows, dim), slab[r] = row r, in file order:
        sequential reads in 64 MiB steps, whatever the layout. ``progress(rows_done)`` is
        called after each step (the shared host tier's fill shows its waiters it is alive)."""
        step = max(1, (64 << 20) // max(1, self.info.row_bytes))
        try:
            for s in range(0, self.info.rows, step):
                e = min(s + step, self.info.rows)
                buf = torch.empty((e - s, self.info.dim), dtype=self.info.raw_dtype, device=slab.device)
                rows = self.read_range(s, e, buf)
                slab.index_copy_(0, to_device([rows], slab.device)[0], buf)
                if progress is not None:
                    progress(e)
        finally:
            if self.pos is not None:
                self.pos.release()  # what only the load needed (a dense order's inverse: 4 B per row)

    def stats(self) -> dict[str, float | str]:
        dr = self.device_reader
        return {"rows_read": self.rows_read, "pages_read": self.pages_read, "bytes_read": self.bytes_read,
                "read_seconds": self.read_seconds, "device_pages_read": self.device_pages_read,
                "reader": dr.kind if dr is not None else "posix",
                "reader_mode": dr.mode if dr is not None else self.reader.method,
                "staging_bytes": dr.staging_bytes() if dr is not None else 0,
                # in memory, not in files: a head-form row order's hot ids (12 B each), an older
                # dense one's inverse while a resident tier loads (the checksums are mapped)
                "meta_bytes": self.pos.nbytes if self.pos is not None else 0}

    def reset_stats(self) -> None:
        with self.lock:
            self.rows_read = self.pages_read = self.bytes_read = self.device_pages_read = 0
            self.read_seconds = 0.0

    def close(self) -> None:
        """Close the row file and drop the checksum and order maps. Idempotent."""
        with self.lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self.reader.close()
        if self.device_reader is not None:
            self.device_reader.close()
        self.sums = self.pos = None  # type: ignore[assignment]

