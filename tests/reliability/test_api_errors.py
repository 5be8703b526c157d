"""Every bad input at the public API raises a typed error: a ``TierStoreError`` subclass,
and also the matching builtin where ``tierstore.errors`` says so (``IdTypeError`` is a
``TypeError``, ``InvalidIdError`` an ``IndexError``, ``BudgetError`` a ``ValueError``).
The messages name the offending value."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tierstore.serve.store import INLINE_BELOW
from tierstore import BudgetError, IdTypeError, InvalidIdError, TierStoreError

T1 = "blocks.1.engram.memory.weight"  # 5003 rows x 64 float32 (tests/conftest.py small_ckpt)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store_path(tmp_path, small_ckpt) -> Path:
    ckpt, _ = small_ckpt
    return tierstore.build_store(ckpt, tmp_path / "store", progress=False)


@pytest.fixture
def store(store_path):
    with tierstore.open(store_path, device="cpu", device_budget="16KiB", host_budget="64KiB") as s:
        yield s


# ---------------------------------------------------------------------------------------
# open()
# ---------------------------------------------------------------------------------------
def test_open_none():
    with pytest.raises(TierStoreError):
        tierstore.open(None)  # type: ignore[arg-type]


def test_open_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not a store")
    with pytest.raises(TierStoreError, match="not a directory"):
        tierstore.open(f)


def test_open_missing_dir(tmp_path):
    with pytest.raises(TierStoreError, match="missing"):
        tierstore.open(tmp_path / "missing")


@pytest.mark.parametrize("budget", [float("inf"), "1e400", -1, "abc", float("nan"), "inf", True],
                         ids=["float_inf", "str_1e400", "minus_1", "str_abc", "nan", "str_inf", "True"])
@pytest.mark.parametrize("which", ["host_budget", "device_budget"])
def test_bad_budget(store_path, which, budget):
    with pytest.raises(BudgetError, match=which) as e:
        tierstore.open(store_path, device="cpu", **{which: budget})
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("device", ["meta", "nonsense", "cuda:banana", 3.5])
def test_bad_device(store_path, device):
    with pytest.raises(TierStoreError, match=re.escape(str(device))):
        tierstore.open(store_path, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_cuda(store_path):
    with pytest.raises(TierStoreError, match="CUDA"):
        tierstore.open(store_path, device="cuda")


@pytest.mark.parametrize("kw", [dict(threads="4"), dict(threads=0), dict(threads=-2), dict(threads=2.5),
                                dict(io_threads=0), dict(io_threads="2"), dict(io_threads=-1),
                                dict(policy="nope"), dict(policy=None)],
                         ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_bad_options(store_path, kw):
    with pytest.raises(TierStoreError, match=next(iter(kw))):
        tierstore.open(store_path, device="cpu", device_budget="16KiB", host_budget="64KiB", **kw)


# ---------------------------------------------------------------------------------------
# ids
# ---------------------------------------------------------------------------------------
BAD_IDS = {
    "ragged": [[1, 2], [3]],
    "sparse": torch.tensor([[0, 1, 0], [2, 0, 3]]).to_sparse(),
    "float_list": [1.0, 2.0],
    "float_tensor": torch.tensor([1.0, 2.0]),
    "float_numpy": np.array([1.5]),
    "bool_tensor": torch.tensor([True, False]),
    "bool_numpy": np.array([True]),
    "bool_list": [True, False],
    "string": "12",
    "string_list": ["1", "2"],
    "string_numpy": np.array(["a"]),
    "none": None,
    "object": [object()],
    "dict": {1: 2},
    "complex": np.array([1 + 2j]),
    "bits_tensor": torch.zeros(2, dtype=torch.bits8),
}


@pytest.mark.parametrize("call", ["lookup", "prefetch", "prefetch_many"])
@pytest.mark.parametrize("kind", list(BAD_IDS))
def test_bad_id_types(store, kind, call):
    ids = BAD_IDS[kind]
    with pytest.raises(IdTypeError) as e:
        if call == "lookup":
            store.lookup(T1, ids)
        elif call == "prefetch":
            store.prefetch(T1, ids).result(timeout=30)
        else:
            store.prefetch_many({T1: ids}).result(timeout=30)
    assert isinstance(e.value, TypeError)


@pytest.mark.parametrize("call", ["lookup", "prefetch", "prefetch_many", "hint"])
def test_nested_tensor_ids_are_an_id_type_error(store, call):
    """A torch.nested tensor of ids raised RuntimeError ("NestedTensorImpl doesn't support
    sizes") from deep in the conversion; it is a caller mistake like any other id type."""
    with warnings.catch_warnings():  # torch warns (once per process) that nested tensors are a prototype
        warnings.simplefilter("ignore", UserWarning)
        ids = torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])])
    with pytest.raises(IdTypeError, match="nested tensor.*dense integer tensor") as e:
        if call == "prefetch_many":
            store.prefetch_many({T1: ids}).result(timeout=30)
        elif call == "prefetch":
            store.prefetch(T1, ids).result(timeout=30)
        else:
            getattr(store, call)(T1, ids)
    assert isinstance(e.value, TypeError)


NOT_A_NAME = {"list": [T1], "tuple": (T1,), "int": 1, "none": None, "bytes": T1.encode(),
              "tensor": torch.tensor([1, 2])}


@pytest.mark.parametrize("call", ["lookup", "prefetch", "prefetch_many", "hint"])
@pytest.mark.parametrize("kind", list(NOT_A_NAME))
def test_table_name_that_is_no_str_is_an_unknown_table(store, kind, call):
    """A list (or any non-str) as the table name raised a bare TypeError (unhashable) or a
    KeyError: every entry point that takes a name goes through one check naming the value."""
    name = NOT_A_NAME[kind]
    if call == "prefetch_many" and kind in ("list",):
        pytest.skip("a list cannot be a dict key")
    with pytest.raises(tierstore.UnknownTableError,
                       match=rf"a table name is a str, not {type(name).__name__} .*tables: .*{re.escape(T1)}") as e:
        if call == "prefetch_many":
            store.prefetch_many({name: [1, 2]})
        else:
            getattr(store, call)(name, [1, 2])
    assert isinstance(e.value, KeyError)


@pytest.mark.parametrize("form", ["numpy", "torch"])
def test_uint64_ids_above_int64_show_their_value(store, form):
    big = 2**63 + 5
    ids = np.array([1, big], dtype=np.uint64)
    if form == "torch":
        ids = torch.from_numpy(ids.view(np.int64)).view(torch.uint64) if hasattr(torch, "uint64") else ids
    with pytest.raises(InvalidIdError, match=rf"id {big} at flat position 1") as e:
        store.lookup(T1, ids)
    assert "-1" not in str(e.value).split("valid")[0], str(e.value)


@pytest.mark.parametrize("ids,value,pos", [([0, 1, 5003], 5003, 2), ([[3, -1]], -1, 1),
                                           (np.array([7, 2**40]), 2**40, 1),
                                           (torch.tensor([[1, 2], [9999, 0]]), 9999, 2)])
@pytest.mark.parametrize("call", ["lookup", "prefetch", "prefetch_many"])
def test_out_of_range_names_value_and_position(store, ids, value, pos, call):
    with pytest.raises(InvalidIdError, match=rf"id {value} at flat position {pos}\b.*5003 rows") as e:
        if call == "lookup":
            store.lookup(T1, ids)
        elif call == "prefetch":
            store.prefetch(T1, ids)  # bad ids raise at the call, not from result()
        else:
            store.prefetch_many({T1: ids})
    assert isinstance(e.value, IndexError)


# ---------------------------------------------------------------------------------------
# futures
# ---------------------------------------------------------------------------------------
def big(ids: list[int]) -> np.ndarray:
    """``ids`` padded to INLINE_BELOW + 1 ids: a prefetch that runs on a worker thread."""
    return np.resize(np.asarray(ids, dtype=np.int64), INLINE_BELOW + 1)


def _hold(store: tierstore.Store, name: str) -> threading.Event:
    """Make background jobs on ``name`` wait for the returned event (a deterministic "slow"
    future): the job's first step is the table's gather. Only requests of more than
    INLINE_BELOW ids are sure to run on a worker (``big``); smaller ones may finish inline."""
    gate = threading.Event()
    table = store._tables[name]
    gather = table.gather

    def held(ids: np.ndarray, out: torch.Tensor) -> None:
        gate.wait(30)
        gather(ids, out)

    table.gather = held  # type: ignore[method-assign]
    return gate


def test_result_timeout_is_a_timeout_error(store):
    gate = _hold(store, T1)
    try:
        fut = store.prefetch(T1, big([1, 2, 3]))
        with pytest.raises(TierStoreError, match="timeout") as e:
            fut.result(timeout=0.000001)
        assert isinstance(e.value, TimeoutError), f"{type(e.value).__mro__} is not a TimeoutError"
    finally:
        gate.set()
    assert fut.result(timeout=30).shape == (INLINE_BELOW + 1, 64)  # the future is still good afterwards


def test_cancelled_future_says_so(store_path):
    store = tierstore.open(store_path, device="cpu", threads=1)
    gate = _hold(store, T1)
    first = store.prefetch(T1, big([1]))  # occupies the only worker
    queued = store.prefetch(T1, big([2]))  # waits behind it; close() cancels it
    closer = threading.Thread(target=store.close, daemon=True)
    closer.start()
    closer.join(0.2)
    gate.set()
    closer.join(30)
    assert not closer.is_alive(), "close() hung"
    first.result(timeout=30)
    with pytest.raises(TierStoreError, match=r"(?i)\bcancell?ed\b"):
        queued.result(timeout=30)


def test_prefetch_after_close(store_path):
    store = tierstore.open(store_path, device="cpu")
    store.close()
    for call in (lambda: store.prefetch(T1, [1]), lambda: store.prefetch_many({T1: [1]}),
                 lambda: store.lookup(T1, [1])):
        with pytest.raises(TierStoreError, match="closed"):
            call()


# ---------------------------------------------------------------------------------------
# CLI: profile --save-profile into a store that cannot be written
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["read_only", "profiles_is_a_file"])
def test_save_profile_into_unwritable_store(small_ckpt, tmp_path, how):
    trace = tmp_path / "trace.npy"
    np.save(trace, np.random.default_rng(0).integers(0, 1201, size=500).astype(np.int64))
    # a one-table store, so a plain .npy trace maps onto its table
    one = tierstore.build_store(small_ckpt[0], tmp_path / "one", tables=r"blocks\.3\.", progress=False)
    if how == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        os.chmod(one, 0o555)
    else:
        (one / "profiles").write_text("in the way")
    try:
        p = subprocess.run([sys.executable, "-m", "tierstore_cli.cli", "profile", "--trace", str(trace), "--store", str(one),
                            "--save-profile"], cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(one, 0o755)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, \
        f"exit {p.returncode}, stderr:\n{p.stderr[-1500:]}"
    assert lines[0].startswith("tierstore profile: error:"), lines[0]
