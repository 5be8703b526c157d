"""The I/O fault-injection seam: tests make the N-th read, write, fsync or rename fail.

Every place where tierstore moves bytes to or from a file (the disk tier's page reads, the
checkpoint reader, the builder's writes, atomic writes, directory fsyncs, the publishing
renames) calls :func:`point` just before the operating-system call. With no plan installed
(always, outside tests) that is one global read and a ``None`` check per call, and calls are
per batch of pages or per chunk of rows, never per row. Inside :func:`inject`, a
:class:`FaultPlan` counts the points and, at its N-th one, raises the ``OSError`` a failing
disk would (``EIO``, ``ENOSPC``) or shortens the transfer (a short read or write), so a test
can walk N over every point of a workload, as SQLite's I/O-error tests do, and check that
nothing is lost, no wrong row is returned and every failure is a typed error.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["FaultPlan", "inject", "point", "OPS", "KINDS"]

OPS = ("read", "write", "fsync", "rename")
KINDS = ("EIO", "ENOSPC", "short")

_plan: FaultPlan | None = None


@dataclass
class FaultPlan:
    """Fail the ``nth`` (1-based) I/O point, counting only ``op`` points when it is given.

    kind: ``"EIO"`` or ``"ENOSPC"`` raise that ``OSError``; ``"short"`` lets a read or write
    transfer half its bytes (rounded down to a 512-byte sector, at least 1 byte less).
    ``nth=0`` never fires: a counting run, whose ``seen`` lists every point as (op, path).
    """

    nth: int = 0
    kind: str = "EIO"
    op: str | None = None
    seen: list[tuple[str, str]] = field(default_factory=list)
    fired: tuple[str, str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.op is not None and self.op not in OPS):
            raise ValueError(f"kind must be one of {KINDS} and op one of {OPS} or None")

    def hit(self, op: str, path: str, nbytes: int) -> int:
        with self._lock:
            if self.op is not None and op != self.op:
                return nbytes
            self.seen.append((op, path))
            if len(self.seen) != self.nth:
                return nbytes
            self.fired = (op, path)
        if self.kind == "short":
            if op in ("read", "write") and nbytes > 1:
                return max(0, min(nbytes - 1, nbytes // 2 // 512 * 512))
            return nbytes  # nothing to shorten: the point passes
        code = errno.EIO if self.kind == "EIO" else errno.ENOSPC
        raise OSError(code, f"{os.strerror(code)} (injected at {op} #{self.nth})", path)


@contextmanager
def inject(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Install ``plan`` for the duration of the block (process-wide, every thread)."""
    global _plan
    if _plan is not None:
        raise RuntimeError("a fault plan is already installed")
    _plan = plan
    try:
        yield plan
    finally:
        _plan = None


def point(op: str, path: str | os.PathLike[str] | None, nbytes: int = 0) -> int:
    """Called by product code right before an I/O call of ``op`` on ``path`` moving ``nbytes``.

    Returns how many bytes the call may transfer (``nbytes`` unless a short transfer is
    planned); raises the planned ``OSError``.
    """
    plan = _plan
    if plan is None:
        return nbytes
    return plan.hit(op, os.fspath(path) if path is not None else "", nbytes)
