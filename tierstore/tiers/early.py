"""The hot-set snapshot's rows put in place while the tiers' indexes are built (open with ``warm="open"``).

Open builds each cache tier's index (seconds at tens of millions of slots, compiled code
without the GIL) and loads the rows it placed (``tiers.hotset``). When the policy places a
prefix of the snapshot's own ranking in slot order (``static``, ``default``) those rows are
known before the index is: ``EarlyLoad`` reads them into the host slab on a thread of its
own from the slab's allocation on, and ``EarlyCopy`` copies the device tier's share of them
(ranks 0 .. d, the first rows read) from the host slab into the device slab on another, as
each step is checked. After the builds each tier keeps only what it can check (slot i holds
rank i for its placed rows, ``_snapshot_prefix``) and loads anything else the ordinary way
(``hotset.load_slots``): the same rows in the same slots either way, every page checked.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..errors import CorruptDataError, StoreIOError
from .hotset import OpenStats, TableSnapshot, _run_first

__all__ = ["EarlyLoad", "EarlyCopy", "loaded_early"]


class _Enough(Exception):
    """Raised from ``read_into``'s progress callback: the early load has what it needs."""


class EarlyLoad:
    """The hot-set snapshot's prefix read into a fresh host slab while the tier's index is
    being built, instead of after it.

    Open used to build the index (seconds at tens of millions of slots, compiled code
    without the GIL) and only then read the snapshot (the disk's sequential speed): one after
    the other. The rows the index will place are known before it is built when the policy
    places a prefix of the profile's ranking in slot order (``static``: its pinned core;
    ``default``: its pinned core, then its ranked prefill) and that ranking is the snapshot's
    own (``TopProfile.counts is None``: read from the snapshot's ids at open). So a thread
    reads ranks ``first .. first + len(run)`` into slots ``0 .. len(run)`` meanwhile (``first``:
    ``TopProfile.first``, the ranks a device tier in the same memory holds with exclusive
    tiers, else 0; ``read_into``: every page checked before its rows count). ``finish(rows)``,
    after the index is built, waits for the rows it placed, then trusts only what it can
    check: slot i holds rank ``first + i`` for the placed rows, else nothing is kept and the
    ordinary load runs. Either way
    the result is the ordinary load's: the same rows in the same slots, every page checked.

    ``stop()`` (a failed index build, close) waits for the reads: none may write into a slab
    that is about to be freed."""

    POLICIES = ("static", "default")

    def __init__(self, snapshot: TableSnapshot, run: np.ndarray, *, first: int = 0, feed: EarlyCopy | None = None):
        self.snapshot, self.run = snapshot, run
        self.first = first  # the snapshot position of run's row 0 (``TopProfile.first``)
        self.feed = feed  # the device tier's early copy of these rows, fed as they arrive
        if feed is not None:
            feed.source(self)
        self.loaded = 0  # rows [0, loaded) of run are in place and checked
        self.limit = len(run)
        self.error = ""
        self._stop = False
        self._thread = threading.Thread(target=self._read, name="tierstore-early-load", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        def done(k: int) -> None:
            self.loaded = k
            if self.feed is not None:
                self.feed.advance(k)
            if self._stop or k >= self.limit:
                raise _Enough

        try:
            self.snapshot.read_into(self.first, self.run, done)
        except _Enough:
            pass
        except (CorruptDataError, StoreIOError) as e:  # the ordinary load meets it again and reports it
            self.error = str(e)
        except BaseException as e:  # pragma: no cover - a bug: keep what was checked, the rest loads as usual
            self.error = repr(e)
        finally:
            if self.feed is not None:
                self.feed.end()

    def finish(self, rows: np.ndarray, slots: np.ndarray | None) -> int:
        """How many leading placed rows are in place: ``rows[i]`` in slot ``slots[i]`` =
        ``i`` for ``i`` below the return value (0 when the placement is not the snapshot's
        prefix in slot order; ``slots`` None: ``rows[i]`` is in slot i). Waits for the reads."""
        self.limit = min(self.limit, len(rows))
        self._thread.join()  # the snapshot is this thread's alone again
        n = min(self.loaded, len(rows))
        return n if _snapshot_prefix(self.snapshot, rows[:n], None if slots is None else slots[:n], self.first) else 0

    def wait(self) -> None:
        """Until the reads have ended (the thread stops by itself at ``limit``, or at an error)."""
        self._thread.join()

    def stop(self) -> None:
        self._stop = True
        self._thread.join()


class EarlyCopy:
    """The device tier's placed rows copied from the host slab as the host tier's early load
    (``EarlyLoad``) checks them, while both indexes are still being built.

    Both tiers place a prefix of the one ranking in slot order (``EarlyLoad.POLICIES``), so
    the device tier's slots ``0 .. d`` hold ranks ``0 .. d``: the host slab's first ``d`` rows.
    The device tier's fill used to wait for both index builds and the whole host load, then
    probe the host's row map for every device row and copy (0.18-0.55 s at 1.5M device rows
    of 264 bytes on 2 loaded cores, all of it after the read). Here a thread of its own copies
    each checked step's share of the first ``d`` rows into the device slab (a memory copy, the
    GIL released) while the reads go on: copying on the reading thread itself delayed each
    step's check and so the reads (median open 3.68 against 3.13 s, 4 rounds). ``finish``
    trusts only what it can check, as ``EarlyLoad.finish`` does: slot i holds rank i for the
    placed rows, else nothing copied is kept and the ordinary fill runs.

    Thread-safety: ``source``, ``advance`` and ``end`` (the early load's thread), ``follow``,
    ``finish`` and ``stop`` (the tiers' builders) share one condition; no copy lands in the
    device slab once ``stop`` or ``finish`` has returned."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._early: EarlyLoad | None = None  # the host tier's early load, the rows' source
        self._have = 0  # rows [0, have) of the early load's run are in place and checked
        self._ended = False  # the early load's reads have ended: ``_have`` is final
        self._stopped = False
        self._dst: np.ndarray | None = None  # the device slab's first rows, uint8 (d, row_bytes)
        self._thread: threading.Thread | None = None
        self.copied = 0  # rows [0, copied) of ``_dst`` hold the source's rows

    def source(self, early: EarlyLoad) -> None:
        """The host tier's early load feeds this copy (its constructor calls this)."""
        with self._cv:
            self._early = early

    def advance(self, k: int) -> None:
        """The source's rows [0, k) are in place and checked."""
        with self._cv:
            self._have = k
            self._cv.notify()

    def end(self) -> None:
        """The source's reads have ended (no ``advance`` follows)."""
        with self._cv:
            self._ended = True
            self._cv.notify()

    def follow(self, dst: np.ndarray) -> None:
        """Copy into ``dst`` (the device slab's first rows, uint8 (d, row_bytes)), on a thread."""
        with self._cv:
            if self._stopped or self._thread is not None:
                return
            self._dst = dst
            self._thread = threading.Thread(target=self._run, name="tierstore-early-copy", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and not self._ended and (self._early is None or self._have <= self.copied):
                    self._cv.wait()
                end = min(self._have, len(self._dst)) if self._early is not None else 0
                if self._stopped or end <= self.copied:
                    return  # stopped, or the reads ended and every row they checked is copied
                src, dst, a = self._early.run, self._dst, self.copied
            dst[a: end] = src[a: end]  # outside the lock: ``advance`` never waits for a copy
            with self._cv:
                self.copied = end

    def finish(self, rows: np.ndarray, slots: np.ndarray | None) -> int:
        """How many leading placed device rows are in place: ``rows[i]`` in slot ``slots[i]`` =
        ``i`` for ``i`` below the return value (0 when the placement is not the snapshot's
        prefix in slot order; ``slots`` None: ``rows[i]`` is in slot i). Waits for the source's
        reads and the copies of what they checked."""
        early = self._early
        if early is not None:
            early.wait()  # its reads have ended: the copy thread copies the rest and returns
            if self._thread is not None:
                self._thread.join()
        self.stop()
        n = min(self.copied, len(rows))
        return n if early is not None and _snapshot_prefix(early.snapshot, rows[:n],
                                                           None if slots is None else slots[:n]) else 0

    def stop(self) -> None:
        """No more copies into the device slab (it is about to be loaded otherwise or freed)."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._dst = None


_CHECK_STEP = 1 << 16  # entries per step of ``_snapshot_prefix``'s comparisons (cache-sized)


def _snapshot_prefix(snapshot: TableSnapshot, rows: np.ndarray, slots: np.ndarray | None, first: int = 0) -> bool:
    """Whether ``rows[i]`` is the snapshot's rank ``first + i`` and sits in slot ``i`` (``slots[i]``;
    None: known to), for every i (``rows`` non-empty): what the early loads keep is then
    exactly what the ordinary load would have put there. Compared a cache-sized step at a time: at 6M placed rows the
    whole-array form (a rank per row, ``np.diff``, ``np.arange``: temporaries of 48 MB, each
    page faulted in) cost 0.15-0.9 s after the index build, on open's critical path."""
    n = len(rows)
    if n == 0:
        return False
    try:
        ids = snapshot._prefix(first + n)[first:]
    except (CorruptDataError, StoreIOError):
        return False
    if len(ids) < n:
        return False
    for a in range(0, n, _CHECK_STEP):
        b = min(n, a + _CHECK_STEP)
        if not np.array_equal(ids[a:b], rows[a:b]) or (slots is not None and _run_first(slots[a:b]) != a):
            return False
    return True



def loaded_early(n: int, *, from_snapshot: bool, snapshot: TableSnapshot | None, t0: float) -> OpenStats:
    """The ``OpenStats`` of a tier whose ``n`` placed rows all came in early (``EarlyLoad``:
    ``from_snapshot``; else ``EarlyCopy``, from the host slab), as ``load_slots`` would count
    them, its snapshot bytes included; ``t0``: when the tier's preload began."""
    st = OpenStats(rows_loaded=n, from_snapshot=n if from_snapshot else 0, from_source=0 if from_snapshot else n)
    if snapshot is not None:
        st.bytes_read = snapshot.bytes_read - snapshot.claimed
        snapshot.claimed = snapshot.bytes_read
    st.seconds = time.perf_counter() - t0
    return st
