"""The prefetcher schedules lookups in the background and hands back small futures.

Work runs on a pool of threads: the heavy parts (page reads, numpy/torch gathers) release
the GIL, so the caller's compute overlaps them. When CUDA is present each worker issues
its copies on its own side stream and the future records an event; ``result()`` makes the
caller's current stream wait on it instead of synchronizing the device.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from ..errors import LookupTimeoutError, StoreClosedError, TierStoreError

__all__ = ["LookupFuture", "Prefetcher", "LatencyStats"]

T = TypeVar("T")


class LatencyStats:
    """Prefetch lead time (finished before asked for) and caller stall time (waited in result())."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.results = 0
        self.ready_at_result = 0  # futures already done when result() was first called
        self.lead_seconds = 0.0  # sum over those of (result() call time - completion time)
        self.stall_seconds = 0.0  # sum of time callers blocked in result()

    def record(self, lead: float, stall: float, ready: bool) -> None:
        with self._lock:
            self.results += 1
            self.ready_at_result += ready
            self.lead_seconds += lead
            self.stall_seconds += stall

    def as_dict(self) -> dict[str, float]:
        n = max(1, self.results)
        return {
            "results": self.results,
            "ready_at_result": self.ready_at_result,
            "hidden_fraction": self.ready_at_result / n,
            "mean_lead_ms": 1e3 * self.lead_seconds / max(1, self.ready_at_result),
            "stall_seconds": self.stall_seconds,
            "mean_stall_ms": 1e3 * self.stall_seconds / n,
        }


class LookupFuture(Generic[T]):
    """Result of ``Store.prefetch``: ``done()`` polls, ``result()`` waits and returns the rows.

    Errors raised by the background work re-raise from ``result()`` as ``TierStoreError``
    subclasses (anything else is wrapped in ``TierStoreError``); nothing hangs.
    """

    def __init__(self, inner: cf.Future, latency: LatencyStats):
        self._inner = inner
        self._latency = latency
        self._recorded = False
        # completion time, set by a callback that holds no reference back to this object
        # (a cycle would keep the result buffer alive until the garbage collector runs)
        self._done_at: list[float] = []
        done_at = self._done_at
        inner.add_done_callback(lambda _: done_at.append(time.perf_counter()))

    def done(self) -> bool:
        return self._inner.done()

    def result(self, timeout: float | None = None) -> T:
        t0 = time.perf_counter()
        ready = self._inner.done()
        try:
            value, event = self._inner.result(timeout)
        except cf.CancelledError:
            raise StoreClosedError("lookup cancelled: the store was closed before it ran") from None
        except cf.TimeoutError:
            raise LookupTimeoutError(f"lookup not finished within timeout={timeout}s; "
                                     "it goes on in the background, call result() again") from None
        except TierStoreError:
            raise
        except Exception as e:  # a bug or an unexpected library error: still typed for the caller
            raise TierStoreError(f"lookup failed: {type(e).__name__}: {e}") from e
        finally:
            if not self._recorded and self._inner.done():
                self._recorded = True
                now = time.perf_counter()
                lead = (t0 - self._done_at[0]) if (ready and self._done_at) else 0.0
                self._latency.record(max(0.0, lead), now - t0 if not ready else 0.0, ready)
        if event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(event)
            for t in value.values() if isinstance(value, dict) else (value,):
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(stream)  # allocated on the side stream, used on this one
        return value


class Prefetcher:
    """A fixed pool of worker threads; ``submit(fn)`` runs ``fn()`` and returns a LookupFuture.

    ``fn`` returns the value; on CUDA it runs inside the worker's side stream and an event
    marks the end of its copies.
    """

    def __init__(self, threads: int, device: torch.device):
        self.device = device
        self.latency = LatencyStats()
        self._pool = cf.ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="tierstore")
        self._local = threading.local()

    def _stream(self) -> torch.cuda.Stream:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(device=self.device)
        return s

    def _run(self, fn: Callable[[], T], issued: torch.cuda.Event | None) -> tuple[T, torch.cuda.Event | None]:
        if self.device.type != "cuda":
            return fn(), None
        stream = self._stream()
        # Work the caller queued before prefetching (e.g. kernels still reading a pooled output
        # buffer this job will overwrite) must finish before our copies start.
        stream.wait_event(issued)
        with torch.cuda.stream(stream):
            value = fn()
            event = torch.cuda.Event()
            event.record(stream)
        return value, event

    def submit(self, fn: Callable[[], T]) -> LookupFuture[T]:
        issued = None
        if self.device.type == "cuda":
            issued = torch.cuda.Event()
            issued.record(torch.cuda.current_stream(self.device))
        try:
            inner = self._pool.submit(self._run, fn, issued)
        except RuntimeError:  # "cannot schedule new futures after shutdown": close() won the race
            raise StoreClosedError("the store is closed; open it again to look rows up") from None
        return LookupFuture(inner, self.latency)

    def done(self, value: T) -> LookupFuture[T]:
        """A future that already holds ``value`` (work finished in the caller's thread)."""
        inner: cf.Future = cf.Future()
        inner.set_result((value, None))
        return LookupFuture(inner, self.latency)

    def failed(self, error: BaseException) -> LookupFuture:
        """A future that re-raises ``error`` from ``result()``."""
        inner: cf.Future = cf.Future()
        inner.set_exception(error)
        return LookupFuture(inner, self.latency)

    def close(self, wait: bool = True) -> None:
        """Cancel queued lookups; with ``wait``, also wait for running ones to finish."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
