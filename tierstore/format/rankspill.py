"""Rows met in one order, emitted in another: the one sweep, bounded-memory rank pass.

Two writers produce rows in *rank* order (hottest first) from a source read in *file* order
(row-id order): the hot-ordered build's head (``format.sweep``) and the hot-set snapshot
(``format.snapshot``). Gathering each output chunk in rank order from the source reads it at
random (a page per row), or once per chunk of output; holding the whole head in memory is
unbounded (a 16 GiB head at V4.1 size). So: an external bucket pass.

:class:`RankSpill` takes records (``rec`` bytes each) tagged with their final position in
``[0, n)``, in any order, in batches (:meth:`add`). Positions are cut into buckets of
``bucket`` consecutive positions. When the whole output fits ``memory`` the records are
appended to one in-memory buffer (``resident``: no extra I/O). Otherwise each record is
appended, through a small per-bucket staging buffer (two halves: one fills while the other is
written by one of ``WRITERS`` writer threads, so several buckets' writes are in flight at
once), to its bucket's *own region* of the output file (bucket ``k``'s region is exactly the
bytes its records finally occupy), with large sequential page-aligned writes (``O_DIRECT``
where the filesystem takes it); with ``hold_first``, bucket 0's records go instead straight
into the buffer the other buckets are later read back into (it is gathered first). Once
every record is in, :meth:`load` reads one bucket back (one sequential read of at most
``bucket`` records) and :meth:`gather` copies any run of its positions out in position order
(a gather: ``torch.index_select`` over whole words, which releases the GIL). The caller then
writes those rows in place. Every record is written twice and read back once when spilled.

Memory: the resident buffer (at most ``memory``) or one bucket's read-back plus the staging
buffers (``stage_bytes`` in all, but at least two whole-page runs of records per bucket:
``2 x lcm(rec, 4096)`` bytes, 264 KiB for 264-byte rows, 64 of them for a 16 GiB head in
256 MiB buckets), and the arrival order (4 bytes per record: what ``gather``
permutes by). Nothing is sized by the source table. The scratch is the output file itself,
so a failure or a kill leaves nothing beyond what the caller's own atomic publication
cleans: the build's work directory (``format.recovery``), the snapshot's temporary sibling
(``files.atomic_write``). Every write and read passes the fault seam (``files.pwrite_all``,
``files.read_full``); OS failures raise ``StoreIOError`` or ``CapacityError`` (disk full).
"""

from __future__ import annotations

import errno
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..files import os_error, pwrite_all, read_full
from .prefetch import aligned_buffer, small_stacks
from .spec import PAGE_SIZE

__all__ = ["RankSpill", "BUCKET_BYTES", "STAGE_BYTES", "widest_word"]

BUCKET_BYTES = 256 << 20  # one bucket read back at a time: the spilled pass's memory
STAGE_BYTES = 64 << 20  # all buckets' staging buffers together (each >= one whole-page run of records)
_STAGE_MAX = 4 << 20  # one bucket's staging: the size of each spill write
WRITERS = 3  # spill writes in flight at once (each bucket's halves alternate; buckets go in parallel)


def widest_word(*ts: torch.Tensor) -> torch.dtype:
    """The widest integer dtype every uint8 matrix in ``ts`` can be viewed as (rows, offset and
    row stride all multiples of its size)."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if all(t.shape[1] % size == 0 and t.storage_offset() % size == 0 and t.stride(0) % size == 0 for t in ts):
            return dtype
    return torch.uint8


class RankSpill:
    """``n`` records of ``rec`` bytes bound for file bytes ``base + p * rec`` (``p`` in
    ``[0, n)``, ``base`` page-aligned) of ``path``, which must exist (it is opened for
    reading and writing; the caller writes the final rows itself).

    memory: when ``n * rec`` fits it (and ``max_rows``), the records stay in memory.
    bucket_bytes: otherwise the bytes of one bucket (rounded down to whole pages of records,
        and to a multiple of ``multiple`` records, at least one such unit).
    hold_first: spilled, bucket 0's records go straight into the buffer buckets are read back
        into (allocated now instead of at the first :meth:`load`), never to the file: one
        bucket less written and read back, for a caller that gathers bucket 0 first (the
        snapshot). Its memory is the same buffer the pass needs later anyway.
    Not thread-safe: one caller thread. ``close()`` when done (also on error).
    """

    def __init__(self, path: str | os.PathLike[str], base: int, n: int, rec: int, *, memory: int,
                 bucket_bytes: int = BUCKET_BYTES, stage_bytes: int = STAGE_BYTES, multiple: int = 1,
                 max_rows: int = 1 << 62, hold_first: bool = False) -> None:
        assert base % PAGE_SIZE == 0 and n >= 0 and rec > 0
        self.path, self.base, self.n, self.rec = Path(path), base, n, rec
        unit = PAGE_SIZE // math.gcd(rec, PAGE_SIZE)  # records per whole number of pages
        unit = unit * multiple // math.gcd(unit, multiple)
        self.resident = n * rec <= memory and n <= max_rows
        if self.resident:
            self.bucket = max(1, n)
        else:
            self.bucket = max(unit, min(bucket_bytes // rec, max_rows) // unit * unit)
        self.n_buckets = max(1, -(-n // self.bucket))
        idx = np.int32 if self.bucket < 2**31 else np.int64
        self.arrival = np.empty(n, dtype=idx)  # bucket k's slots k*bucket.. : in-bucket positions, as they came
        self.fill = np.zeros(self.n_buckets, dtype=np.int64)  # records in so far, per bucket
        self.fd = self.bfd = -1  # bfd: a buffered descriptor, once the filesystem refuses a direct transfer
        self.held = False
        self.buf: torch.Tensor | None = None  # (rows, rec) uint8: the resident records, or the loaded bucket
        self.loaded = -1
        self.order: torch.Tensor | None = None  # loaded bucket: the buffer row of each of its positions
        if self.resident:
            self.buf = torch.from_numpy(aligned_buffer(max(1, n) * rec, populate=n > 0).reshape(max(1, n), rec))
            self.loaded = 0
            return
        per = max(unit, min(_STAGE_MAX // rec, stage_bytes // 2 // self.n_buckets // rec, self.bucket // 8)
                  // unit * unit)
        self.stage_rows = per
        self.held = hold_first  # bucket 0 in self.buf until the first other bucket is loaded
        if hold_first:
            self.buf = torch.from_numpy(aligned_buffer(self.bucket * rec + PAGE_SIZE, populate=True))
            self.loaded = 0
        # two staging halves per bucket: one fills while the other's write runs in the writer thread
        self.stage = torch.from_numpy(aligned_buffer(self.n_buckets * 2 * per * rec).reshape(self.n_buckets, 2, per, rec))
        self.half = np.zeros(self.n_buckets, dtype=np.int64)  # the half of each bucket now filling
        self.writes: dict[tuple[int, int], Future[None]] = {}  # (bucket, half) -> its write in flight
        self.staged = np.zeros(self.n_buckets, dtype=np.int64)  # records in each staging buffer
        self.flushed = np.zeros(self.n_buckets, dtype=np.int64)  # records written to each region
        self.direct = True
        self._lock = threading.Lock()
        try:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct, self.fd = False, os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise os_error(e, "opening for the rank pass", self.path) from e
        with small_stacks():  # its one thread started now (builds run under RLIMIT_AS caps)
            self.pool: ThreadPoolExecutor | None = ThreadPoolExecutor(WRITERS, thread_name_prefix="tierstore-spill")
            for f in [self.pool.submit(int) for _ in range(WRITERS)]:
                f.result()

    # -- in: records in any order ------------------------------------------------------------------

    def slots(self, pos: np.ndarray) -> torch.Tensor:
        """Resident only: take records bound for ``pos`` and return the buffer rows (uint8
        (m, rec)) the caller fills with them (no staging copy: the sweep gathers straight in)."""
        assert self.resident
        pos = np.asarray(pos, dtype=np.int64)
        f = int(self.fill[0])
        self._arrive(0, f, pos)
        return self.buf[f: f + len(pos)]

    def _arrive(self, k: int, f: int, pos: np.ndarray) -> None:
        m = len(pos)
        if f + m > self.count(k):
            raise AssertionError(f"rank pass: bucket {k} given more records than it holds")
        self.arrival[k * self.bucket + f: k * self.bucket + f + m] = pos - k * self.bucket
        self.fill[k] += m

    def add(self, pos: np.ndarray, rows: torch.Tensor, sel: torch.Tensor | None = None) -> None:
        """Records ``rows`` (uint8 (m, rec), any strides), or ``rows[sel]`` (``sel`` int64:
        gathered straight from the caller's buffer, e.g. a window the sweep read), bound for
        positions ``pos`` (distinct, in ``[0, n)``). One copy per bucket touched, not per record."""
        pos = np.asarray(pos, dtype=np.int64)
        if pos.size == 0:
            return
        b = pos // self.bucket
        if self.resident or (b[0] == b[-1] and (b == b[0]).all()):
            self._add_one(int(b[0]), pos, rows, sel)
            return
        grp = np.argsort(b, kind="stable")
        bs = b[grp]
        cuts = np.flatnonzero(bs[1:] != bs[:-1]) + 1
        g = torch.from_numpy(grp)
        if sel is not None:
            g = sel[g]
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(grp)]):  # buckets touched: <= n_buckets
            self._add_one(int(bs[lo]), pos[grp[lo:hi]], rows, g[lo:hi])

    def _add_one(self, k: int, pos: np.ndarray, rows: torch.Tensor, sel: torch.Tensor | None = None) -> None:
        """Records ``rows`` (or ``rows[sel]``: gathered straight into place, no temporary) into bucket ``k``."""
        m, f = len(pos), int(self.fill[k])
        self._arrive(k, f, pos)
        if self.resident or (k == 0 and self.held):
            m0 = self.count(0)
            _copy(self.buf.view(-1)[: m0 * self.rec].view(m0, self.rec)[f: f + m], rows, sel)
            return
        done = 0
        while done < m:  # into the staging buffer, written out whenever it fills
            s = int(self.staged[k])
            take = min(m - done, self.stage_rows - s)
            _copy(self.stage[k, int(self.half[k]), s: s + take], rows if sel is not None else rows[done: done + take],
                  sel[done: done + take] if sel is not None else None)
            self.staged[k] += take
            done += take
            if self.staged[k] == self.stage_rows:
                self._flush(k)

    def _flush(self, k: int) -> None:
        """Bucket ``k``'s filling half to the writer thread; the other half, once its own write
        is done, fills next."""
        s = int(self.staged[k])
        if s == 0:
            return
        h = int(self.half[k])
        nbytes = s * self.rec
        padded = -(-nbytes // PAGE_SIZE) * PAGE_SIZE  # only a bucket's last write is ragged: past it, nothing yet
        at = self.base + (k * self.bucket + int(self.flushed[k])) * self.rec
        data = self.stage[k, h].view(-1).numpy()[:padded]
        if padded > nbytes:
            data[nbytes:] = 0
        assert self.pool is not None
        self.writes[(k, h)] = self.pool.submit(self._pwrite, memoryview(data), at)
        self.flushed[k] += s
        self.staged[k] = 0
        self.half[k] = h ^ 1
        prev = self.writes.pop((k, h ^ 1), None)
        if prev is not None:
            prev.result()  # that half is free again (or its write's error is raised here)

    def _drain(self) -> None:
        """Every staged record written (errors raised here)."""
        for j in range(self.n_buckets):
            self._flush(j)
        while self.writes:
            self.writes.pop(next(iter(self.writes))).result()

    def _rfd(self) -> int:
        """The descriptor transfers go through: the buffered one once a direct one was refused."""
        return self.bfd if self.bfd >= 0 else self.fd

    def _pwrite(self, view: memoryview, at: int) -> None:
        try:
            try:
                pwrite_all(self._rfd(), view, at, self.path)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                with self._lock:  # refused at the transfer: buffered from now on (the direct
                    if self.bfd < 0:  # descriptor stays open: another writer may be using it)
                        self.bfd = os.open(self.path, os.O_RDWR)
                    self.direct = False
                pwrite_all(self.bfd, view, at, self.path)
        except OSError as e:
            raise os_error(e, "spilling rows of the rank pass", self.path) from e

    # -- out: positions in order ---------------------------------------------------------------------

    def count(self, k: int) -> int:
        """Records bucket ``k`` holds."""
        return min(self.bucket, self.n - k * self.bucket)

    def load(self, k: int) -> None:
        """Make bucket ``k`` the one :meth:`gather` reads (every record must be in): the resident
        buffer, or the bucket's region read back in one sequential read."""
        m = self.count(k)
        if int(self.fill[k]) != m:
            raise AssertionError(f"rank pass: bucket {k} has {int(self.fill[k])} of its {m} records")
        if k != self.loaded:
            if k == 0 and self.held:
                raise AssertionError("rank pass: bucket 0 was held in memory and is gone: gather it first")
            if self.fd >= 0:
                self._drain()  # every staged record out before any region is read
            nbytes = m * self.rec
            span = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
            if self.buf is None or self.buf.numel() < span:
                self.buf = None  # the old one goes first: two never coexist
                raw = aligned_buffer(max(span, self.bucket * self.rec + PAGE_SIZE), populate=True)
                self.buf = torch.from_numpy(raw)
            flat = self.buf.view(-1).numpy()
            at = self.base + k * self.bucket * self.rec
            try:
                got = read_full(self._rfd(), memoryview(flat[:span]), at, self.path)
            except OSError as e:
                raise os_error(e, "reading back a rank-pass bucket", self.path) from e
            if got < nbytes:
                raise os_error(OSError(errno.EIO, "rank-pass bucket read back short"), "reading back", self.path)
            self.loaded = k
            self.order = None
        if self.order is None:
            a = self.arrival[k * self.bucket: k * self.bucket + m]
            self.order = torch.from_numpy(np.argsort(a, kind="stable").astype(np.int64))  # position -> buffer row

    def gather(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Records of positions ``start:stop`` (within one bucket) into ``out`` (uint8
        (stop - start, rec), contiguous rows), in position order."""
        k = start // self.bucket
        assert (stop - 1) // self.bucket == k, "a gather stays inside one bucket"
        self.load(k)
        m = self.count(k)
        src = self.buf.view(-1)[: m * self.rec].view(m, self.rec)
        w = widest_word(src, out)
        torch.index_select(src.view(w), 0, self.order[start - k * self.bucket: stop - k * self.bucket],
                           out=out.view(w))

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True)  # no write left using a buffer or the descriptor
            self.pool = None
        self.buf = self.order = None
        for fd in (self.fd, self.bfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.bfd = -1


def _copy(dst: torch.Tensor, src: torch.Tensor, sel: torch.Tensor | None = None) -> None:
    """``dst[:] = src`` or ``src[sel]`` (uint8 matrices; ``dst`` contiguous) as the widest words both allow."""
    w = widest_word(dst, src)
    if sel is None:
        dst.view(w).copy_(src.view(w))
    else:
        torch.index_select(src.view(w), 0, sel, out=dst.view(w))
