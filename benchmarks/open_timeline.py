"""Open's timeline: when each phase of a ``tierstore.open`` starts and ends, and on which thread.

``record()`` wraps the phases of an open (the ranking's read, each tier's construction and
index build, the slab prefaults, the early snapshot read, the preloads and their checks) so
that every call appends ``(thread, phase, start, end)``; ``phases`` are seconds from ``t0``.
Install it before the open to time (``bench_warm --vs-dd --timeline``). The wrappers only
read the clock: what they add is a few microseconds per phase. Phases a tree lacks (an older
checkout) are skipped, so the same script times a baseline checkout's open too.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

__all__ = ["Timeline", "format_phases"]

# (module, class, function): the phases, in the order an open meets them
_PHASES = (
    ("tierstore.serve.store", "Store", "_ranking"),
    ("tierstore.tiers.cache", "CacheTier", "__init__"),
    ("tierstore.tiers.cache", "Prefault", "_run"),
    ("tierstore.cache.index", "CacheIndex", "__init__"),
    ("tierstore.tiers.early", "EarlyLoad", "_read"),
    ("tierstore.tiers.early", "EarlyLoad", "finish"),
    ("tierstore.tiers.hotset", "EarlyLoad", "_read"),  # where older checkouts keep it
    ("tierstore.tiers.hotset", "EarlyLoad", "finish"),
    ("tierstore.tiers.early", "EarlyCopy", "_run"),
    ("tierstore.tiers.early", "EarlyCopy", "finish"),
    ("tierstore.tiers.cache", "CacheTier", "preload"),
)


class Timeline:
    """The phases of the opens made while it is installed (``record``)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.events: list[tuple[str, str, float, float]] = []

    def start(self) -> None:
        """Times from now on are seconds from here (call right before the open)."""
        self.t0 = time.perf_counter()
        self.events.clear()

    def record(self) -> Timeline:
        """Wrap every phase this tree has (once per process)."""
        import importlib

        for mod_name, cls_name, fn_name in _PHASES:
            try:
                owner = getattr(importlib.import_module(mod_name), cls_name, None)
            except ModuleNotFoundError:  # an older checkout
                continue
            if owner is not None and hasattr(owner, fn_name):
                setattr(owner, fn_name, self._wrapped(getattr(owner, fn_name), f"{cls_name}.{fn_name}"))
        return self

    def _wrapped(self, fn: Any, label: str) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                name = label
                tier = getattr(args[0], "name", None) if args else None
                if label.startswith("CacheTier."):  # which tier: its name (the constructor's first argument)
                    name += f"[{args[1] if label.endswith('__init__') else tier}]"
                self.events.append((threading.current_thread().name, name, t - self.t0, time.perf_counter() - self.t0))

        return timed

    def phases(self) -> list[dict[str, Any]]:
        """The events in start order: thread, phase, start and end seconds."""
        return [{"thread": th, "phase": ph, "start": round(a, 4), "end": round(b, 4)}
                for th, ph, a, b in sorted(self.events, key=lambda e: e[2])]


def format_phases(phases: list[dict[str, Any]]) -> str:
    """One line per phase: start, end, seconds, thread, phase."""
    return "\n".join(f"  {p['start']:7.3f} {p['end']:7.3f} {p['end'] - p['start']:7.3f}  {p['thread']:24s} {p['phase']}"
                     for p in phases)
