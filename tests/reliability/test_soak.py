"""Differential soak: every row the store returns equals the checkpoint's, bit for bit.

Small stores built from a real safetensors checkpoint are driven by 1 or 4 caller threads
with Zipf-skewed random ids (so caches admit and evict all the time) through ``lookup``,
``prefetch(...).result()`` and ``prefetch_many``, over the matrix

    row width  4 B, 20 B (not a multiple of 8), 1 KiB, 6000 B (> one 4 KiB page),
               12000 B and 64 KiB (several pages)
    dtype      float32, bfloat16, float8_e4m3fn
    budgets    resident, tiny device+host, device only, host only, zero (disk only),
               shared host (POSIX shared memory) holding the whole table
    policy     every registered policy (where a cache exists for it to run)

and compared with the checkpoint tensor indexed by the same ids, as raw bytes (NaN-safe).
Results the caller keeps are compared again later (a pooled buffer must never be reused
under them). ``close()`` is raced against in-flight calls: each either returns exact rows
or raises a ``TierStoreError``.

Duration: the default matrix takes about a minute on 2 cores; ``TIERSTORE_SOAK_SECONDS=600``
makes ``test_soak_for_a_while`` (marked slow) draw random cases for that long.
"""

from __future__ import annotations

import os
import re
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tierstore
from tierstore import TierStoreError
from tierstore.cache import policy_names

from .conftest import SOAK, soak_add

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them

WIDTHS = [4, 20, 1024, 6000, 12000, 65536]  # bytes per row
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}
BUDGETS = ["resident", "tiny", "device_only", "host_only", "zero", "shared"]
CACHED = {"tiny", "device_only", "host_only"}  # budgets under which the policy decides
POLICIES = policy_names()
TIMEOUT = 60.0  # seconds any single result() may take before the test calls it a hang
SOAK_SECONDS = float(os.environ.get("TIERSTORE_SOAK_SECONDS", "3"))


def table_name(width: int, dtype: str) -> str:
    return f"soak.w{width}.{dtype}.weight"


def n_rows(width: int) -> int:
    """~512 KiB per table: narrow tables span several pages, wide ones still have 48 rows."""
    return int(np.clip(512 * 1024 // width, 48, 2000))


@dataclass
class Case:
    store: Path
    name: str
    ref: torch.Tensor  # (rows, row_bytes) uint8: the checkpoint's rows as bytes
    width: int
    dtype: str

    @property
    def rows(self) -> int:
        return self.ref.shape[0]


@pytest.fixture(scope="module")
def soak_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], Case]:
    """One checkpoint with a table per (width, dtype); one store per table (``tables=`` regex),
    so a budget in rows is exact; plus ``all``: one store holding every table."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("soak")
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    for w in WIDTHS:
        for dn, dt in DTYPES.items():
            dim = w // torch.tensor([], dtype=dt).element_size()
            t = torch.randn(n_rows(w), dim, generator=g) * 0.5
            tensors[table_name(w, dn)] = t.to(dt)
    ckpt = d / "model.safetensors"
    save_file(tensors, str(ckpt))
    cases: dict = {}
    for (w, dn) in ((w, dn) for w in WIDTHS for dn in DTYPES):
        name = table_name(w, dn)
        path = tierstore.build_store(ckpt, d / f"store-{w}-{dn}", tables=f"^{re.escape(name)}$", progress=False)
        cases[(w, dn)] = Case(path, name, tensors[name].view(torch.uint8), w, dn)
    all_path = tierstore.build_store(ckpt, d / "store-all", tables=r"^soak\.", progress=False)
    cases["all"] = {n: t.view(torch.uint8) for n, t in tensors.items()}, all_path
    return cases


def open_kwargs(budget: str, case_rows: int, row_bytes: int) -> dict:
    """Store keyword arguments for a named budget, in rows of this table."""
    rb = row_bytes
    return {
        "resident": dict(device_budget=case_rows * rb, host_budget=case_rows * rb),
        "tiny": dict(device_budget=3 * rb, host_budget=5 * rb),
        "device_only": dict(device_budget=max(2, case_rows // 5) * rb, host_budget=0),
        "host_only": dict(device_budget=0, host_budget=max(2, case_rows // 5) * rb),
        "zero": dict(device_budget=0, host_budget=0),
        "shared": dict(device_budget=2 * rb, host_budget=case_rows * rb, host_shared=True),
    }[budget]


def zipf_ids(rng: np.random.Generator, rows: int, perm: np.ndarray) -> np.ndarray:
    """A batch of skewed ids: Zipf ranks mapped through a fixed permutation (hot rows spread
    over pages), a uniform tail, sometimes 2-D, in one of several integer forms."""
    n = int(rng.integers(1, 48))
    ranks = (rng.zipf(1.3, size=n) - 1) % rows
    ids = perm[ranks]
    cold = rng.random(n) < 0.2
    ids[cold] = rng.integers(0, rows, size=int(cold.sum()))
    if n % 2 == 0 and rng.random() < 0.3:
        ids = ids.reshape(2, n // 2)
    return ids


def as_form(ids: np.ndarray, rng: np.random.Generator):
    form = int(rng.integers(4))
    if form == 0:
        return ids.astype(np.int64)
    if form == 1:
        return torch.from_numpy(ids.astype(np.int64))
    if form == 2:
        return ids.astype(np.int32)
    return ids.tolist()


def wrong_rows(got: torch.Tensor, ref: torch.Tensor, ids: np.ndarray) -> int:
    """Rows of ``got`` whose bytes differ from the reference rows ``ids`` (shape included)."""
    want = ref[torch.from_numpy(ids.reshape(-1).astype(np.int64))]
    got_b = got.detach().cpu().contiguous()
    if tuple(got_b.shape[:-1]) != tuple(ids.shape) or got_b.numel() * got_b.element_size() != want.numel():
        return ids.size or 1
    got_b = got_b.view(torch.uint8).reshape(want.shape)
    return int((got_b != want).any(dim=1).sum())


def where(case_label: str, policy: str, budget: str, width: int) -> str:
    return f"table {case_label}, policy {policy}, budget {budget}, width {width} B"


def drive(store: tierstore.Store, name: str, ref: torch.Tensor, *, seed: int, ops: int,
          label: str) -> tuple[int, int, int, list[tuple[bool, str]]]:
    """One caller thread: ``ops`` random lookups, prefetches and prefetch_many calls; returns
    (lookups, rows compared, wrong rows, errors). Keeps a few results and checks them again
    at the end (a pooled buffer reused under a caller would change them)."""
    rng = np.random.default_rng(seed)
    rows = ref.shape[0]
    perm = np.random.default_rng(7).permutation(rows)
    kept: list[tuple[torch.Tensor, np.ndarray]] = []
    looked = compared = wrong = 0
    errors: list[tuple[bool, str]] = []  # (typed, message)
    pending: list[tuple[tierstore.LookupFuture, np.ndarray]] = []
    for _ in range(ops):
        ids = zipf_ids(rng, rows, perm)
        kind = int(rng.integers(4))
        try:
            if kind == 0:
                got = store.lookup(name, as_form(ids, rng))
            elif kind == 1:
                got = store.prefetch(name, as_form(ids, rng)).result(timeout=TIMEOUT)
            elif kind == 2:
                got = store.prefetch_many({name: as_form(ids, rng)}).result(timeout=TIMEOUT)[name]
            else:  # several in flight at once, collected later
                pending.append((store.prefetch(name, as_form(ids, rng)), ids))
                if len(pending) < 3:
                    continue
                fut, ids = pending.pop(0)
                got = fut.result(timeout=TIMEOUT)
        except Exception as e:  # noqa: BLE001 - every error is a finding here, typed or not
            errors.append((isinstance(e, TierStoreError), f"{label}: {type(e).__name__}: {e}"))
            continue
        looked += 1
        compared += ids.size
        wrong += wrong_rows(got, ref, ids)
        if rng.random() < 0.1:
            kept.append((got, ids))
    for fut, ids in pending:
        try:
            got = fut.result(timeout=TIMEOUT)
        except Exception as e:  # noqa: BLE001
            errors.append((isinstance(e, TierStoreError), f"{label}: {type(e).__name__}: {e}"))
            continue
        looked += 1
        compared += ids.size
        wrong += wrong_rows(got, ref, ids)
    for got, ids in kept:  # results the caller still holds must not have changed
        wrong += wrong_rows(got, ref, ids)
    return looked, compared, wrong, errors


def soak_one(case: Case, budget: str, policy: str, threads: int, *, ops: int, seed: int) -> None:
    label = where(case.name, policy, budget, case.width)
    kw = open_kwargs(budget, case.rows, case.ref.shape[1])
    t0 = time.perf_counter()
    with tierstore.open(case.store, policy=policy, threads=threads, **kw) as store:
        if threads == 1:
            results = [drive(store, case.name, case.ref, seed=seed, ops=ops, label=label)]
        else:
            with ThreadPoolExecutor(threads) as ex:
                futs = [ex.submit(drive, store, case.name, case.ref, seed=seed * 10 + i, ops=ops // threads + 1,
                                  label=label) for i in range(threads)]
                results = [f.result(timeout=10 * TIMEOUT) for f in futs]
    looked = sum(r[0] for r in results)
    compared = sum(r[1] for r in results)
    wrong = sum(r[2] for r in results)
    errors = [e for r in results for e in r[3]]
    untyped = sum(1 for typed, _ in errors if not typed)
    soak_add(lookups=looked, rows=compared, wrong_rows=wrong, untyped_errors=untyped,
             seconds=time.perf_counter() - t0)
    assert not errors, f"{label}, threads {threads}: {len(errors)} errors, first: {errors[0][1]}"
    assert wrong == 0, f"{label}, threads {threads}: {wrong} wrong rows of {compared} compared"


def _plan(budget: str) -> list[tuple[str, int]]:
    """(policy, threads) runs for a budget: every policy where a cache exists, with both
    thread counts spread over them; one policy otherwise (nothing for it to decide)."""
    if budget in CACHED:
        return [(p, 1 if i % 2 == 0 else 4) for i, p in enumerate(POLICIES)] + [(POLICIES[-1], 1)]
    return [("lru", 1), ("default", 4)]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("width", WIDTHS)
def test_soak_matches_checkpoint(soak_stores, width, dtype, budget):
    case = soak_stores[(width, dtype)]
    failures = []
    for i, (policy, threads) in enumerate(_plan(budget)):
        try:
            soak_one(case, budget, policy, threads, ops=24, seed=zlib.crc32(f"{width}/{dtype}/{budget}/{i}".encode()))
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 - open() itself failing is a finding too
            failures.append(f"{where(case.name, policy, budget, width)}: open/close raised "
                            f"{type(e).__name__}: {e}")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("budget", ["resident", "tiny", "zero", "host_only"])
def test_soak_prefetch_many_over_all_tables(soak_stores, budget):
    """One store with every table: prefetch_many reads all of them at once; budgets split
    over the tables in proportion to their size."""
    refs, path = soak_stores["all"]
    total = sum(r.numel() for r in refs.values())
    kw = {"resident": dict(device_budget=total, host_budget=total),
          "tiny": dict(device_budget=total // 100, host_budget=total // 50),
          "zero": dict(device_budget=0, host_budget=0),
          "host_only": dict(device_budget=0, host_budget=total // 4)}[budget]
    rng = np.random.default_rng(5)
    perms = {n: np.random.default_rng(7).permutation(r.shape[0]) for n, r in refs.items()}
    looked = compared = wrong = 0
    bad: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        store = tierstore.open(path, policy="default", threads=4, **kw)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"all tables, policy default, budget {budget}: open raised {type(e).__name__}: {e}")
    with store:
        futs = []
        for _ in range(12):
            req = {n: zipf_ids(rng, r.shape[0], perms[n]) for n, r in refs.items()}
            futs.append((store.prefetch_many({n: torch.from_numpy(i.astype(np.int64)) for n, i in req.items()}), req))
        for fut, req in futs:
            try:
                got = fut.result(timeout=TIMEOUT)
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"all tables (widths {WIDTHS} B), policy default, budget {budget}: prefetch_many "
                            f"raised {type(e).__name__}: {e}")
            for n, ids in req.items():
                w = wrong_rows(got[n], refs[n], ids)
                looked += 1
                compared += ids.size
                wrong += w
                if w:
                    bad[n] = bad.get(n, 0) + w
    soak_add(lookups=looked, rows=compared, wrong_rows=wrong, seconds=time.perf_counter() - t0)
    assert not bad, "; ".join(f"table {n}, policy default, budget {budget}: {w} wrong rows" for n, w in bad.items())


# ---------------------------------------------------------------------------------------
# prefetch must copy the ids at the call
# ---------------------------------------------------------------------------------------
def _hold_worker(store: tierstore.Store, name: str) -> Callable[[], None]:
    """Make the store's background work for ``name`` wait until the returned ``release()``
    is called, so the test can change the caller's id buffer while the job is certainly
    still pending. The gate sits where a worker moves bytes: ``Table.complete`` (a small
    prefetch did its bookkeeping in the caller's thread and hands the rest to a worker) and
    ``Table.gather`` (a large or multi-table prefetch's whole lookup). Policy hints are no
    place for it: they run only in ``Store.hint``, in the caller's thread. Calls from the
    caller's own thread pass the gate (they finish before ``prefetch`` returns)."""
    gate = threading.Event()
    table = store._tables[name]
    caller = threading.get_ident()

    def held(method: Callable[..., Any]) -> Callable[..., Any]:
        def wait_then_call(*args: Any) -> Any:
            if threading.get_ident() != caller:
                gate.wait(TIMEOUT)
            return method(*args)
        return wait_then_call

    table.complete = held(table.complete)  # type: ignore[method-assign]
    table.gather = held(table.gather)  # type: ignore[method-assign]

    def release() -> None:
        gate.set()
        del table.complete, table.gather  # back to the class's methods

    return release


@pytest.mark.parametrize("form", ["numpy_int64", "numpy_int32", "torch_long", "torch_int32"])
@pytest.mark.parametrize("width", [20, 1024])  # within a page: this test is about the ids only
def test_prefetch_ids_are_copied_at_the_call(soak_stores, width, form):
    case = soak_stores[(width, "float32")]
    rng = np.random.default_rng(width)
    original = rng.integers(0, case.rows, size=40)
    other = (original + 1 + rng.integers(0, case.rows - 1, size=40)) % case.rows
    make = {"numpy_int64": lambda a: a.astype(np.int64), "numpy_int32": lambda a: a.astype(np.int32),
            "torch_long": lambda a: torch.from_numpy(a.astype(np.int64)),
            "torch_int32": lambda a: torch.from_numpy(a.astype(np.int32))}[form]
    with tierstore.open(case.store, policy="lru", threads=1, device_budget=3 * case.ref.shape[1]) as store:
        for kind in ("prefetch", "prefetch_many"):
            buf = make(original)
            release = _hold_worker(store, case.name)
            fut = (store.prefetch(case.name, buf) if kind == "prefetch"
                   else store.prefetch_many({case.name: buf}))
            assert not fut.done(), "the job finished before the ids changed: the test would prove nothing"
            buf[:] = make(other)[:]  # the serving loop refills its id buffer at once
            buf[3] = -1  # and writes an id that would be out of range
            release()
            got = fut.result(timeout=TIMEOUT)
            got = got[case.name] if kind == "prefetch_many" else got
            w = wrong_rows(got, case.ref, original)
            assert w == 0, (f"{kind} read the caller's ids after returning: {where(case.name, 'lru', 'tiny', width)}, "
                            f"ids as {form}: {w} of 40 rows are not those of the ids at the call")


# ---------------------------------------------------------------------------------------
# close() racing in-flight calls
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["prefetch", "prefetch_many", "lookup"])
@pytest.mark.parametrize("budget", ["zero", "tiny"])
def test_close_races_in_flight_calls(soak_stores, op, budget):
    """Callers keep issuing while another thread closes the store: each call returns the exact
    rows or raises a TierStoreError (at the call or from result()); nothing hangs."""
    case = soak_stores[(1024, "bfloat16")]
    outcomes = {"exact": 0, "typed": 0}
    findings: list[str] = []
    lock = threading.Lock()
    for rep in range(12):
        store = tierstore.open(case.store, policy="default", threads=4,
                               **open_kwargs(budget, case.rows, case.ref.shape[1]))
        started = threading.Barrier(4)

        def caller(seed: int) -> None:
            rng = np.random.default_rng(seed)
            perm = np.arange(case.rows)
            started.wait(TIMEOUT)
            for _ in range(60):
                ids = zipf_ids(rng, case.rows, perm)
                try:
                    if op == "prefetch":
                        got = store.prefetch(case.name, ids).result(timeout=TIMEOUT)
                    elif op == "prefetch_many":
                        got = store.prefetch_many({case.name: ids}).result(timeout=TIMEOUT)[case.name]
                    else:
                        got = store.lookup(case.name, ids)
                except TierStoreError:
                    with lock:
                        outcomes["typed"] += 1
                    continue
                except BaseException as e:  # noqa: BLE001 - the finding
                    with lock:
                        findings.append(f"{op}: {type(e).__name__}: {e}")
                    continue
                w = wrong_rows(got, case.ref, ids)
                with lock:
                    if w:
                        findings.append(f"{op}: {w} wrong rows")
                    else:
                        outcomes["exact"] += 1

        threads = [threading.Thread(target=caller, args=(rep * 10 + i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        started.wait(TIMEOUT)
        time.sleep(0.001 * (rep % 6))
        closer = threading.Thread(target=store.close, daemon=True)
        closer.start()
        closer.join(TIMEOUT)
        assert not closer.is_alive(), f"close() hung with {op} calls in flight"
        for t in threads:
            t.join(TIMEOUT)
            assert not t.is_alive(), f"a {op} call hung after close()"
    soak_add(untyped_errors=sum(1 for f in findings if "wrong rows" not in f),
             wrong_rows=sum(int(f.split()[1]) for f in findings if "wrong rows" in f))
    assert not findings, (f"table {case.name}, budget {budget}: {len(findings)} calls neither exact nor "
                          f"TierStoreError while close() ran; first: {findings[0]}")
    assert outcomes["typed"] > 0, "close() never overlapped a call: the race was not exercised"


@pytest.mark.parametrize("op", ["prefetch", "prefetch_many"])
def test_close_between_validation_and_submit(soak_stores, op):
    """The narrowest window of that race, made certain: the call has validated its ids and
    close() completes before the job is handed to the workers. The call must raise a
    TierStoreError (the store is closed), not the executor's RuntimeError."""
    case = soak_stores[(20, "float32")]
    store = tierstore.open(case.store, policy="lru", threads=2)
    prepare = store._prepare
    closed = threading.Event()

    def prepare_then_close(*args, **kwargs):
        out = prepare(*args, **kwargs)
        closer = threading.Thread(target=lambda: (store.close(), closed.set()), daemon=True)
        closer.start()
        assert closed.wait(TIMEOUT), "close() hung with no job in flight"
        return out

    store._prepare = prepare_then_close  # type: ignore[method-assign]
    try:
        with pytest.raises(TierStoreError, match="closed"):
            if op == "prefetch":
                store.prefetch(case.name, [1, 2, 3]).result(timeout=TIMEOUT)
            else:
                store.prefetch_many({case.name: [1, 2, 3]}).result(timeout=TIMEOUT)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------
# longer run
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_soak_for_a_while(soak_stores):
    """Random (width, dtype, budget, policy, threads) cases for TIERSTORE_SOAK_SECONDS
    (default 3 s), then the one-line summary of the whole run."""
    rng = np.random.default_rng(int(os.environ.get("TIERSTORE_SOAK_SEED", "0")))
    deadline = time.monotonic() + SOAK_SECONDS
    failures: list[str] = []
    runs = 0
    while time.monotonic() < deadline and len(failures) < 20:
        w = WIDTHS[int(rng.integers(len(WIDTHS)))]
        dn = list(DTYPES)[int(rng.integers(len(DTYPES)))]
        budget = BUDGETS[int(rng.integers(len(BUDGETS)))]
        policy = POLICIES[int(rng.integers(len(POLICIES)))]
        threads = int(rng.choice([1, 4]))
        try:
            soak_one(soak_stores[(w, dn)], budget, policy, threads, ops=40, seed=int(rng.integers(2**31)))
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
        except Exception as e:  # noqa: BLE001 - open() or close() failing
            failures.append(f"{where(table_name(w, dn), policy, budget, w)}, threads {threads}: "
                            f"open/close raised {type(e).__name__}: {e}")
        runs += 1
    print(f"soak: {SOAK['lookups']:,} lookups compared ({SOAK['rows']:,} rows), {SOAK['wrong_rows']:,} wrong "
          f"rows, {SOAK['untyped_errors']:,} untyped errors ({runs} timed runs over {SOAK_SECONDS:.0f} s)")
    assert not failures, f"{len(failures)} of {runs} runs failed; first: {failures[0]}"
