"""Exception hierarchy. Every error the store raises is a ``TierStoreError``.

Caller mistakes also derive from the matching builtin (``IndexError``, ``TypeError``,
``KeyError``, ``ValueError``) so that generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "TierStoreError",
    "InvalidIdError",
    "IdTypeError",
    "UnknownTableError",
    "CorruptDataError",
    "FormatVersionError",
    "BudgetError",
    "PolicyParamError",
    "ReaderParamError",
    "StoreIOError",
    "StoreChangedError",
    "OutputPathError",
    "CapacityError",
    "StoreExistsError",
    "ReplaceRefusedError",
    "CheckpointError",
    "ShardedLookupError",
    "ShardDesyncError",
    "LookupTimeoutError",
    "StoreClosedError",
    "MissingExtraError",
]


class TierStoreError(Exception):
    """Base class of every error raised by tierstore."""


class InvalidIdError(TierStoreError, IndexError):
    """A row id is negative or not below the table's row count."""


class IdTypeError(TierStoreError, TypeError):
    """Row ids are not integers (floats, bools, strings...)."""


class UnknownTableError(TierStoreError, KeyError):
    """The store has no table of that name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CorruptDataError(TierStoreError):
    """Stored bytes do not match their checksum, or a file is truncated or malformed."""


class FormatVersionError(TierStoreError):
    """The store was written in a format this version of tierstore cannot read."""


class BudgetError(TierStoreError, ValueError):
    """A memory budget is malformed or negative."""


class PolicyParamError(TierStoreError, ValueError):
    """A cache policy parameter is unknown to the policy, or its value is out of range.
    ``param`` names the offending parameter."""

    def __init__(self, message: str, *, param: str):
        super().__init__(message)
        self.param = param


class ReaderParamError(TierStoreError, ValueError):
    """A page reader was given a bad parameter (method, threads, depth) or a malformed
    argument (an output buffer of the wrong shape, dtype or alignment). A caller mistake."""


class StoreIOError(TierStoreError, OSError):
    """Reading or writing the store's files failed at the operating-system level."""


class StoreChangedError(StoreIOError):
    """The store was replaced (``tierstore build --force``) while it was being opened, again
    on every retry: its files belong to different builds. Open it again once the rebuild is
    done. (errno ``ESTALE``; the path is the file whose build disagreed.)"""
class OutputPathError(TierStoreError, OSError):
    """A file the caller asked for (a plot, a report) cannot be written at that path: its
    folder is a file or not writable, or the path is a directory. Raised before the work
    that would produce the file, not after it."""


class CapacityError(TierStoreError):
    """Not enough space: the disk is full, or a tier cannot hold what was asked."""


class StoreExistsError(TierStoreError, FileExistsError):
    """The output store already exists and ``force`` was not given."""


class ReplaceRefusedError(StoreExistsError):
    """``force`` was given but what is at the output path is not a tierstore store (user
    files, a plain file, a symlink) or is, holds or lies inside the checkpoint being read:
    ``--force`` replaces only a store, so nothing was touched."""


class CheckpointError(TierStoreError, ValueError):
    """A checkpoint cannot be read, or holds no table to build a store from."""


class LookupTimeoutError(TierStoreError, TimeoutError):
    """``LookupFuture.result(timeout=)`` ran out of time (the lookup goes on in the background),
    or an open waited ``timeout`` seconds for another process's fill of the shared host tier
    while it made no progress (the message names that process)."""


class StoreClosedError(TierStoreError):
    """The store was closed: no new lookups, and queued ones are cancelled."""


class MissingExtraError(TierStoreError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it
    (``pip install 'tierstore[plot]'``)."""


class ShardedLookupError(TierStoreError):
    """A collective lookup of a sharded store failed because of another rank: its input was
    invalid (bad ids, unknown table, bad ``out=``) or it could not serve the rows it owns.
    Every rank of the group raises for the same call (the rank at fault raises its own
    error), so the group stays in step. ``ranks`` lists the ranks at fault."""

    def __init__(self, message: str, *, ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.ranks = ranks


class ShardDesyncError(ShardedLookupError):
    """The ranks of a sharded store issued different collective calls at the same step
    (another table, another kind of call, or another sequence number). No rows are
    exchanged; every rank raises."""
