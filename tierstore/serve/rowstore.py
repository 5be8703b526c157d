"""The row-store interface: what ``Store`` (one process) and ``ShardedStore`` (a process
group) both offer, so that code written against one runs on the other unchanged.

A user who moves from ``tierstore.open(path)`` to ``tierstore.open_sharded(path)`` changes
that one call; the model (``engram_model.memory.StoreMemory``), the serving loop and the
benchmarks take a :class:`RowStore`. The contract, checked for both implementations by
``tests/tierstore/serve/test_rowstore.py`` (the same test functions, run against a
``Store`` and a 2-rank ``ShardedStore`` on a quantized DeepSeek-V4.1-layout table):

- the same rows, bit for bit, in the same dtypes and shapes: ``ids.shape + (lookup_dim,)``;
  a quantized table's rows dequantized to bfloat16, its stored uint8 bytes with ``raw=True``;
- the same typed errors for the same mistakes (``InvalidIdError``, ``IdTypeError``,
  ``UnknownTableError``, ``StoreClosedError``, ``TierStoreError`` for a bad ``out=`` or
  ``raw=``), raised at the call for bad input and from ``result()`` for I/O and corruption;
- a ``ShardedStore``'s calls are collective (every rank makes the same calls in the same
  order, each with its own ids; ``tierstore.serve.distributed``), a ``Store``'s are not.

``isinstance(x, RowStore)`` checks that the methods and attributes exist (a
``runtime_checkable`` protocol checks names, not signatures); the signatures are checked
statically (each implementation's module assigns its class to a ``type[RowStore]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from ..format.spec import TableInfo
from ..ids import IdLike
from .prefetcher import LookupFuture

__all__ = ["RowStore"]


@runtime_checkable
class RowStore(Protocol):
    """A store of fixed-width rows served by table name: ``tierstore.Store`` or
    ``tierstore.ShardedStore``."""

    @property
    def tables(self) -> Mapping[str, TableInfo]:
        """Every table by name: rows (global rows for a sharded store), dim, dtype, and for
        a quantized table ``quant``, ``lookup_dim`` and ``lookup_dtype`` (what lookups return)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where lookups return rows."""
        ...

    def lookup(self, table: str, ids: IdLike, out: torch.Tensor | None = None, *, raw: bool = False) -> torch.Tensor:
        """Rows ``ids`` of ``table``, shape ``ids.shape + (lookup_dim,)``, bit-exact; ``out``
        (contiguous, that shape and dtype, on ``device``) is filled and returned instead of
        a new tensor; ``raw=True``: a quantized table's stored uint8 rows."""
        ...

    def prefetch(self, table: str, ids: IdLike, out: torch.Tensor | None = None, *,
                 raw: bool = False) -> LookupFuture[torch.Tensor]:
        """Start :meth:`lookup`; returns at once with a future. Bad input raises here."""
        ...

    def prefetch_many(self, requests: Mapping[str, IdLike]) -> LookupFuture[dict[str, torch.Tensor]]:
        """One call for several tables (``{table: ids}``), rows as :meth:`lookup` returns them."""
        ...

    def hint(self, table: str, ids: IdLike) -> None:
        """Announce rows a later lookup will read (the known future); bad ids raise here."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters: ``device``, ``host``, ``disk`` (per tier, summed over tables), ``latency``,
        ``tables`` (per table); a sharded store's are this rank's, plus ``exchange``."""
        ...

    def reset_stats(self) -> None:
        """Zero the counters of :meth:`stats`."""
        ...

    def close(self) -> None:
        """Release files, threads and memory; idempotent. Later calls raise ``StoreClosedError``."""
        ...

    def __enter__(self) -> RowStore: ...

    def __exit__(self, *exc: object) -> None: ...
