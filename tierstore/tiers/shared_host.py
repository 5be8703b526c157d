"""A host tier shared by every process on the machine that opens the same store.

One inference worker per GPU must not hold eight copies of a 200 GB table. Each shared
tier is one file in POSIX shared memory (``/dev/shm/tierstore-<digest>``) that every
process maps; the page cache holds it once, so four workers cost one copy (psutil's PSS
splits it between them).

Protocol (no lock on the hot path):

- The tier's content is decided by data every process computes identically: the whole
  table when the budget covers it, else the ``capacity`` hottest rows of the store's
  saved frequency profile (ties broken by row id). The file is named
  ``tierstore-<store key>-<content key>``: the store key hashes the store's path and the
  table; the content key hashes the store's *build id* (a fresh random id written into
  the manifest by every build, never a clock), the table's shape and that row set. A
  rebuild (even within the same second) or another budget or profile therefore never
  maps an old segment.
- Segments of the same store and table with another content key that no process holds
  (a rebuild happened, or every user was SIGKILLed) are removed by the next open, and
  ``stale_segments`` / ``tierstore gc`` find them machine-wide.
- Every process holds a shared ``flock`` on the file while it uses it. One that finds the
  file not READY takes the exclusive lock of a sibling ``.fill`` file, checks again, and
  fills it (rows read through the disk tier, checksums verified), flushes it and sets
  the header's state to READY. Others wait on the fill lock, then see READY and map it.
- Waits are bounded. The filler writes its pid and a progress count (one step per GiB of
  shared memory reserved and per 32-64 MiB of rows written) into the ``.fill`` file; a
  waiter polls the lock (``LOCK_NB`` every 50 ms) and gives up when the filler has made
  no progress for ``timeout`` seconds (the store's ``timeout``): it raises
  ``LookupTimeoutError`` naming the segment, the filler's pid and state (e.g. "stopped")
  and the fix (resume or kill that process; the next open refills). A slow but live fill
  of a large table is waited for as long as it progresses. A filler that *died* releases
  the lock at once and the waiter fills the tier itself. Why raise rather than serve without the shared tier: the
  fallback would silently give every waiting worker a private copy of what may be a
  hundred GB (the memory ``host_shared`` exists to save) and hide the stuck process.
- After READY the file is immutable: lookups read the row map (a hash table of the
  ``capacity`` rows, tierstore.cache.rowmap, built by the filler) and the slab with no
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
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import faults
from ..cache import CacheIndex
from ..cache.layout import CACHED, RESIDENT
from ..cache.rowmap import EMPTY, buckets, rm_build
from ..errors import CapacityError, CorruptDataError, LookupTimeoutError, TierStoreError
from ..files import os_error, pwrite_all
from ..format.profile import Profile, as_profile, hot_rows
from ..format.spec import PAGE_SIZE, TableInfo
from .base import Tier
from .disk import DiskTier
from .hotset import TableSnapshot, load_slots
from .slab import SlabTier

__all__ = ["SharedHostTier", "SHM_DIR", "stale_segments", "remove_segment", "segment_prefix"]

SHM_DIR = Path("/dev/shm")
_MAGIC = b"TIERSTORE-SHM\x00\x01\x00"
_HEADER = struct.Struct("<16sIQQQ")  # magic, state, capacity, n_rows, row_bytes
_FILLING, _READY = 0, 1
_PREFIX = "tierstore-"
_FILL_RECORD = struct.Struct("<qQ")  # in the .fill file: the filler's pid, its progress count
_POLL_S = 0.05  # how often a waiter retries a lock another process holds
_ALLOC_STEP = 1 << 30  # shared memory is reserved in steps of this many bytes, each one progress


def _process_state(pid: int) -> str:
    """A few words on process ``pid`` from /proc (for an error message), or "state unknown"."""
    try:
        code = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "state unknown"
    return {"T": "stopped (SIGSTOP or SIGTSTP)", "t": "stopped by a debugger", "D": "blocked in I/O",
            "Z": "a zombie", "R": "running", "S": "sleeping"}.get(code, f"state {code}")


def _unused(path: Path) -> bool:
    """True when no process holds the segment (its users keep a shared flock on it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's lock


def segment_prefix(root: Path, table: str) -> str:
    """File-name prefix of every shared host tier of ``table`` in the store at ``root``."""
    return f"{_PREFIX}{hashlib.sha256(f'{Path(root).resolve()}|{table}'.encode()).hexdigest()[:16]}-"


def stale_segments(shm_dir: Path = SHM_DIR, *, prefix: str = _PREFIX) -> list[Path]:
    """Shared host tiers in ``shm_dir`` that no process uses (left by processes that were
    all killed, or by a build that was since replaced). Safe to remove."""
    if not Path(shm_dir).is_dir():
        return []
    return sorted(p for p in Path(shm_dir).glob(f"{prefix}*")
                  if not p.name.endswith(".fill") and p.is_file() and _unused(p))


def remove_segment(path: Path) -> None:
    """Remove a shared host tier file and its fill lock (no error if already gone)."""
    path.unlink(missing_ok=True)
    Path(f"{path}.fill").unlink(missing_ok=True)


def _round_page(n: int) -> int:
    return (n + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


class _SlabWriter:
    """What ``load_slots`` uses of a tier, over the shared slab while it is filled."""

    def __init__(self, info: TableInfo, slab: torch.Tensor):
        self.info, self.slab, self.device = info, slab, torch.device("cpu")

    def write(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        self.slab.index_copy_(0, torch.from_numpy(slots), rows)


class SharedHostTier(SlabTier):
    """Host tier in shared memory, read-only after it is filled. See the module docstring."""

    arrives_filled = True  # filled (or mapped filled) by the constructor

    def __init__(self, root: Path, info: TableInfo, capacity: int, disk: DiskTier, *,
                 profile: Profile | None, build_id: str, keep: bool = False, shm_dir: Path = SHM_DIR,
                 pin: bool = False, zero_copy: bool = False, zero_copy_device: torch.device | None = None,
                 timeout: float = 60.0, snapshot: TableSnapshot | None = None):
        """snapshot: the table's hot-set snapshot, which a process that fills the tier reads
        its rows from (``open_stats`` says what it loaded; a process that maps a filled tier
        loads nothing). pin (the store runs on CUDA): register this process's read-only map of the slab
        with CUDA, so copies from it are DMA from pinned memory; zero_copy: the GPU on
        ``zero_copy_device`` reads its rows directly (SlabTier.gather_to_device). Both never
        run: need CUDA. timeout: seconds to wait for another process's fill (or close) of
        this segment while it makes no progress; then ``LookupTimeoutError`` (module doc)."""
        super().__init__("host", info, capacity, torch.device("cpu"))
        self.timeout = timeout
        self.resident = self.capacity == info.rows  # (an empty table too: nothing to choose)
        self.kind = RESIDENT if self.resident else CACHED  # CACHED: a read-only "static" index
        self.keep = keep
        self._imap = None
        if self.resident:
            rows = None
        else:
            if profile is None:
                raise TierStoreError(
                    f"host_shared=True with a host budget ({self.capacity} rows) smaller than table "
                    f"{info.name!r} ({info.rows} rows) needs a frequency profile to choose the shared hot "
                    "set: run `tierstore profile ... --save-profile`, or raise host_budget to hold the table"
                )
            # the `capacity` hottest rows (profile.hot_rows: ties by row id, never-read rows
            # last to fill the tier): identical in every process
            rows = np.sort(hot_rows(as_profile(profile, info.rows), self.capacity, fill=True))
        # "rowmap-hash3": the index region's layout (a dense int32 array per table row before
        # "rowmap-hash"; power-of-two buckets before "rowmap-hash2"; 2 x capacity buckets
        # before "rowmap-hash3", 1.25 x now): a segment of another layout is never mapped
        content = hashlib.sha256(f"rowmap-hash3|{build_id}|{info.rows}|{info.row_bytes}|{self.capacity}".encode())
        if rows is not None:
            content.update(rows.tobytes())
        prefix = segment_prefix(root, info.name)
        self.path = Path(shm_dir) / f"{prefix}{content.hexdigest()[:32]}"
        for stale in stale_segments(shm_dir, prefix=prefix):  # earlier builds', nobody uses them
            if stale != self.path:
                remove_segment(stale)
        self._buckets = 0 if self.resident else buckets(self.capacity)
        map_bytes = _round_page(self._buckets * 8)
        self._index_off = PAGE_SIZE
        self._slab_off = PAGE_SIZE + map_bytes
        self.nbytes_file = self._slab_off + _round_page(self.capacity * info.row_bytes)

        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:  # e.g. EACCES: another user's processes hold this store's shared tier
            raise os_error(e, "opening the shared host tier (shared tiers are per user: one user's "
                              "processes cannot map another's; run the workers as one user or use host_shared=False)",
                           self.path) from e
        try:
            self._wait_lock(self._fd, fcntl.LOCK_SH, None)  # "in use" for as long as we are open
            if not self._ready():
                lock = os.open(f"{self.path}.fill", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    self._wait_lock(lock, fcntl.LOCK_EX, lock)  # one filler at a time; others wait here
                    if not self._ready():  # nobody filled it while we waited
                        self._fill(rows, disk, lock, snapshot)
                finally:
                    os.close(lock)  # releases the fill lock
            self._map = mmap.mmap(self._fd, self.nbytes_file, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:  # e.g. the fill failed: a half-filled segment nobody uses must go
            self._map = None
            self.keep = False
            self.close()
            raise
        buf = np.frombuffer(self._map, dtype=np.uint8)
        with warnings.catch_warnings():  # the map is read-only and we never write through it
            warnings.simplefilter("ignore", UserWarning)
            slab = buf[self._slab_off : self._slab_off + self.capacity * info.row_bytes]
            self.slab = torch.from_numpy(slab).view(info.raw_dtype).view(self.capacity, info.dim)
        self.row_map = None
        if not self.resident:
            # The row -> slot map, mapped writable (the compiled walk takes one array type) but
            # never written: its policy is "static", which neither admits nor evicts.
            self._imap = mmap.mmap(self._fd, map_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                   offset=self._index_off)
            self.row_map = np.frombuffer(self._imap, dtype=np.int64, count=self._buckets)
            # per process: a read-only "static" index over the shared map
            self.index = CacheIndex(info.rows, self.capacity, "static", pinned_rows=np.empty(0, np.int64),
                                    row_map=self.row_map)
            self.index.row_of_slot[: len(rows)] = rows  # slot s holds rows[s]: the device tier loads from here
        if pin:  # never run: needs CUDA
            try:
                self.pin(read_only=True, zero_copy=zero_copy, device=zero_copy_device)
            except BaseException:
                self.close()
                raise

    # -- fill --------------------------------------------------------------------------------
    def _wait_lock(self, fd: int, op: int, fill_fd: int | None) -> None:
        """Take flock ``op`` on ``fd``, polling while another process holds it. The wait ends
        with ``LookupTimeoutError`` once the holder has made no progress for ``self.timeout``
        seconds: progress is a change of the record in the ``.fill`` file (``fill_fd``: we
        wait for a filler), else none is known (we wait for a closer or ``gc``, which hold
        the data file's exclusive lock for an instant)."""
        record, since = None, time.monotonic()
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            seen = os.pread(fill_fd, _FILL_RECORD.size, 0) if fill_fd is not None else None
            if seen != record:
                record, since = seen, now
            elif now - since >= self.timeout:
                raise self._stuck(record)
            time.sleep(_POLL_S)

    def _stuck(self, record: bytes | None) -> LookupTimeoutError:
        if record is not None and len(record) == _FILL_RECORD.size:
            pid, done = _FILL_RECORD.unpack(record)
            return LookupTimeoutError(
                f"{self.path}: the shared host tier of table {self.info.name!r} is being filled by process "
                f"{pid} (state: {_process_state(pid)}), which has made no progress for timeout={self.timeout}s "
                f"(after {done} fill steps); resume it (kill -CONT {pid}) or end it (kill {pid}: the next "
                "open refills the tier), or open with a larger timeout= or host_shared=False")
        return LookupTimeoutError(
            f"{self.path}: another process held the shared host tier of table {self.info.name!r} "
            f"{'exclusively (closing or removing it)' if record is None else 'for its fill'} for "
            f"timeout={self.timeout}s; find it with `fuser {self.path}{'' if record is None else '.fill'}` and "
            "resume or end it, or open with a larger timeout= or host_shared=False")

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

    def _fill(self, rows: np.ndarray | None, disk: DiskTier, fill_fd: int,
              snapshot: TableSnapshot | None) -> None:
        info = self.info
        done = 0

        def progress(steps: int) -> None:  # tell the waiters we are alive: a 16-byte write per step
            nonlocal done
            done += steps
            try:  # best effort (no fault point): a waiter that sees no progress times out, never hangs
                os.pwrite(fill_fd, _FILL_RECORD.pack(os.getpid(), done), 0)
            except OSError:
                pass

        progress(0)
        try:
            os.ftruncate(self._fd, 0)  # drop whatever a dead filler left
            for off in range(0, self.nbytes_file, _ALLOC_STEP):  # fail now, not with SIGBUS later
                os.posix_fallocate(self._fd, off, min(_ALLOC_STEP, self.nbytes_file - off))
                progress(1)
        except OSError as e:
            raise CapacityError(
                f"cannot reserve {self.nbytes_file} bytes of shared memory in {self.path.parent} ({e.strerror}); "
                "lower host_budget or enlarge /dev/shm"
            ) from e
        self._write_header(_FILLING)
        # The writable map is never closed explicitly: mmap.close() raises BufferError while
        # any view (here, or in a traceback if a read fails) still exists; it is unmapped
        # with its last view.
        m = mmap.mmap(self._fd, self.nbytes_file, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        buf = np.frombuffer(m, dtype=np.uint8)
        slab = torch.from_numpy(buf[self._slab_off : self._slab_off + self.capacity * info.row_bytes])
        slab = slab.view(info.raw_dtype).view(self.capacity, info.dim)
        if rows is None:  # the whole table, slot == row
            disk.load_table(slab, progress=lambda _: progress(1))
        else:
            row_map = buf[self._index_off : self._index_off + self._buckets * 8].view(np.int64)
            row_map[:] = EMPTY
            rm_build(row_map, rows, np.arange(len(rows), dtype=np.int64))
            # from the hot-set snapshot where it holds them, else the row file (tiers.hotset); a
            # progress record per load step tells the waiters this filler is alive
            self.open_stats = load_slots(_SlabWriter(info, slab), np.arange(len(rows)), rows, disk=disk,
                                         snapshot=snapshot, progress=lambda: progress(1))
            del row_map
        m.flush()
        del buf, slab, m
        try:
            faults.point("fsync", self.path)
            os.fsync(self._fd)
        except OSError as e:
            raise os_error(e, "flushing the shared host tier", self.path) from e
        self._write_header(_READY)

    def _write_header(self, state: int) -> None:
        head = _HEADER.pack(_MAGIC, state, self.capacity, self.info.rows, self.info.row_bytes)
        try:
            pwrite_all(self._fd, head, 0, self.path)
        except OSError as e:
            raise os_error(e, "writing the shared host tier's header", self.path) from e

    # -- the tier protocol (gather: SlabTier's) -------------------------------------------------
    def write(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        raise TierStoreError(f"{self.path}: the shared host tier is read-only after its fill "
                             "(its static index never admits a row)")

    def preload(self, disk: DiskTier, source: Tier | None = None, snapshot: object = None) -> None:
        """Nothing to load: filled once, at construction, by whichever process opened it first."""

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "rows": self.capacity, "shared": True}

    def close(self) -> None:
        if self._fd < 0:
            return
        super().close()  # unregister the pinned map (CUDA) before our references to it go
        # Drop our references and let the map go with its last view: closing it explicitly
        # raises BufferError while any tensor or array (a caller's, a traceback's) still
        # points into it. The file itself stays valid until every map of it is gone.
        self.slab = None  # type: ignore[assignment]
        self.row_map = None
        self.index = None
        self._map = self._imap = None
        try:
            if not self.keep:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only if no other process uses it
                    remove_segment(self.path)
                except BlockingIOError:
                    pass
        finally:
            os.close(self._fd)
            self._fd = -1
