"""A table's hot-set snapshot: its profile's ranked rows stored contiguously, hottest first.

Why: a profile's hot rows are scattered over the row file (a table built in checkpoint
order), so loading them at open read a 4 KiB page per row: a 264-byte row cost 15x its
bytes, and open read most of the table. A snapshot holds the same rows packed one after
the other in rank order, so every tier's hot set (the top ``k`` of the one ranking,
``format.profile.hot_rows``) is a *prefix* of it and loads with a few large sequential
reads: open reads ~1.0x the hot bytes whatever the table's size.

File ``STORE/profiles/<table>.hot`` (written by ``tierstore profile --save-profile``,
``tierstore.save_snapshot``)::

    page 0          magic ``TIERSTORE-HOTS\\0\\1``, uint32 length, JSON {format, version,
                    table, rows, dim, dtype, row_bytes, n, id_dtype, build_id, sum_pages,
                    id_pages, row_pages, checksum, profile}, zero padding
    pages 1..S      uint64 mulsum64-v1 checksums (``spec.page_checksums``): entry 0 is the
                    header page's, entry 1 + j data page j's; zero padded
    data pages      ids: the ``n`` ranked row ids (little-endian int32, int64 past 2**31
                    rows), zero padded to a page; then rows: ``n`` x ``row_bytes`` stored
                    bytes (as the row file holds them), packed, zero padded to a page

Data page ``j`` is file page ``1 + S + j``. Snapshot row ``i`` (rank ``i``) is at byte
``(1 + S + id_pages) * 4096 + i * row_bytes``.

A snapshot is a copy of rows the row file holds; it never decides what is served:

- ``build_id`` is the store's (``Manifest.build_id``) when it was written; a store rebuilt
  since (another id) ignores the snapshot and loads from the row file;
- every page read is checked against its checksum; the checksum pages themselves carry
  none (a damaged entry fails its data page's check, which is what matters);
- a damaged or stale snapshot is ignored by open (rows from the row file; ``stats()
  ["open"]`` says why), never an error: the row file is the truth;
- the write is atomic (``files.atomic_write``: a temporary sibling, fsync, rename, fsync
  of the directory): a process killed while writing leaves the old snapshot or the new.

Cost of the write: one sweep of the row file in file order (``serve.snapshot``,
``DiskTier.sweep``: large sequential ``O_DIRECT`` reads of the spans that hold ranked rows,
several windows in flight on two threads, every page checked there), each row gathered once
straight from the read window into the rank pass (``format.rankspill``: in memory up to
256 MiB of rows; else bucket 0 is held in memory and the other buckets are spilled into the
file's own row region by three writer threads and read back once), then the rows in rank
order written in place in 8 MiB pieces from a ring of four, ``O_DIRECT``, each write in
flight while the next piece is gathered. Memory: one bucket (256 MiB) plus the pass's
staging (64 MiB), the sweep's five 16 MiB windows, the output ring (32 MiB), the ids and
their order (~12-16 bytes per snapshot row) and the checksums (8 bytes per 4 KiB written).
It used to fetch the rows through the store's lookup in 1,024-row steps: 26 MB/s.
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptDataError, TierStoreError
from ..files import atomic_write, check_versioned, is_json_int, os_error, pwrite_all, read_full
from .prefetch import aligned_buffer
from .profile import profile_paths
from .rankspill import BUCKET_BYTES, RankSpill
from .writer import fast_page_checksums
from .spec import CHECKSUM_SCHEME, DTYPES, PAGE_SIZE, TableInfo, make_header, page_checksums, read_header

__all__ = ["SNAPSHOT_FORMAT", "SNAPSHOT_VERSION", "SNAPSHOT_MAGIC", "DEFAULT_SNAPSHOT_BYTES", "snapshot_path",
           "SnapshotLayout", "write_snapshot", "read_snapshot", "parse_snapshot_header"]

SNAPSHOT_FORMAT = "tierstore-hotset"
SNAPSHOT_VERSION = 1
SNAPSHOT_MAGIC = b"TIERSTORE-HOTS\x00\x01"
# rows a snapshot holds by default: every profiled row, up to this many bytes per table (a
# 16 GiB host budget over V4.1's two tables is 8 GiB each; more would only cost disk)
DEFAULT_SNAPSHOT_BYTES = 16 << 30
_WORDS = PAGE_SIZE // 8  # checksums per checksum page
OUT_CHUNK_BYTES = 8 << 20  # one write of the rows in rank order
OUT_RING = 4  # ...of which up to this many are gathered or in flight at once


def snapshot_path(store: str | Path, table: str) -> Path:
    """``STORE/profiles/<table>.hot``: beside the table's profile, named as it is."""
    meta = profile_paths(store, table)[1]
    return meta.with_name(meta.name[: -len(".json")] + ".hot")


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE)


@dataclass(frozen=True)
class SnapshotLayout:
    """Where everything is in a snapshot of ``n`` rows of ``row_bytes`` each."""

    n: int
    row_bytes: int
    id_bytes: int  # 4 (int32 ids) or 8 (int64)

    @property
    def id_pages(self) -> int:
        return _pages(self.n * self.id_bytes)

    @property
    def row_pages(self) -> int:
        return _pages(self.n * self.row_bytes)

    @property
    def data_pages(self) -> int:
        return self.id_pages + self.row_pages

    @property
    def sum_pages(self) -> int:
        return _pages((1 + self.data_pages) * 8)

    @property
    def first_data_page(self) -> int:
        """File page of data page 0."""
        return 1 + self.sum_pages

    @property
    def file_bytes(self) -> int:
        return (self.first_data_page + self.data_pages) * PAGE_SIZE

    @property
    def rows_offset(self) -> int:
        """File byte where snapshot row 0 starts."""
        return (self.first_data_page + self.id_pages) * PAGE_SIZE

    def sum_index(self, file_pages: np.ndarray) -> np.ndarray:
        """Index into the checksum array of each data or header page (file page numbers)."""
        p = np.asarray(file_pages, dtype=np.int64)
        return np.where(p == 0, 0, p - self.sum_pages)

    def id_file_pages(self, k: int) -> np.ndarray:
        """File pages holding ids ``[0, k)``."""
        return self.first_data_page + np.arange(_pages(min(k, self.n) * self.id_bytes), dtype=np.int64)

    def sum_file_pages(self, file_pages: np.ndarray) -> np.ndarray:
        """Checksum pages (file page numbers, sorted unique) holding the entries of ``file_pages``."""
        return 1 + np.unique(self.sum_index(file_pages) // _WORDS)


def _head(info: TableInfo, layout: SnapshotLayout, build_id: str, profile: dict[str, Any]) -> dict[str, Any]:
    return {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "table": info.name, "rows": info.rows,
            "dim": info.dim, "dtype": info.dtype, "row_bytes": info.row_bytes, "n": layout.n,
            "id_dtype": "int32" if layout.id_bytes == 4 else "int64", "build_id": build_id,
            "sum_pages": layout.sum_pages, "id_pages": layout.id_pages, "row_pages": layout.row_pages,
            "checksum": CHECKSUM_SCHEME, "profile": profile}


def parse_snapshot_header(page: bytes | np.ndarray, where: str) -> tuple[dict[str, Any], SnapshotLayout]:
    """The header of a snapshot and its layout, every field checked (``CorruptDataError``,
    ``FormatVersionError`` for another version). Says nothing of the table or build: the
    caller compares (``TableSnapshot.matches`` in tiers/hotset.py)."""
    head = check_versioned(read_header(page, SNAPSHOT_MAGIC, where, "hot-set snapshot"), fmt=SNAPSHOT_FORMAT,
                           version=SNAPSHOT_VERSION, where=where,
                           fix="save the profile again (`tierstore profile --save-profile`)")
    for key in ("rows", "dim", "row_bytes", "n", "sum_pages", "id_pages", "row_pages"):
        if not is_json_int(head.get(key)) or head[key] < 0:
            raise CorruptDataError(f"{where}: snapshot header has {key}={head.get(key)!r}")
    if head.get("id_dtype") not in ("int32", "int64") or head.get("checksum") != CHECKSUM_SCHEME \
            or head.get("dtype") not in DTYPES or not isinstance(head.get("build_id"), str):
        raise CorruptDataError(f"{where}: snapshot header is malformed (id_dtype, dtype, checksum, build_id)")
    layout = SnapshotLayout(head["n"], head["row_bytes"], 4 if head["id_dtype"] == "int32" else 8)
    if (layout.sum_pages, layout.id_pages, layout.row_pages) != (head["sum_pages"], head["id_pages"],
                                                                 head["row_pages"]):
        raise CorruptDataError(f"{where}: snapshot header's page counts do not match its n and row_bytes")
    return head, layout


def write_snapshot(path: str | Path, info: TableInfo, build_id: str, ids: np.ndarray,
                   fetch: Callable[[np.ndarray], np.ndarray] | None = None, *, chunk_bytes: int = 32 << 20,
                   profile: dict[str, Any] | None = None,
                   sweep: Callable[[np.ndarray], Iterable[tuple[np.ndarray, torch.Tensor, torch.Tensor | None]]]
                   | None = None,
                   memory: int = BUCKET_BYTES, bucket_bytes: int = BUCKET_BYTES) -> dict[str, Any]:
    """Write the snapshot of ``ids`` (ranked row ids, hottest first) of table ``info`` to
    ``path`` atomically; returns its header.

    The rows come from ``sweep(ids)`` (the store's: ``serve.snapshot``), which yields
    ``(index, rows, sel)`` batches in whatever order it reads them (file order): ``index``
    into ``ids`` and those rows' stored bytes, ``rows[sel]`` (or ``rows`` when ``sel`` is
    None), uint8 (len, row_bytes) tensors valid until the next batch; every index once. Or from
    ``fetch(ids_chunk)`` (the stored bytes of those rows), called with the ids in ascending
    order, at most ``chunk_bytes`` of rows at a time. The rows are put in rank order by one
    rank pass (:class:`tierstore.format.rankspill.RankSpill`): held in memory when they fit
    ``memory`` bytes, else spilled into their own region of the file in buckets of
    ``bucket_bytes`` and read back a bucket at a time (every row written twice, read back
    once). ``profile``: what the snapshot was made from (kept in the header for ``inspect``).
    Raises ``CapacityError`` on a full disk, ``StoreIOError``."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or (ids.size and (ids.min() < 0 or ids.max() >= info.rows)):
        raise TierStoreError(f"snapshot ids must be 1-D row ids of table {info.name!r} (0 <= id < {info.rows})")
    if (fetch is None) == (sweep is None):
        raise TierStoreError("write_snapshot needs exactly one source of rows: fetch or sweep")
    layout = SnapshotLayout(int(ids.size), info.row_bytes, 4 if info.rows < 2**31 else 8)
    head = _head(info, layout, build_id, dict(profile or {}))
    header = make_header(SNAPSHOT_MAGIC, head, "snapshot")
    t0 = time.perf_counter()
    n, rb = layout.n, info.row_bytes
    if sweep is None:
        assert fetch is not None
        sweep = _fetched(fetch, max(1, chunk_bytes // max(1, rb)))

    def write(f: Any) -> None:
        fd = f.fileno()
        sums = np.zeros(layout.sum_pages * _WORDS, dtype=np.uint64)
        sums[0] = page_checksums(np.frombuffer(header, dtype=np.uint8))[0]
        raw_ids = np.ascontiguousarray(ids, dtype="<i4" if layout.id_bytes == 4 else "<i8").view(np.uint8)
        id_pages = np.concatenate([raw_ids, np.zeros(-len(raw_ids) % PAGE_SIZE, np.uint8)])
        sums[1: 1 + layout.id_pages] = fast_page_checksums(id_pages)
        pwrite_all(fd, memoryview(id_pages), layout.first_data_page * PAGE_SIZE, path)
        del id_pages
        f.flush()
        # bucket 0, gathered first, never goes through the file (one bucket less written and read)
        spill = RankSpill(f.name, layout.rows_offset, n, rb, memory=memory, bucket_bytes=bucket_bytes,
                          hold_first=True)
        try:
            seen = 0
            for idx, rows, sel in sweep(ids):  # pass 1: the rows as the source reads them, each to its rank
                got = (len(idx), rb) if sel is None else (len(sel), rows.shape[1])
                if tuple(rows.shape[1:]) != (rb,) or got != (len(idx), rb):
                    raise TierStoreError(f"snapshot rows came as {got}, expected ({len(idx)}, {rb})")
                spill.add(np.asarray(idx, dtype=np.int64), rows, sel)  # gathered straight from the source's buffer
                seen += len(idx)
            if seen != n:
                raise TierStoreError(f"snapshot source gave {seen} rows for {n} ids")
            _write_ranked(spill, layout, sums, fd, f.name, path)
        finally:
            spill.close()
        pwrite_all(fd, memoryview(sums.view(np.uint8)), PAGE_SIZE, path)
        pwrite_all(fd, header, 0, path)

    try:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, "creating the profiles directory", Path(path).parent) from e
    atomic_write(path, write)
    return {**head, "bytes": layout.file_bytes, "seconds": time.perf_counter() - t0}


def _write_ranked(spill: RankSpill, layout: SnapshotLayout, sums: np.ndarray, fd: int, tmp: str, path: Path
                  ) -> None:
    """Pass 2: the rows in rank order, gathered from the rank pass in ``OUT_CHUNK_BYTES``
    pieces into a ring of ``OUT_RING`` page-aligned buffers, each checksummed and handed to a
    writer thread (``O_DIRECT`` where the filesystem takes it), so the writes stay in flight
    while the next piece is gathered and the next bucket read back. Memory: the ring, not a
    bucket's worth of output. ``fd``: the file being written (``tmp``), ``path`` for messages."""
    n, rb = layout.n, layout.row_bytes
    if n == 0:
        return
    unit = PAGE_SIZE // math.gcd(rb, PAGE_SIZE)  # rows per whole number of pages: every piece starts on a page
    step = max(unit, OUT_CHUNK_BYTES // (unit * rb) * unit)
    ring = [aligned_buffer(_pages(step * rb) * PAGE_SIZE) for _ in range(min(OUT_RING, -(-n // step)))]
    pending: list[Future[None] | None] = [None] * len(ring)
    dfd, direct = -1, False
    if hasattr(os, "O_DIRECT"):
        try:
            dfd, direct = os.open(tmp, os.O_WRONLY | os.O_DIRECT), True
        except OSError:
            dfd = -1  # buffered through the file's own descriptor

    def put(view: memoryview, at: int) -> None:
        nonlocal direct
        try:
            if direct:
                pwrite_all(dfd, view, at, path)
                return
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            direct = False  # refused at the transfer: buffered from now on
        pwrite_all(fd, view, at, path)

    pool = ThreadPoolExecutor(1, thread_name_prefix="tierstore-snapwrite")
    try:
        j = 0
        for k in range(spill.n_buckets):
            b0, m = k * spill.bucket, spill.count(k)
            for s in range(0, m, step):
                c = min(step, m - s)
                slot = j % len(ring)
                j += 1
                if pending[slot] is not None:
                    pending[slot].result()  # that buffer's write is done (or its error raised here)
                out = ring[slot]
                nbytes, span = c * rb, _pages(c * rb) * PAGE_SIZE
                out[nbytes:span] = 0  # the last piece's page tail
                spill.gather(b0 + s, b0 + s + c, torch.from_numpy(out[:nbytes].reshape(c, rb)))
                first = 1 + layout.id_pages + (b0 + s) * rb // PAGE_SIZE  # its first checksum entry
                sums[first: first + span // PAGE_SIZE] = fast_page_checksums(out[:span])
                pending[slot] = pool.submit(put, memoryview(out[:span]), layout.rows_offset + (b0 + s) * rb)
        for p in pending:
            if p is not None:
                p.result()
    finally:
        pool.shutdown(wait=True)  # no write left using a buffer
        if dfd >= 0:
            os.close(dfd)


def _fetched(fetch: Callable[[np.ndarray], np.ndarray], step: int
             ) -> Callable[[np.ndarray], Iterator[tuple[np.ndarray, torch.Tensor, None]]]:
    """A ``sweep`` over ``fetch``: the ids in ascending order, ``step`` at a time."""
    def sweep(ids: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor, None]]:
        by_id = np.argsort(ids, kind="stable")
        for s in range(0, len(ids), step):
            idx = by_id[s: s + step]
            yield idx, torch.from_numpy(np.ascontiguousarray(fetch(ids[idx]), dtype=np.uint8)), None
    return sweep


def read_snapshot(path: str | Path, k: int | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(header, ids, rows) of the first ``k`` snapshot rows (all when None), every page read
    checked (``CorruptDataError``): a plain buffered reader for tools and tests. Open reads
    snapshots through ``tiers.hotset.TableSnapshot`` (O_DIRECT, only what the tiers need)."""
    path = Path(path)
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise os_error(e, "opening the snapshot", path) from e
    try:
        def pages(first: int, count: int) -> np.ndarray:
            buf = np.empty(count * PAGE_SIZE, dtype=np.uint8)
            if count and read_full(fd, memoryview(buf), first * PAGE_SIZE, path) != len(buf):
                raise CorruptDataError(f"{where}: snapshot is truncated (pages {first}..{first + count})")
            return buf.reshape(count, PAGE_SIZE)

        head, layout = parse_snapshot_header(pages(0, 1)[0], where)
        k = layout.n if k is None else max(0, min(int(k), layout.n))
        sums = pages(1, layout.sum_pages).reshape(-1).view("<u8")
        ids_raw = pages(layout.first_data_page, _pages(k * layout.id_bytes))
        rows_raw = pages(layout.first_data_page + layout.id_pages, _pages(k * layout.row_bytes))
        for first, buf in ((0, pages(0, 1)), (layout.first_data_page, ids_raw),
                           (layout.first_data_page + layout.id_pages, rows_raw)):
            bad = np.flatnonzero(page_checksums(buf) != sums[layout.sum_index(first + np.arange(len(buf)))])
            if len(bad):
                raise CorruptDataError(f"{where}: snapshot page {first + int(bad[0])} fails its checksum; "
                                       "save the profile again (`tierstore profile --save-profile`)")
        ids = ids_raw.reshape(-1)[: k * layout.id_bytes].view("<i4" if layout.id_bytes == 4 else "<i8")
        rows = rows_raw.reshape(-1)[: k * layout.row_bytes].reshape(k, layout.row_bytes)
        return head, ids.astype(np.int64), rows
    finally:
        os.close(fd)
