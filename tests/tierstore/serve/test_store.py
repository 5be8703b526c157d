"""Store API: errors, corruption detection, async lookups, concurrency, stats."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tierstore
from tierstore import (
    BudgetError,
    CorruptDataError,
    FormatVersionError,
    IdTypeError,
    InvalidIdError,
    TierStoreError,
    UnknownTableError,
)
from tierstore.format.spec import PAGE_SIZE, read_manifest

from ...conftest import bits
from ..cache.helpers import slot_of_row

T1 = "blocks.1.engram.memory.weight"
T3 = "blocks.3.engram.memory.weight"


@pytest.fixture
def store_path(tmp_path, small_ckpt) -> Path:
    ckpt, _ = small_ckpt
    return tierstore.build_store(ckpt, tmp_path / "store", progress=False)


def test_open_defaults_and_inspect(store_path):
    with tierstore.open(store_path) as store:
        assert store.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
        assert set(store.tables) == {T1, T3}
        info = store.tables[T1]
        assert (info.rows, info.dim, info.torch_dtype, info.row_bytes) == (5003, 64, torch.float32, 256)


def test_id_errors_are_typed_and_named(store_path):
    with tierstore.open(store_path, device="cpu", device_budget="64KiB", host_budget="256KiB") as store:
        with pytest.raises(InvalidIdError, match=r"id 5003 at flat position 2 .* 5003 rows") as e:
            store.lookup(T1, [0, 1, 5003])
        assert isinstance(e.value, IndexError)
        with pytest.raises(InvalidIdError, match="id -1"):
            store.lookup(T1, torch.tensor([[3, -1]]))
        with pytest.raises(IdTypeError, match="float") as e2:
            store.lookup(T1, torch.tensor([1.0, 2.0]))
        assert isinstance(e2.value, TypeError)
        with pytest.raises(IdTypeError):
            store.lookup(T1, np.array(["a"]))
        with pytest.raises(IdTypeError, match="bool"):
            store.lookup(T1, torch.tensor([True]))
        with pytest.raises(UnknownTableError, match="no table 'nope'.*blocks.1") as e3:
            store.lookup("nope", [1])
        assert isinstance(e3.value, KeyError)
        with pytest.raises(TierStoreError, match="out= must be"):
            store.lookup(T1, [1, 2], out=torch.empty(3, 64))
        # the store is unharmed by all of the above
        assert store.lookup(T1, []).shape == (0, 64)
    assert tierstore.verify_store(store_path, progress=False).ok


@pytest.mark.parametrize("budget", ["-1", "lots", -3])
def test_bad_budgets(store_path, budget):
    with pytest.raises(BudgetError, match="budget"):
        tierstore.open(store_path, host_budget=budget)


def test_unsupported_format_version(store_path):
    m = json.loads((store_path / "manifest.json").read_text())
    m["version"] = 99
    (store_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatVersionError, match="version 99"):
        tierstore.open(store_path)


def test_not_a_store(tmp_path):
    with pytest.raises(TierStoreError, match="not a directory"):
        tierstore.open(tmp_path / "missing")
    with pytest.raises(TierStoreError, match="manifest.json is missing"):
        tierstore.open(tmp_path)


def test_flipped_byte_found_by_verify_and_lookup(store_path, small_ckpt):
    _, tensors = small_ckpt
    info = read_manifest(store_path).tables[T1]
    row = 2500
    offset = PAGE_SIZE + row * info.row_stride + 17
    path = store_path / info.file
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))
    report = tierstore.verify_store(store_path, progress=False)
    assert not report.ok
    (m,) = report.mismatches
    assert (m.table, m.page, m.offset) == (T1, offset // PAGE_SIZE, offset // PAGE_SIZE * PAGE_SIZE)
    assert m.first_row <= row
    with tierstore.open(store_path, device="cpu", device_budget=0, host_budget=0) as store:
        assert torch.equal(bits(store.lookup(T1, [0, 10])), bits(tensors[T1][[0, 10]]))  # other pages fine
        with pytest.raises(CorruptDataError, match=rf"page {offset // PAGE_SIZE}.*{row}"):
            store.lookup(T1, [1, row])
        fut = store.prefetch(T1, [row])
        with pytest.raises(CorruptDataError):
            fut.result(timeout=30)


def test_truncated_row_file(store_path):
    info = read_manifest(store_path).tables[T3]
    path = store_path / info.file
    path.write_bytes(path.read_bytes()[:-PAGE_SIZE])
    with pytest.raises(CorruptDataError, match="truncated"):
        tierstore.open(store_path)
    assert not tierstore.verify_store(store_path, progress=False).ok


def test_prefetch_future_and_out(store_path, small_ckpt):
    _, tensors = small_ckpt
    w = tensors[T1]
    with tierstore.open(store_path, device="cpu", device_budget=w.nbytes // 10, host_budget=w.nbytes // 3) as store:
        ids = torch.randint(0, 5003, (3, 7, 5))
        out = torch.empty(3, 7, 5, 64)
        fut = store.prefetch(T1, ids, out=out)
        got = fut.result(timeout=30)
        assert fut.done() and got.data_ptr() == out.data_ptr()
        assert torch.equal(bits(out), bits(F.embedding(ids, w)))
        many = store.prefetch_many({T1: ids[0], T3: ids[1] % 1201}).result(timeout=30)
        assert torch.equal(bits(many[T3]), bits(F.embedding(ids[1] % 1201, tensors[T3])))
        s = store.stats()
        assert s["latency"]["results"] == 2
        store.reset_stats()
        assert store.stats()["device"]["hits"] == 0


def test_pooled_buffers_are_never_shared_with_a_live_result(store_path, small_ckpt):
    _, tensors = small_ckpt
    with tierstore.open(store_path, device="cpu", host_budget="1MiB") as store:
        a = store.lookup(T1, [1, 2, 3])
        b = store.lookup(T1, [4, 5, 6])
        assert a.data_ptr() != b.data_ptr()
        assert torch.equal(bits(a), bits(tensors[T1][[1, 2, 3]]))
        ptr = b.data_ptr()
        del a, b
        c = store.lookup(T1, [7, 8, 9])  # a dropped buffer is reused
        assert c.data_ptr() in {ptr} or store._pool.reused >= 1
        view = c[0]
        del c
        d = store.lookup(T1, [10, 11, 12])
        assert d.data_ptr() != view.data_ptr()  # a view keeps its buffer out of the pool
        assert torch.equal(bits(view), bits(tensors[T1][7]))


@pytest.mark.parametrize("policy", ["default", "lru"])
def test_concurrent_callers_get_exact_rows(store_path, small_ckpt, policy):
    _, tensors = small_ckpt
    w = tensors[T1]
    errors: list[str] = []
    with tierstore.open(store_path, device="cpu", device_budget=w.nbytes // 20, host_budget=w.nbytes // 6,
                        policy=policy, threads=3) as store:
        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(25):
                ids = (rng.zipf(1.2, size=(64, 3)) - 1) % 5003
                got = store.prefetch(T1, ids).result(timeout=60)
                bad = (bits(got) != bits(w[torch.from_numpy(ids)])).sum().item()
                if bad:
                    errors.append(f"thread {seed}: {bad} bytes differ")
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = store.stats()
    assert not errors, errors[:3]
    assert s["device"]["hits"] > 0 and s["host"]["hits"] + s["disk"]["rows_read"] > 0
    assert s["device"]["rows"] <= s["device"]["capacity_rows"]


def test_buffer_pool_is_bounded():
    from tierstore.serve.buffers import BufferPool

    pool = BufferPool(per_key=2, max_keys=3)
    for n in range(1, 50):  # 49 different batch shapes
        pool.get((n, 8), torch.float32, torch.device("cpu"))
    assert len(pool._free) == 3 and all(len(b) <= 2 for b in pool._free.values())
    t = pool.get((49, 8), torch.float32, torch.device("cpu"))
    del t
    assert pool.get((49, 8), torch.float32, torch.device("cpu")) is not None and pool.reused >= 1


def test_small_prefetch_on_the_device_finishes_in_the_callers_thread(store_path, small_ckpt, monkeypatch):
    """A prefetch of fewer than INLINE_BELOW ids whose rows are all on the device completes before it
    returns (no hand-off); one with misses goes to a worker; both return exact rows, and a
    lookup begun but never handed over releases its leases."""
    from tierstore.serve.store import INLINE_BELOW

    _, tensors = small_ckpt
    name = "blocks.1.engram.memory.weight"
    w = tensors[name]
    with tierstore.open(store_path, device="cpu", device_budget=64 * 4 * 100, host_budget=0, policy="lru") as s:
        ids = np.arange(50)
        s.lookup(name, ids)  # now on the device
        fut = s.prefetch(name, ids)
        assert fut.done(), "an all-hit small prefetch should be complete at once"
        assert torch.equal(bits(fut.result()), bits(w[:50]))
        cold = np.arange(1000, 1050)
        fut = s.prefetch(name, cold)  # misses: the worker reads them
        assert torch.equal(bits(fut.result(timeout=30)), bits(w[1000:1050]))
        big = np.arange(INLINE_BELOW + 1) % 5003
        assert torch.equal(bits(s.prefetch(name, big).result(timeout=30)), bits(w[big]))
        index = s._tables[name].dev.index

        def refuse(fn):
            raise tierstore.StoreClosedError("closed")

        monkeypatch.setattr(s._prefetcher, "submit", refuse)
        with pytest.raises(tierstore.StoreClosedError):
            s.prefetch(name, np.arange(2000, 2040))  # begun, then the hand-off fails
        assert index.refcount.max() == 0, "a begun lookup that never ran kept its leases"
        # rows it admitted were dropped, never served from slots nobody wrote
        assert not (slot_of_row(index)[2000:2040] >= 0).any()


def _profiled(store_path: Path) -> Path:
    """The store with a saved profile per table (a skewed count per row), so the default
    policy pins and ranks rows at open."""
    from tierstore.format.profile import save_profile

    for name, info in tierstore.open(store_path, device="cpu").tables.items():
        counts = np.random.default_rng(len(name)).zipf(1.3, info.rows).astype(np.int64)
        save_profile(store_path, name, counts)
    return store_path


def test_policy_params_reach_every_cache_tier(store_path, small_ckpt):
    from tierstore.cache.layout import M_HORIZON

    _, tensors = small_ckpt
    path = _profiled(store_path)
    opts = dict(device="cpu", device_budget="128KiB", host_budget="512KiB")
    ids = np.random.default_rng(0).integers(0, 5003, 4000)

    def pinned(store):  # rows pinned in T1's device and host tiers, and their capacities
        t = store._tables[T1]
        return [(tier.index.n_pinned, tier.capacity) for tier in (t.dev, t.host)]

    with tierstore.open(path, **opts) as store:  # negative control: the policy's defaults
        default_pins = pinned(store)
        assert store.policy_params == {}
    assert all(p == int(0.1 * cap) > 0 for p, cap in default_pins)
    with tierstore.open(path, **opts, policy_params={"pin_fraction": 0.5, "hint_horizon": 77}) as store:
        assert [p for p, _ in pinned(store)] == [int(0.5 * cap) for _, cap in default_pins]
        t = store._tables[T1]
        assert t.dev.index.state[0][M_HORIZON] == 77 and t.host.index.state[0][M_HORIZON] == 77
        assert t.dev.index.policy.params["pin_fraction"] == 0.5
        assert torch.equal(bits(store.lookup(T1, ids)), bits(tensors[T1][ids]))  # rows unchanged
    with tierstore.open(path, **opts, policy="s3fifo", policy_params={"small_fraction": 0.3}) as store:
        assert store._tables[T3].dev.index.policy.params == {"small_fraction": 0.3, "move_threshold": 1}


@pytest.mark.parametrize("policy, params, key", [
    ("default", {"pin_fraktion": 0.2}, "pin_fraktion"),
    ("default", {"pin_fraction": 1.5}, "pin_fraction"),
    ("default", {"adapt": "rank"}, "adapt"),
    ("default", {"hint_horizon": 0}, "hint_horizon"),
    ("lru", {"small_fraction": 0.1}, "small_fraction"),
])
@pytest.mark.parametrize("budgets", [{}, {"device_budget": "64KiB", "host_budget": "8MiB"}])
def test_bad_policy_params_raise_at_open_naming_the_key(store_path, policy, params, key, budgets):
    # budgets {}: no cache tier builds a policy, the parameters are still checked;
    # 8MiB of host: the tables are resident there, the device tier caches
    with pytest.raises(tierstore.PolicyParamError, match=key) as e:
        tierstore.open(store_path, device="cpu", policy=policy, policy_params=params, **budgets)
    assert e.value.param == key and isinstance(e.value, ValueError)
    if key == "pin_fraktion":
        assert "pin_fraction" in str(e.value)  # the message lists the parameters the policy takes


def test_policy_params_must_be_a_mapping_and_the_policy_registered(store_path):
    with pytest.raises(TierStoreError, match="mapping"):
        tierstore.open(store_path, device="cpu", policy_params=[("pin_fraction", 0.2)])
    with pytest.raises(TierStoreError, match="unknown cache policy 'lfru'"):
        tierstore.open(store_path, device="cpu", policy="lfru")
