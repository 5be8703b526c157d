"""The store's one background loader thread (``StoreOptions.warm="background"``).

``tierstore.open`` returns once every index is built; this thread then runs each table's
``Table.warm_job`` (the host tier's placed rows, then the device tier's: tiers/warm.py says
how lookups stay exact meanwhile) one step at a time. Between steps it checks whether the
store is closing (``close`` returns once the step in progress ends: at most one
``tiers.warm.STEP_BYTES`` read) and whether a test holds it (``START_PAUSED``, ``allow``).
An error inside a step is the table's to record (``stats()["open"]``); one that escapes
is recorded here (``error``) and stops the loader: the tiers then fill on demand.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

__all__ = ["Warmer", "START_PAUSED"]

# tests: a new loader waits for ``allow``/``resume`` before its first step, so lookups can
# be made to interleave with loading at chosen points
START_PAUSED = False


class Warmer:
    """One thread running ``jobs`` (generators yielding after each step) in order."""

    def __init__(self, jobs: list[Callable[[], Iterator[None]]]):
        self._jobs = jobs
        self._cv = threading.Condition()
        self._stop = False
        self._budget: int | None = 0 if START_PAUSED else None  # steps it may take; None: no limit
        self.steps = 0  # steps taken
        self.finished = False
        self.error = ""
        self._thread = threading.Thread(target=self._run, name="tierstore-warm", daemon=True)
        self._thread.start()

    def _turn(self) -> bool:
        """Wait until a step may run; False when the store is closing."""
        with self._cv:
            self._cv.wait_for(lambda: self._stop or self._budget is None or self._budget > 0)
            if self._stop:
                return False
            if self._budget is not None:
                self._budget -= 1
            return True

    def _run(self) -> None:
        try:
            for job in self._jobs:
                it = job()
                try:
                    while True:
                        if not self._turn():
                            return
                        try:
                            next(it)
                        except StopIteration:
                            break
                        with self._cv:
                            self.steps += 1
                            self._cv.notify_all()
                finally:
                    it.close()  # a job left at a step runs its cleanup (closes its snapshot)
        except Exception as e:  # the lookups go on; the pending slots fill on demand
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with self._cv:
                self.finished = True
                self._cv.notify_all()

    def allow(self, n: int, *, timeout: float = 60.0) -> None:
        """Tests: let ``n`` more steps run and wait until they have (or the loader finished)."""
        with self._cv:
            target = self.steps + n
            self._budget = (self._budget or 0) + n
            self._cv.notify_all()
            self._cv.wait_for(lambda: self.steps >= target or self.finished, timeout)

    def resume(self) -> None:
        """Run to the end without pausing."""
        with self._cv:
            self._budget = None
            self._cv.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every job has ended; True if they have."""
        with self._cv:
            return self._cv.wait_for(lambda: self.finished, timeout)

    def close(self) -> None:
        """Stop after the step in progress and join the thread (idempotent)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
