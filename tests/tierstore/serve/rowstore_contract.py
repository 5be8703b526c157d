"""The ``tierstore.RowStore`` contract as test functions, each ``check(store, ref, rng)``:
``test_rowstore.py`` runs the SAME functions against a ``Store`` (in the test process) and a
2-rank gloo ``ShardedStore`` (every rank runs every check, in order: the calls are
collective, each rank with its own ids). Every row is compared bit for bit with an
independent numpy oracle of the DeepSeek-V4.1 layout (``tests/v41.py``), so both stores
are bit-exact with it and so with each other; dtypes, shapes and the typed errors are
asserted the same way for both.

Not collected by pytest (no ``test_`` prefix): imported by the test module and by the ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import tierstore
from tierstore.format.quant import Quant

from ...conftest import bits
from ...v41 import oracle_bf16

VALUES = 256  # a V4.1 table's values per row after dequantization


@dataclass
class Ref:
    """What the rows must be: each table's stored bytes (values then scales), from the checkpoint."""

    stored: dict[str, np.ndarray]  # name -> uint8 (rows, row_bytes)
    quant: Quant

    def bf16(self, name: str, ids: np.ndarray) -> torch.Tensor:
        """The oracle's rows of ``ids`` (any shape) as bfloat16 ``ids.shape + (256,)``."""
        rows = self.stored[name][np.asarray(ids).reshape(-1)]
        vb = self.quant.value_bytes
        return oracle_bf16(rows[:, :vb], rows[:, vb:], self.quant).reshape(*np.shape(ids), VALUES)

    def raw(self, name: str, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.stored[name][np.asarray(ids).reshape(-1)]).reshape(
            *np.shape(ids), self.quant.row_bytes)


def _ids(ref: Ref, name: str, rng: np.random.Generator, shape: tuple[int, ...] = (2, 24)) -> np.ndarray:
    """Random ids with duplicates and both ends of the table (rows of every owner)."""
    rows = len(ref.stored[name])
    n = int(np.prod(shape))
    ids = rng.integers(0, rows, n)
    ids[:4] = [0, rows - 1, 0, rows - 1]
    return ids.reshape(shape)


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{what}: {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}"
    if want.numel():  # (an empty tensor's strides may not allow a byte view)
        assert torch.equal(bits(got), bits(want)), f"{what}: bytes differ from the oracle"


def check_protocol(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    assert isinstance(store, tierstore.RowStore)
    assert sorted(store.tables) == sorted(ref.stored)
    for name, info in store.tables.items():
        assert info.rows == len(ref.stored[name]), f"{name}: {info.rows} rows (global rows for a sharded store)"
        assert (info.dim, info.dtype, info.quant) == (ref.quant.row_bytes, "uint8", ref.quant)
        assert (info.lookup_dim, info.lookup_dtype) == (VALUES, torch.bfloat16)
    assert store.device == torch.device("cpu")


def check_lookup(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    for step in range(3):  # again and again: rows from every tier as they fill and evict
        for name in store.tables:
            ids = _ids(ref, name, rng)
            _same(store.lookup(name, ids), ref.bf16(name, ids), f"lookup {name} step {step}")
    name = next(iter(store.tables))
    for ids in ([5], np.array(7), torch.tensor([[3, 3], [1, 0]]), np.zeros(0, np.int64)):  # forms and shapes
        _same(store.lookup(name, ids), ref.bf16(name, np.asarray(ids)), f"lookup {name} of {ids!r}")


def check_raw(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    for name in store.tables:
        ids = _ids(ref, name, rng)
        _same(store.lookup(name, ids, raw=True), ref.raw(name, ids), f"lookup raw {name}")
        _same(store.prefetch(name, ids, raw=True).result(timeout=60), ref.raw(name, ids), f"prefetch raw {name}")
        _same(store.lookup(name, ids, raw=False), ref.bf16(name, ids), f"lookup raw=False {name}")


def _is_out(got: torch.Tensor, out: torch.Tensor) -> bool:
    """``got`` is ``out``'s memory with ``out``'s shape (``out`` itself, or a view of all of it)."""
    return got.data_ptr() == out.data_ptr() and got.shape == out.shape and got.dtype == out.dtype


def check_out(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    name = next(iter(store.tables))
    ids = _ids(ref, name, rng)
    out = torch.full(ids.shape + (VALUES,), 7.0, dtype=torch.bfloat16)
    assert _is_out(store.lookup(name, ids, out=out), out)
    _same(out, ref.bf16(name, ids), "lookup out=")
    out = torch.full(ids.shape + (VALUES,), 7.0, dtype=torch.bfloat16)
    assert _is_out(store.prefetch(name, ids, out=out).result(timeout=60), out)
    _same(out, ref.bf16(name, ids), "prefetch out=")
    raw_out = torch.zeros(ids.shape + (ref.quant.row_bytes,), dtype=torch.uint8)
    assert _is_out(store.lookup(name, ids, out=raw_out, raw=True), raw_out)
    _same(raw_out, ref.raw(name, ids), "lookup out= raw=True")
    bad = {"stored dtype without raw": torch.empty(ids.shape + (ref.quant.row_bytes,), dtype=torch.uint8),
           "shape": torch.empty((1, VALUES), dtype=torch.bfloat16),
           "dtype": torch.empty(ids.shape + (VALUES,), dtype=torch.float32),
           "strided": torch.empty(ids.shape + (2 * VALUES,), dtype=torch.bfloat16)[..., ::2]}
    for what, t in bad.items():
        with pytest.raises(tierstore.TierStoreError, match=r"out= must be a contiguous torch\.bfloat16"):
            store.lookup(name, ids, out=t)
        with pytest.raises(tierstore.TierStoreError, match="out= must be"):
            store.prefetch(name, ids, out=t)
    _same(store.lookup(name, ids), ref.bf16(name, ids), "lookup after bad out=")


def check_prefetch(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    futs = []
    for name in store.tables:  # several in flight at once, waited for in order
        for shape in ((3, 5), (2000,)):  # small (may finish inline) and large (a worker)
            ids = _ids(ref, name, rng, shape)
            futs.append((name, ids, store.prefetch(name, ids)))
    for name, ids, fut in futs:
        assert isinstance(fut, tierstore.LookupFuture)
        got = fut.result(timeout=60)
        assert fut.done()
        _same(got, ref.bf16(name, ids), f"prefetch {name} {ids.shape}")


def check_prefetch_many(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    names = sorted(store.tables, reverse=True)
    reqs = {name: _ids(ref, name, rng, (k + 2, 3)) for k, name in enumerate(names)}
    got = store.prefetch_many(reqs).result(timeout=60)
    assert list(got) == names
    for name in names:
        _same(got[name], ref.bf16(name, reqs[name]), f"prefetch_many {name}")
    assert store.prefetch_many({}).result(timeout=60) == {}


def check_hint(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    for name in store.tables:
        ids = _ids(ref, name, rng)
        assert store.hint(name, ids[:, :5]) is None  # the next step's rows
        _same(store.lookup(name, ids), ref.bf16(name, ids), f"lookup of hinted rows of {name}")
        store.hint(name, np.zeros(0, np.int64))


def _calls(store: tierstore.RowStore) -> dict[str, Callable[[str, object], object]]:
    """Every entry point that takes a table and ids, each as (table, ids) -> whatever it returns."""
    return {"lookup": lambda t, i: store.lookup(t, i),
            "prefetch": lambda t, i: store.prefetch(t, i),
            "prefetch_many": lambda t, i: store.prefetch_many({t: i}),
            "hint": lambda t, i: store.hint(t, i)}


def check_errors(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    """The same mistakes raise the same typed errors at the call (a sharded store's peers,
    making the same bad call, raise theirs too; the next call is in step)."""
    name = next(iter(store.tables))
    rows = len(ref.stored[name])
    cases = [([0, rows], tierstore.InvalidIdError, IndexError, rf"id {rows} at flat position 1"),
             ([-1], tierstore.InvalidIdError, IndexError, "id -1"),
             ([1.5], tierstore.IdTypeError, TypeError, "float"),
             (["3"], tierstore.IdTypeError, TypeError, None)]
    for call, fn in _calls(store).items():
        for ids, cls, builtin, match in cases:
            with pytest.raises(cls, match=match) as e:
                fn(name, ids)
            assert isinstance(e.value, builtin), f"{call}: {type(e.value).__mro__}"
        with pytest.raises(tierstore.UnknownTableError, match="no.such") as e:
            fn("no.such.table", [1])
        assert isinstance(e.value, KeyError)
    for raw in ("yes", None, 2):
        with pytest.raises(tierstore.TierStoreError, match="raw="):
            store.lookup(name, [1], raw=raw)  # type: ignore[arg-type]
        with pytest.raises(tierstore.TierStoreError, match="raw="):
            store.prefetch(name, [1], raw=raw)  # type: ignore[arg-type]
    with pytest.raises(tierstore.TierStoreError, match="must be a mapping"):
        store.prefetch_many([(name, [1])])  # type: ignore[arg-type]
    ids = _ids(ref, name, rng)
    _same(store.lookup(name, ids), ref.bf16(name, ids), "lookup after the errors")


def check_stats(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    store.reset_stats()
    s = store.stats()
    assert {"device", "host", "disk", "latency", "tables"} <= set(s)
    assert s["device"]["hits"] + s["device"]["misses"] == 0
    for name in store.tables:
        store.lookup(name, _ids(ref, name, rng, (64,)))
    s = store.stats()
    assert s["device"]["hits"] + s["device"]["misses"] > 0  # a sharded rank: the rows it served
    assert sorted(s["tables"]) == sorted(store.tables)


def check_close(store: tierstore.RowStore, ref: Ref, rng: np.random.Generator) -> None:
    """Last: the context manager closes the store; every call then raises StoreClosedError."""
    name = next(iter(store.tables))
    with store as entered:
        assert entered is store
        _same(store.lookup(name, [1, 2]), ref.bf16(name, np.array([1, 2])), "lookup in the with block")
    for call, fn in _calls(store).items():
        with pytest.raises(tierstore.StoreClosedError):
            fn(name, [1])
    store.close()  # idempotent


CHECKS = [check_protocol, check_lookup, check_raw, check_out, check_prefetch, check_prefetch_many, check_hint,
          check_errors, check_stats, check_close]
