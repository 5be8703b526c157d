"""Loading a cache tier's placed rows at open, from the cheapest place that holds them.

A cache tier whose policy places rows at construction (``static``'s hot set, ``default``'s
ranked core) must hold their bytes before the first lookup. Each placed row comes from:

1. the tier above's source (the host slab, for the device tier): on CUDA both tiers place a
   prefix of the one ranking (``format.profile.hot_rows``), so the device tier's rows are
   nearly all in the host slab already: a memory copy, no I/O. A CPU store opened with
   ``exclusive=True`` (``StoreOptions.exclusive``) places the host tier's ranks after the
   device tier's, so both read their own run of the snapshot (step 2);
2. the table's hot-set snapshot (``format.snapshot``, ``STORE/profiles/<table>.hot``): the
   ranked rows packed in rank order, so a prefix of it is read with large sequential reads
   (the POSIX ``PageReader``: O_DIRECT + native AIO where the filesystem allows, else
   buffered with ``posix_fadvise``), every page checked against its checksum;
3. the row file, for what is left (no snapshot, a stale one, rows past its end): pages in
   *file* order (a hot-ordered store's positions, ``DiskTier.pos``), a bounded step at a time.

Before snapshots, step 3 did everything, in row-id order: a scattered hot set read a 4 KiB
page per row (15x the bytes of a 264-byte row; open read most of the table), and the
device tier read its rows from disk again (~26% of open's bytes).

Speed (the usual case: the host tier's placed rows are the snapshot's prefix in slot order):
the prefix is read with O_DIRECT straight into the host slab, ``READS_AHEAD`` steps of
``PRELOAD_BYTES`` in flight on reader threads while this thread checks the step that
arrived; the slab's pages were faulted in beforehand by ``cache.Prefault`` while the index
was built (faulting them inside the reads cost ~0.5 s of CPU per 792 MB and paced the load
on a loaded 2-core machine); the device tier's rows, a run of the host slab's slots, are
copied as slices. ``benchmarks/bench_warm.py --vs-dd`` measures the load against ``dd
iflag=direct`` of the snapshot. With ``warm="open"`` and a policy that places the snapshot's
own ranking in slot order (``static``, ``default``; exclusive tiers: from the device tier's
end on), that read starts when the host slab is allocated, on a thread of its own, while the
index is built (``tiers.early.EarlyLoad``): the two
used to run one after the other (at 12 GiB / 4 GiB host, 3.6 s of load after ~4 s of index).
The device tier's rows, the first of those ranks, are copied from the host slab by another
thread as each step is checked (``tiers.early.EarlyCopy``), instead of after both builds and the
host load; with exclusive tiers the host slab does not hold them, and the device tier reads its
own run of the snapshot after its build.

``OpenStats`` records, per tier, rows loaded from each source, bytes read and seconds: the
``stats()["open"]`` of the store.

Memory: the snapshot's ids prefix (4 bytes per placed row), its checksum entries (8 bytes
per 4 KiB of it) and one step's pages (``PRELOAD_BYTES``): all sized by the budget.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..cache.layout import CACHED, RESIDENT
from ..errors import CorruptDataError, FormatVersionError, StoreIOError, TierStoreError
from ..format.snapshot import parse_snapshot_header, snapshot_path
from ..format.spec import PAGE_SIZE, TableInfo, page_checksums
from ..format.writer import fast_page_checksums
from ..ranking import TopProfile
from .page_reader import PageReader, aligned_empty

if TYPE_CHECKING:
    from .base import Tier
    from .disk import DiskTier

__all__ = ["TableSnapshot", "OpenStats", "load_slots", "placed_run", "placed_slots", "host_slots", "on_device",
           "run_start", "PRELOAD_BYTES", "READS_AHEAD"]

# bytes of rows per load step at open: the staging, not the whole hot set (a host tier of
# 8 GiB would otherwise need 8 GiB more while it loads)
PRELOAD_BYTES = 64 << 20
# snapshot steps being read while this thread checks the one before (TableSnapshot.read_into)
READS_AHEAD = 2


@dataclass
class OpenStats:
    """What one tier loaded at open, and from where (``stats()["open"]``)."""

    rows_loaded: int = 0
    from_source: int = 0  # copied from the tier above's slab (the host slab, for the device tier)
    from_snapshot: int = 0
    from_rows: int = 0  # read from the row file
    bytes_read: int = 0  # snapshot + row file bytes read for this tier
    seconds: float = 0.0
    snapshot_error: str = ""  # a snapshot page failed its check: the rest came from the row file
    # warm="background" (tiers.warm): the rows above are what the loader has loaded so far
    mode: str = "open"  # "open": loaded before open returned; "background": by the store's loader thread
    placed: int = 0  # rows the policy placed (background; for "open", rows_loaded)
    pending: int = 0  # placed slots still waiting for their bytes (served from below meanwhile)
    on_demand: int = 0  # pending slots a lookup filled before the loader reached them
    loading: int = 0  # 1 while the loader still works on this tier
    loader_error: str = ""  # the row file failed under the loader: the rest loads on demand

    @property
    def source(self) -> str:
        """Where its rows came from: "host", "snapshot", "rows", joined by "+" if several; "none"."""
        parts = [name for name, n in (("host", self.from_source), ("snapshot", self.from_snapshot),
                                      ("rows", self.from_rows)) if n]
        return "+".join(parts) or "none"

    def as_dict(self) -> dict[str, float | str]:
        """The fields, ``source``, and ``warm``: the fraction of the placed rows in place (1.0
        when every placed row is, or none was placed)."""
        d = {**asdict(self), "source": self.source}
        if self.mode == "open":
            d["placed"] = self.rows_loaded
        d["warm"] = 1.0 - self.pending / d["placed"] if d["placed"] else 1.0
        return d


class TableSnapshot:
    """A table's snapshot opened for loading at open; ``open`` returns None (and a reason)
    when there is none or it cannot be used. Not thread-safe (open runs in one thread)."""

    def __init__(self, path: Path, info: TableInfo, build_id: str, *, direct: bool | None = None):
        self.path = path
        self.reader = PageReader(path, direct=direct, threads=2)
        try:
            self.bytes_read = 0
            self.claimed = 0  # bytes_read already counted in a tier's OpenStats
            self.read_calls = 0  # read_into's reads (one per PRELOAD_BYTES step): what the tests count
            self.dropped = False  # a page failed its check: no more loads from it
            self.why = ""  # what failed
            page0 = self._pages(np.zeros(1, np.int64))
            self.head, self.layout = parse_snapshot_header(page0[0], str(path))
            lay = self.layout
            if self.reader.n_pages < lay.first_data_page + lay.data_pages:
                raise CorruptDataError(f"{path}: snapshot is truncated ({self.reader.n_pages} pages, its header "
                                       f"says {lay.first_data_page + lay.data_pages})")
            want = {"table": info.name, "rows": info.rows, "dim": info.dim, "dtype": info.dtype,
                    "row_bytes": info.row_bytes}
            for key, value in want.items():
                if self.head.get(key) != value:
                    raise CorruptDataError(f"{path}: snapshot says {key}={self.head.get(key)!r}, the table "
                                           f"{value!r}: it is not this table's")
            if self.head["build_id"] != build_id:
                raise _Stale(f"{path}: snapshot of build {self.head['build_id']!r}, the store is build "
                             f"{build_id!r} (rebuilt since): save the profile again to rewrite it")
            self._sums = np.zeros(0, np.uint64)  # checksum entries read so far (a prefix)
            self._verify(np.zeros(1, np.int64), page0)
            self.ids = np.zeros(0, np.int64)  # ranked ids read so far (a prefix)
            self._sorted: tuple[np.ndarray, np.ndarray] | None = None
        except BaseException:
            self.reader.close()
            raise

    @classmethod
    def open(cls, root: Path, info: TableInfo, build_id: str, *, direct: bool | None = None
             ) -> tuple[TableSnapshot | None, str]:
        """(the snapshot, "ok"), or (None, why not): "none" when there is no snapshot; a
        stale, damaged or unreadable one is ignored, the reason returned (``stats()["open"]``)."""
        path = snapshot_path(root, info.name)
        if not path.is_file():
            return None, "none"
        try:
            return cls(path, info, build_id, direct=direct), "ok"
        except _Stale as e:
            return None, f"stale: {e}"
        except (CorruptDataError, FormatVersionError, StoreIOError) as e:
            return None, f"ignored: {e}"

    # -- pages ---------------------------------------------------------------------------
    def _pages(self, pages: np.ndarray) -> np.ndarray:
        buf = self.reader.read_pages(pages, out=aligned_empty(len(pages)) if self.reader.direct else None)
        self.bytes_read += len(pages) * PAGE_SIZE
        return buf

    def _need_sums(self, last_page: int) -> None:
        """Have the checksum entries up to file page ``last_page``'s (reads the checksum pages
        up to the one holding it, once: 8 bytes per 4 KiB, a prefix)."""
        need = int(self.layout.sum_index(np.array([last_page]))[0]) + 1
        if need > len(self._sums):
            have = len(self._sums) // (PAGE_SIZE // 8)
            more = np.arange(1 + have, 1 + -(-need // (PAGE_SIZE // 8)), dtype=np.int64)
            self._sums = np.concatenate([self._sums, self._pages(more).reshape(-1).view("<u8")])

    def _verify(self, pages: np.ndarray, buf: np.ndarray) -> None:
        """Check pages ``pages`` (file page numbers) read into ``buf`` (``CorruptDataError``)."""
        self._need_sums(int(pages.max()))
        # torch.mv over int64 words when the pages are writable (torch takes no read-only
        # array): ~4x numpy's multiply-and-sum, no temporary the size of the pages, GIL released
        sums = fast_page_checksums(buf) if buf.flags.writeable else page_checksums(buf)
        bad = np.flatnonzero(sums != self._sums[self.layout.sum_index(pages)])
        if len(bad):
            raise CorruptDataError(f"{self.path}: snapshot page {int(pages[bad[0]])} fails its checksum; save the "
                                   "profile again (`tierstore profile --save-profile`) to rewrite it")

    def _read(self, pages: np.ndarray) -> np.ndarray:
        buf = self._pages(pages)
        self._verify(pages, buf)
        return buf

    # -- rows ----------------------------------------------------------------------------
    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Each row's rank in the snapshot, -1 where it is not among the first ``len(rows)``
        (every tier places a prefix of the ranking, so those are the ones to look at; a
        profile saved since without a snapshot finds fewer, and the rest load from the row file).
        Reads the ids prefix once, extending it when a larger tier asks."""
        ids = self._prefix(len(rows))
        if len(ids) >= len(rows) and np.array_equal(ids[: len(rows)], rows):  # the tier's rows in rank order
            return np.arange(len(rows), dtype=np.int64)
        if self._sorted is None:
            order = np.argsort(ids, kind="stable")
            self._sorted = (ids[order], order)
        sorted_ids, order = self._sorted
        if not len(sorted_ids):
            return np.full(len(rows), -1, np.int64)
        at = np.minimum(np.searchsorted(sorted_ids, rows), len(sorted_ids) - 1)
        return np.where(sorted_ids[at] == rows, order[at], -1)

    def _prefix(self, k: int) -> np.ndarray:
        """The first ``min(k, n)`` ranked ids (read once, extended when a larger tier asks)."""
        k = min(k, self.layout.n)
        if k > len(self.ids):
            pages = self.layout.id_file_pages(k)
            raw = self._read(pages).reshape(-1)[: k * self.layout.id_bytes]
            self.ids = raw.view("<i4" if self.layout.id_bytes == 4 else "<i8").astype(np.int64)
            self._sorted = None
        return self.ids

    def ranking(self, top: int, profile: dict) -> TopProfile | None:
        """The profile's ``top`` hottest rows read from the snapshot's ids prefix (``4 x top``
        bytes), instead of the profile file (8 bytes per table row for a version-1 profile,
        16 per profiled row for version 2), when the snapshot was made of this very profile
        (``profile``: its metadata; the ``profile_id`` of the save both record) and holds
        them: ``top`` ids, or every profiled row. None otherwise (the caller loads the
        profile), or when a page fails its check (the snapshot is then dropped)."""
        made_of = self.head.get("profile")
        pid = profile.get("profile_id")
        if not isinstance(made_of, dict) or not isinstance(pid, str) or made_of.get("profile_id") != pid:
            return None
        nonzero = int(profile["nonzero"])
        if self.layout.n < min(top, nonzero):
            return None
        try:
            ids = self._prefix(min(top, nonzero))
        except (CorruptDataError, StoreIOError) as e:
            self.drop(str(e))
            return None
        return TopProfile(ids[:top], None, int(self.head["rows"]), complete=len(ids) >= nonzero)

    def read_rows(self, pos: np.ndarray) -> np.ndarray:
        """Snapshot rows at ranks ``pos`` (sorted ascending): uint8 (len(pos), row_bytes).
        Reads the pages they touch (a prefix: one sequential run), checked."""
        lay, rb = self.layout, self.layout.row_bytes
        if int(pos[-1]) - int(pos[0]) + 1 == len(pos):  # consecutive ranks (a prefix): one byte range, no gather
            a = lay.rows_offset + int(pos[0]) * rb
            b = a + len(pos) * rb
            flat = self._read(np.arange(a // PAGE_SIZE, -(-b // PAGE_SIZE), dtype=np.int64)).reshape(-1)
            return flat[a % PAGE_SIZE: a % PAGE_SIZE + len(pos) * rb].reshape(len(pos), rb)
        start = lay.rows_offset + pos * rb
        first, last = start // PAGE_SIZE, (start + rb - 1) // PAGE_SIZE
        span = int((last - first).max()) + 1
        pages = np.unique(np.minimum(first[:, None] + np.arange(span), last[:, None]))
        flat = self._read(pages).reshape(-1)
        at = np.searchsorted(pages, first) * PAGE_SIZE + start % PAGE_SIZE
        out = np.empty((len(pos), rb), dtype=np.uint8)
        for s in range(0, len(pos), 4096):  # gather by index in pieces: the index is 8 bytes per byte moved
            out[s: s + 4096] = flat[at[s: s + 4096, None] + np.arange(rb)]
        return out

    def read_into(self, p0: int, dst: np.ndarray, done: Callable[[int], None]) -> None:
        """Snapshot rows at ranks ``p0 .. p0 + len(dst)`` into ``dst`` (uint8 (n, row_bytes),
        C-contiguous, writable: a run of a host slab's slots), at the disk's sequential speed.

        The rows are one byte range of the file. Its whole pages are read straight into
        ``dst`` (no copy) when the memory lines up with the file for the reader (any address
        for buffered reads; O_DIRECT needs ``dst``'s address and the file offset equal mod
        4 KiB: a page-aligned slab whose slot ``i`` holds rank ``i`` does), else through two
        scratch buffers; the partial pages at either end through a page of scratch. A reader
        thread reads step ``k + 1`` (``PRELOAD_BYTES``) while this thread checks step ``k``'s
        pages (and copies, for scratch), so the read never waits for the checks.

        ``done(n_rows)`` after each step: the first ``n_rows`` rows of ``dst`` are in place and
        checked (call it progress). A page that fails its check raises ``CorruptDataError``
        (rows past the last ``done`` may hold anything: the caller loads them elsewhere); every
        read has finished when this returns or raises."""
        lay, rb, n = self.layout, self.layout.row_bytes, len(dst)
        if n == 0:
            return
        flat = dst.reshape(-1)
        a = lay.rows_offset + p0 * rb  # file bytes [a, b)
        b = a + n * rb
        lo, hi = -(-a // PAGE_SIZE), b // PAGE_SIZE  # whole pages inside [a, b): [lo, hi)
        aligned = not self.reader.direct or (flat.ctypes.data - a) % PAGE_SIZE == 0
        step = max(1, PRELOAD_BYTES // PAGE_SIZE)
        jobs: list[tuple[int, int, bool]] = []  # (first page, end page, into dst)
        if a % PAGE_SIZE:
            jobs.append((a // PAGE_SIZE, a // PAGE_SIZE + 1, False))
        for s in range(lo, hi, step):
            jobs.append((s, min(s + step, hi), aligned))
        if b % PAGE_SIZE and (not jobs or jobs[-1][1] <= b // PAGE_SIZE):
            jobs.append((b // PAGE_SIZE, b // PAGE_SIZE + 1, False))
        self._need_sums(jobs[-1][1] - 1)
        scratch: list[np.ndarray] = []  # rotating buffers for jobs not read into dst, one per step in use

        def target(k: int) -> np.ndarray:
            s, e, direct = jobs[k]
            if direct:
                return flat[s * PAGE_SIZE - a: e * PAGE_SIZE - a].reshape(e - s, PAGE_SIZE)
            while len(scratch) < READS_AHEAD + 1:
                scratch.append(aligned_empty(max(e2 - s2 for s2, e2, d in jobs if not d)))
            return scratch[k % (READS_AHEAD + 1)][: e - s]

        def read(k: int) -> np.ndarray:
            s, e, _ = jobs[k]
            self.read_calls += 1
            return self.reader.read_pages(np.arange(s, e, dtype=np.int64), out=target(k))

        # READS_AHEAD steps in flight, each in its own thread (its own AIO context): when one
        # step's reads end, the next step's are already queued, so the disk's queue never
        # drains at a step's boundary while this thread checks the step that just arrived
        with ThreadPoolExecutor(READS_AHEAD, thread_name_prefix="tierstore-snapshot") as pool:
            futs: deque[Future[np.ndarray]] = deque(pool.submit(read, k) for k in range(min(READS_AHEAD, len(jobs))))
            try:
                for k, (s, e, direct) in enumerate(jobs):
                    buf = futs.popleft().result()
                    if k + READS_AHEAD < len(jobs):
                        futs.append(pool.submit(read, k + READS_AHEAD))
                    self.bytes_read += (e - s) * PAGE_SIZE
                    self._verify(np.arange(s, e, dtype=np.int64), buf)
                    if not direct:  # the part of these pages inside [a, b)
                        x, y = max(a, s * PAGE_SIZE), min(b, e * PAGE_SIZE)
                        flat[x - a: y - a] = buf.reshape(-1)[x - s * PAGE_SIZE: y - s * PAGE_SIZE]
                    done((min(b, e * PAGE_SIZE) - a) // rb)
            finally:  # later steps may still be reading into dst or a scratch buffer
                wait_futures(futs)

    def drop(self, why: str = "") -> None:
        """Stop using the snapshot (a page failed its check): later loads read the row file."""
        self.dropped = True
        self.why = why

    def close(self) -> None:
        self.reader.close()


class _Stale(TierStoreError):
    """A snapshot of another build (internal: ``TableSnapshot.open`` reports it as "stale")."""


def host_slots(source: Tier, rows: np.ndarray) -> np.ndarray:
    """Slot of each row in ``source`` (a memory tier), -1 where it does not hold it: one probe
    of its row map per row (compiled; a ghost entry is not held). Sized by ``rows``, never by
    the table (sorting the source's held rows instead cost ~2 s per 6M-row host tier at open)."""
    if source.kind == RESIDENT:
        return rows.copy()
    if source.kind != CACHED or source.index is None:
        return np.full(len(rows), -1, np.int64)
    slots = source.index.slots_of(rows).astype(np.int64)
    slots[slots < 0] = -1
    return slots


def on_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``rows`` on the tier's device (a CUDA device tier loads from host memory: one copy up,
    which waits, so the step's host buffer may be reused; never run: needs CUDA)."""
    return rows if rows.device == device else rows.to(device)


def _slab_run(tier: Tier, slots: np.ndarray, pos: np.ndarray) -> np.ndarray | None:
    """The bytes of ``tier``'s slots ``slots`` as one writable uint8 (n, row_bytes) array, when
    they are one ascending run of a host-memory slab written by the CPU (no CUDA fences) and
    ``pos`` one ascending run of snapshot ranks: the snapshot then reads straight into it
    (``TableSnapshot.read_into``). None otherwise (the rows go through ``tier.write``)."""
    slab = getattr(tier, "slab", None)
    n = len(slots)
    if (n == 0 or slab is None or slab.device.type != "cpu" or getattr(tier, "fences", None) is not None
            or getattr(tier, "_on_gpu", None) is not None or not slab.is_contiguous()):
        return None
    a = _run_first(slots)
    if a is None or _run_first(pos) is None:
        return None
    return slab[a: a + n].view(torch.uint8).numpy().reshape(n, -1)


def run_start(slots: np.ndarray | torch.Tensor) -> int | None:
    """The first slot when ``slots`` is one ascending run (a, a+1, ..., a+n-1), else None: the
    open's preload writes such runs, and a slice copy is ~10x faster than ``index_copy_``."""
    if not isinstance(slots, np.ndarray) or slots.ndim != 1 or slots.size < 2:
        return None
    return _run_first(slots)


def _run_first(x: np.ndarray) -> int | None:
    """``x[0]`` when the 1-D, non-empty ``x`` is one ascending run (a, a+1, ..., a+n-1), else None."""
    a = int(x[0])
    if int(x[-1]) - a != x.size - 1 or not (np.diff(x) == 1).all():
        return None
    return a


def placed_run(ros: np.ndarray, size: int) -> bool:
    """Whether the slots holding a row are exactly [0, size) (a new index's: ``placed_slots``):
    two reductions, no temporary array."""
    if not 0 <= size <= ros.size:
        return False
    return (size == 0 or int(ros[:size].min()) >= 0) and (size == ros.size or int(ros[size:].max()) < 0)


def placed_slots(ros: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(slots, rows), int64, of the rows an index placed at construction (``ros``: its
    ``row_of_slot``; ``size``: the rows it holds), in slot order, which is rank order for
    every policy. A new index fills its slots lowest first (pinned rows, then the policy's
    prefill: ``structs.take_free``), so they are slots [0, size): then no scan of every
    slot, no gather and no scatter (~20 ns a slot at open, most of it a scattered pass);
    otherwise the slots holding a row, found by a scan."""
    if placed_run(ros, size):
        return np.arange(size, dtype=np.int64), ros[:size].astype(np.int64)
    slots = np.flatnonzero(ros >= 0).astype(np.int64)
    return slots, ros[slots].astype(np.int64)


def load_slots(tier: Tier, slots: np.ndarray, rows: np.ndarray, *, disk: DiskTier, source: Tier | None = None,
               snapshot: TableSnapshot | None = None, progress: Callable[[], None] | None = None,
               in_place: int = 0, copied: int = 0) -> OpenStats:
    """Write rows ``rows`` (rank order reads the snapshot best; any order works) into ``tier``'s ``slots``: from ``source``'s slab,
    then ``snapshot``, then ``disk``, each a bounded step at a time (module docstring). When
    a snapshot page fails its checksum (or its read fails), the rows not loaded yet come from
    the row file and the error is in ``snapshot_error`` (the caller drops the snapshot).
    ``progress()`` is called after every step (the shared host tier's heartbeat to waiters).
    ``rows[:in_place]`` are in place already from the snapshot (``EarlyLoad``), ``rows[:copied]``
    from ``source``'s slab (``EarlyCopy``)."""
    tick = progress if progress is not None else (lambda: None)
    t0 = time.perf_counter()
    st = OpenStats(rows_loaded=len(rows))
    info = tier.info
    step = max(1, PRELOAD_BYTES // max(1, info.row_bytes))
    disk_bytes0 = disk.bytes_read
    left = np.ones(len(rows), dtype=bool)
    if in_place:  # ``rows[:in_place]`` already came from the snapshot, checked (EarlyLoad)
        left[:in_place] = False
        st.from_snapshot = in_place
    if copied:
        left[:copied] = False
        st.from_source = copied
    if source is not None and source.slab is not None and left.any():
        want = np.flatnonzero(left)
        src = host_slots(source, rows[want])
        held = src >= 0
        got, src = want[held], src[held]
        for s in range(0, len(got), step):
            sel, at = got[s : s + step], src[s : s + step]
            a = run_start(at) if source.kind == CACHED else None
            # the usual case (both tiers place a prefix of the one ranking, in slot order): a
            # run of the source's slots, copied as a slice: no gather into a fresh buffer
            rows_in = source.slab[a: a + len(sel)] if a is not None else source.gather(at)
            tier.write(slots[sel], on_device(rows_in, tier.device))
            tick()
        left[got] = False
        st.from_source += len(got)
    if snapshot is not None and not snapshot.dropped and left.any():
        try:
            want = np.flatnonzero(left)
            pos = snapshot.positions(rows[want])
            found = pos >= 0
            want, pos = want[found], pos[found]
            order = np.argsort(pos, kind="stable")  # rank order: the snapshot's prefix, front to back
            want, pos = want[order], pos[order]
            run = _slab_run(tier, slots[want], pos)
            if run is not None:  # the usual case: the tier's hot set is the snapshot's prefix, in slot order
                loaded = 0

                def done(k: int) -> None:
                    nonlocal loaded
                    left[want[loaded:k]] = False
                    st.from_snapshot += k - loaded
                    loaded = k
                    tick()

                snapshot.read_into(int(pos[0]), run, done)
                want = want[:0]
            for s in range(0, len(want), step):
                sel = want[s : s + step]
                data = snapshot.read_rows(pos[s : s + step])
                tier.write(slots[sel], on_device(torch.from_numpy(data).view(info.raw_dtype).reshape(len(sel), info.dim),
                                           tier.device))
                left[sel] = False
                st.from_snapshot += len(sel)
                tick()
        except (CorruptDataError, StoreIOError) as e:  # the rest of the rows from the row file; the caller is told
            st.snapshot_error = str(e)
    if snapshot is not None:  # its header's too, for the first tier, and an early load's
        st.bytes_read += snapshot.bytes_read - snapshot.claimed
        snapshot.claimed = snapshot.bytes_read
    rest = np.flatnonzero(left)
    if len(rest):
        key = rows[rest] if disk.pos is None else disk.pos.of(rows[rest])
        rest = rest[np.argsort(key, kind="stable")]  # file order: each step reads forward through the file
        staged = torch.empty((min(step, len(rest)), info.dim), dtype=info.raw_dtype, device=tier.device)
        for s in range(0, len(rest), step):
            sel = rest[s : s + step]
            tier.write(slots[sel], disk.gather(rows[sel], staged[: len(sel)]))
            tick()
        st.from_rows = len(rest)
    st.bytes_read += disk.bytes_read - disk_bytes0
    st.seconds = time.perf_counter() - t0
    return st
