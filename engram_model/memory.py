"""Where an Engram layer's table rows come from: one small interface, two sources.

An Engram layer packs all its (order, head) tables into one table of ``rows`` x ``dim``
(head (n, k) starts at the sum of the earlier primes). Its addresses depend only on the
input ids, so the model asks for every layer's rows at the start of the forward pass
(:meth:`MemorySource.fetch` returns at once with a future) and each layer later waits on
its own future. Two sources implement this:

* :class:`EmbeddingMemory`: the table is an ``nn.Embedding(sparse=True)`` inside the
  model (training; the parameter is ``...engram.memory.weight``). The gather runs in
  ``result()`` on the caller's thread so autograd records it.
* :class:`StoreMemory`: the table lives in a tierstore store (device / host / disk tiers):
  any ``tierstore.RowStore``, a ``Store`` or a ``ShardedStore`` (every rank runs the model
  on its own inputs; the lookups are collective); ``fetch`` is ``store.prefetch``, which
  gathers on the store's threads while the model computes the layers before this one.

Both return float rows of shape ``ids.shape + (dim,)``; for the same weights they return
bit-identical values (the store copies rows, it never recomputes them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_model.errors import EngramConfigError

if TYPE_CHECKING:  # the model depends on the store only through this module
    import tierstore

__all__ = ["RowsFuture", "MemorySource", "EmbeddingMemory", "StoreMemory", "UnattachedMemory"]


class RowsFuture(Protocol):
    """What ``fetch`` returns: ``done()`` polls, ``result()`` waits and returns (..., dim) rows."""

    def done(self) -> bool: ...

    def result(self) -> torch.Tensor: ...


class _Deferred:
    """A future whose work runs (once) on the thread that calls ``result()``."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self._fn: Callable[[], torch.Tensor] | None = fn
        self._value: torch.Tensor | None = None

    def done(self) -> bool:
        return True  # nothing to wait for: the gather is a local index_select

    def result(self) -> torch.Tensor:
        if self._fn is not None:
            self._value, self._fn = self._fn(), None
        assert self._value is not None
        return self._value


class MemorySource(ABC):
    """Rows of one Engram layer's packed table (``rows`` x ``dim``)."""

    rows: int
    dim: int

    @abstractmethod
    def fetch(self, packed_ids: torch.Tensor) -> RowsFuture:
        """Start getting rows for int64 ``packed_ids`` (B, T, H); result is (B, T, H, dim)."""

    def lookup(self, packed_ids: torch.Tensor) -> torch.Tensor:
        """Blocking form of :meth:`fetch`."""
        return self.fetch(packed_ids).result()

    def announce(self, packed_ids: torch.Tensor) -> None:
        """Rows a later fetch will read (a queued request): a tiered source keeps them.
        In-memory sources have nothing to do."""


class EmbeddingMemory(nn.Embedding, MemorySource):
    """In-module table (training): ``nn.Embedding(rows, dim, sparse=True)``.

    Sparse gradients: a step touches only the B*T*H rows it read, so the optimizer
    (SparseAdam) updates those rows and not the whole multi-million-row table.
    """

    def __init__(self, rows: int, dim: int, init_std: float = 1.0, sparse: bool = True):
        super().__init__(rows, dim, sparse=sparse)
        self.rows, self.dim = rows, dim
        nn.init.normal_(self.weight, std=init_std)

    def fetch(self, packed_ids: torch.Tensor) -> RowsFuture:
        # ids come from the CPU hasher; a table on a GPU takes them there
        return _Deferred(lambda: F.embedding(packed_ids.to(self.weight.device), self.weight, sparse=self.sparse))


class UnattachedMemory(MemorySource):
    """Placeholder for a table that is not loaded (a model built with ``tables=False``, before
    ``attach_store``): it holds no rows, so building the model allocates nothing for them."""

    def __init__(self, rows: int, dim: int):
        self.rows, self.dim = rows, dim

    def fetch(self, packed_ids: torch.Tensor) -> RowsFuture:
        raise EngramConfigError("Engram table not loaded: call model.attach_store(store) or load the checkpoint tables")


class StoreMemory(nn.Module, MemorySource):
    """Rows served by a tierstore table (inference only: no gradients, no parameters), from
    any ``tierstore.RowStore``: ``tierstore.open(...)`` or ``tierstore.open_sharded(...)``.

    ``table`` is the store table name: the state-dict name of the parameter it replaces
    (e.g. ``blocks.1.engram.memory.weight``), or a DeepSeek-V4.1 table
    (``layers.1.engram.embed.weight``: fp8 rows with block scales, which the store returns
    dequantized to bfloat16; ``dim`` is then the dequantized width, 256).
    """

    def __init__(self, store: tierstore.RowStore, table: str, rows: int, dim: int, sync_below: int | None = None):
        super().__init__()
        # Requests of fewer ids than this are looked up in the caller's thread when the layer
        # asks for them, the rest prefetched: for a decode step's few dozen rows the hand-off to
        # a worker thread (and the GIL ping-pong while it runs) costs more than the lookup
        # itself. None: the store's own threshold, ``tierstore.INLINE_BELOW`` (the one
        # constant, measured in docs/benchmarks.md); 0 always prefetches.
        if sync_below is None:
            import tierstore

            sync_below = tierstore.INLINE_BELOW
        self.sync_below = sync_below
        if table not in store.tables:
            raise EngramConfigError(
                f"store has no table {table!r} (has {sorted(store.tables)}); was it built from this checkpoint?"
            )
        info = store.tables[table]
        if (info.rows, info.lookup_dim) != (rows, dim):  # lookup_dim: a quantized table's values per row
            raise EngramConfigError(
                f"store table {table!r} is {info.rows} x {info.lookup_dim} but the model expects {rows} x {dim}; "
                "rebuild the store from this checkpoint"
            )
        self.store, self.table, self.rows, self.dim = store, table, rows, dim

    def fetch(self, packed_ids: torch.Tensor) -> RowsFuture:
        if packed_ids.numel() < self.sync_below:
            return _Deferred(lambda: self.store.lookup(self.table, packed_ids))
        return self.store.prefetch(self.table, packed_ids)

    def announce(self, packed_ids: torch.Tensor) -> None:
        self.store.hint(self.table, packed_ids)

    def extra_repr(self) -> str:
        return f"table={self.table!r}, rows={self.rows}, dim={self.dim}"
