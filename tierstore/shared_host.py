"""A host tier shared by every process on the machine that opens the same store.

One inference worker per GPU must not hold eight copies of a 200 GB table. Each shared
tier is one file in POSIX shared memory (``/dev/shm/tierstore-<digest>``) that every
process maps; the page cache holds it once, so four workers cost one copy (psutil's PSS
splits it between them).

Protocol (no lock on the hot path):

- The tier's content is decided by data every process computes identically: the whole
  table when the budget covers it, else the ``capacity`` hottest rows of the store's
  saved frequency profile (ties broken by row id). The digest in the file name covers
  the store, the table and that row set, so processes with different budgets or
  profiles never share a file by mistake.
- Every process holds a shared ``flock`` on the file while it uses it. One that finds the
  file not READY takes the exclusive lock of a sibling ``.fill`` file, checks again, and
  fills it (rows read through the disk tier, checksums verified), flushes it and sets
  the header's state to READY. Others wait on the fill lock, then see READY and map it.
- After READY the file is immutable: lookups read ``slot_of_row`` and the slab with no
  lock at all. Promotion into the shared tier is not dynamic: placement changes by
  saving a new profile (``tierstore profile --save-profile``) and reopening, which
  yields a new digest. Dynamic caching stays per process, in each device tier.
- A crash never leaves a half-filled tier in use: a filler that dies releases its lock
  (the kernel drops flocks of dead processes) with the state still FILLING, and the next
  opener refills. A crashed reader takes nothing with it; the others keep serving.
- The last process to close removes the file (unless ``keep=True``): it is the one that
  can take the exclusive lock on the data file without blocking.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import CapacityError, CorruptDataError, TierStoreError
from .format import PAGE_SIZE, TableInfo
from .tier import DiskTier

__all__ = ["SharedHostTier", "SHM_DIR"]

SHM_DIR = Path("/dev/shm")
_MAGIC = b"TIERSTORE-SHM\x00\x01\x00"
_HEADER = struct.Struct("<16sIQQQ")  # magic, state, capacity, n_rows, row_bytes
_FILLING, _READY = 0, 1


def _round_page(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


class SharedHostTier:
    """Host tier in shared memory, read-only after it is filled. See the module docstring."""

    shared = True
    index = None  # no per-process policy: placement is static

    def __init__(self, root: Path, info: TableInfo, capacity: int, disk: DiskTier, *,
                 profile: np.ndarray | None, created: str, keep: bool = False, shm_dir: Path = SHM_DIR):
        self.name = "host"
        self.info = info
        self.capacity = min(int(capacity), info.rows)
        self.resident = self.capacity == info.rows
        self.keep = keep
        self.hits = self.misses = 0
        self.resident_hits = 0  # counted by Table's fast path when the tier holds the whole table
        if self.resident:
            rows = None
        else:
            if profile is None:
                raise TierStoreError(
                    f"host_shared=True with a host budget ({self.capacity} rows) smaller than table "
                    f"{info.name!r} ({info.rows} rows) needs a frequency profile to choose the shared hot "
                    "set: run `tierstore profile ... --save-profile`, or raise host_budget to hold the table"
                )
            # the `capacity` hottest rows, ties by row id: identical in every process
            order = np.lexsort((np.arange(info.rows), -np.asarray(profile, dtype=np.int64)))
            rows = np.sort(order[: self.capacity]).astype(np.int64)
        digest = hashlib.sha256()
        digest.update(f"{root.resolve()}|{created}|{info.name}|{info.rows}|{info.row_bytes}|{self.capacity}".encode())
        if rows is not None:
            digest.update(rows.tobytes())
        self.path = Path(shm_dir) / f"tierstore-{digest.hexdigest()[:32]}"
        map_bytes = 0 if self.resident else _round_page(info.rows * 4)
        self._index_off = PAGE_SIZE
        self._slab_off = PAGE_SIZE + map_bytes
        self.nbytes_file = self._slab_off + _round_page(self.capacity * info.row_bytes)

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # "in use" for as long as we are open
            if not self._ready():
                lock = os.open(f"{self.path}.fill", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # one filler at a time; others wait here
                    if not self._ready():  # nobody filled it while we waited
                        self._fill(rows, disk)
                finally:
                    os.close(lock)  # releases the fill lock
            self._map = mmap.mmap(self._fd, self.nbytes_file, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            os.close(self._fd)
            raise
        buf = np.frombuffer(self._map, dtype=np.uint8)
        with warnings.catch_warnings():  # the map is read-only and we never write through it
            warnings.simplefilter("ignore", UserWarning)
            slab = buf[self._slab_off : self._slab_off + self.capacity * info.row_bytes]
            self.slab = torch.from_numpy(slab).view(info.raw_dtype).view(self.capacity, info.dim)
        self.slot_of_row = None if self.resident else \
            buf[self._index_off : self._index_off + info.rows * 4].view(np.int32)

    # -- fill --------------------------------------------------------------------------------
    def _ready(self) -> bool:
        if os.fstat(self._fd).st_size != self.nbytes_file:
            return False
        head = os.pread(self._fd, _HEADER.size, 0)
        magic, state, cap, n_rows, row_bytes = _HEADER.unpack(head)
        if magic != _MAGIC or (cap, n_rows, row_bytes) != (self.capacity, self.info.rows, self.info.row_bytes):
            if state == _READY:
                raise CorruptDataError(f"{self.path}: shared tier header does not match table {self.info.name!r}")
            return False
        return state == _READY

    def _fill(self, rows: np.ndarray | None, disk: DiskTier) -> None:
        info = self.info
        os.ftruncate(self._fd, 0)  # drop whatever a dead filler left
        try:
            os.posix_fallocate(self._fd, 0, self.nbytes_file)  # fail now, not with SIGBUS later
        except OSError as e:
            raise CapacityError(
                f"cannot reserve {self.nbytes_file} bytes of shared memory in {self.path.parent} ({e.strerror}); "
                "lower host_budget or enlarge /dev/shm"
            ) from e
        os.pwrite(self._fd, _HEADER.pack(_MAGIC, _FILLING, self.capacity, info.rows, info.row_bytes), 0)
        m = mmap.mmap(self._fd, self.nbytes_file, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        slot_of_row = None
        try:
            buf = np.frombuffer(m, dtype=np.uint8)
            slab = torch.from_numpy(buf[self._slab_off : self._slab_off + self.capacity * info.row_bytes])
            slab = slab.view(info.raw_dtype).view(self.capacity, info.dim)
            if rows is None:  # the whole table, slot == row
                disk.load_table(slab)
            else:
                slot_of_row = buf[self._index_off : self._index_off + info.rows * 4].view(np.int32)
                slot_of_row[:] = -1
                slot_of_row[rows] = np.arange(len(rows), dtype=np.int32)
                step = max(1, (32 << 20) // max(1, info.row_bytes))
                for s in range(0, len(rows), step):
                    disk.read(rows[s : s + step], slab[s : s + step])
            m.flush()
            del buf, slab, slot_of_row  # drop every view of the map before closing it
        finally:
            m.close()
        os.pwrite(self._fd, _HEADER.pack(_MAGIC, _READY, self.capacity, info.rows, info.row_bytes), 0)
        os.fsync(self._fd)

    # -- lookups -----------------------------------------------------------------------------
    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Slots of ``rows`` (int64), -1 where the shared tier does not hold the row. Lock-free."""
        slots = rows.copy() if self.slot_of_row is None else self.slot_of_row[rows].astype(np.int64)
        hit = int((slots >= 0).sum())
        self.hits += hit  # per-process statistics; a benign race between threads
        self.misses += len(rows) - hit
        return slots

    @property
    def nbytes(self) -> int:
        return self.capacity * self.info.row_bytes

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits + self.resident_hits, "misses": self.misses, "evictions": 0, "insertions": 0, "rows": self.capacity,
                "capacity_rows": self.capacity, "bytes": self.nbytes, "resident": self.resident, "shared": True}

    def reset_stats(self) -> None:
        self.hits = self.misses = self.resident_hits = 0

    def close(self) -> None:
        if self._fd < 0:
            return
        self.slab = None  # type: ignore[assignment]
        self.slot_of_row = None
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view of the slab: the map lives until it drops it
            pass
        try:
            if not self.keep:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only if no other process uses it
                    self.path.unlink(missing_ok=True)
                    Path(f"{self.path}.fill").unlink(missing_ok=True)
                except BlockingIOError:
                    pass
        finally:
            os.close(self._fd)
            self._fd = -1
