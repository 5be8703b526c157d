"""``tierstore.StoreOptions`` (issue 20 item 2): open()'s options in one frozen dataclass,
checked at construction with the same code and the same typed errors as the keyword form,
taken alike by ``tierstore.open`` and ``tierstore.open_sharded``."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import tierstore
from tierstore import BudgetError, PolicyParamError, StoreOptions, TierStoreError

T1 = "blocks.1.engram.memory.weight"  # 5003 rows x 64 float32 (tests/conftest.py small_ckpt)

BAD = [dict(threads="4"), dict(threads=0), dict(threads=2.5), dict(io_threads=0), dict(io_threads="2"),
       dict(policy="nope"), dict(policy=None), dict(policy_params={"nope": 1}), dict(policy_params=[1]),
       dict(device_budget=-1), dict(host_budget="abc"), dict(host_budget=float("inf")), dict(pool_bytes="x"),
       dict(device="meta"), dict(device=3.5), dict(direct="yes"), dict(host_shared=1.5), dict(use_profile=None),
       dict(zero_copy=True), dict(disk_reader="fast"), dict(timeout=0), dict(timeout=True),
       dict(timeout=float("inf"))]


@pytest.fixture
def store_path(tmp_path, small_ckpt):
    ckpt, _ = small_ckpt
    return tierstore.build_store(ckpt, tmp_path / "store", progress=False)


def _error(call) -> tuple[type, str]:
    with pytest.raises(TierStoreError) as e:
        call()
    return type(e.value), str(e.value)


def test_sizes_are_bytes_inside_and_frozen():
    o = StoreOptions(device="cpu", device_budget="16KiB", host_budget=None, pool_bytes="1MiB", threads=2)
    assert (o.device, o.device_budget, o.host_budget, o.pool_bytes) == (torch.device("cpu"), 16384, 0, 1 << 20)
    assert StoreOptions().device is None  # the default device is resolved at open (a sharded store: its group's)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.threads = 3  # type: ignore[misc]
    params = {"pin_fraction": 0.2}
    o = StoreOptions(policy_params=params)
    params["pin_fraction"] = 0.9  # the caller's dict changing later changes nothing
    assert o.policy_params["pin_fraction"] == 0.2
    with pytest.raises(TypeError):
        o.policy_params["pin_fraction"] = 0.5  # type: ignore[index]
    assert dataclasses.replace(o, threads=1) == StoreOptions(policy_params={"pin_fraction": 0.2}, threads=1)


@pytest.mark.parametrize("kw", BAD, ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_bad_option_raises_the_same_at_construction_open_and_open_sharded(tmp_path, kw):
    """One check for every entry point: the dataclass, the keyword form, ``options=``, and
    ``open_sharded`` (which checks its options before it needs a process group). The path
    does not exist: options are checked before any file is touched."""
    store_path = tmp_path / "no-store-here"
    want = _error(lambda: StoreOptions(**kw))
    named = "'nope'" if kw.get("policy_params") == {"nope": 1} else next(iter(kw))  # the bad key, or the option
    assert re.search(named, want[1]), want
    if "budget" in next(iter(kw)) or "pool_bytes" in kw:
        assert want[0] is BudgetError
    if "policy_params" in kw and isinstance(kw["policy_params"], dict):
        assert want[0] is PolicyParamError
    assert _error(lambda: tierstore.open(store_path, **kw)) == want
    assert _error(lambda: tierstore.open_sharded(store_path, **kw)) == want
    ok = StoreOptions(device="cpu")
    assert _error(lambda: tierstore.open(store_path, options=ok, **kw)) == want


def test_unknown_option_and_wrong_options_type(tmp_path):
    store_path = tmp_path / "no-store-here"
    for call in (lambda: tierstore.open(store_path, device_budgt="1MiB"),
                 lambda: tierstore.open_sharded(store_path, device_budgt="1MiB")):
        with pytest.raises(TierStoreError, match=r"unknown option\(s\) 'device_budgt'.*device_budget"):
            call()
    with pytest.raises(TierStoreError, match="must be a tierstore.StoreOptions"):
        tierstore.open(store_path, options={"device": "cpu"})  # type: ignore[arg-type]


def test_options_and_keywords_open_the_same_store(store_path):
    kw = dict(device="cpu", device_budget="16KiB", host_budget="64KiB", policy="lru", threads=2)
    opts = StoreOptions(**kw)
    ids = torch.arange(0, 5003, 7)
    with tierstore.open(store_path, **kw) as a, tierstore.open(store_path, options=opts) as b, \
            tierstore.open(store_path, options=StoreOptions(device="cpu"), device_budget="16KiB",
                           host_budget="64KiB", policy="lru", threads=2) as c:
        assert a.options == b.options == c.options == opts
        assert repr(a) == repr(b) == repr(c)
        assert (b.device_budget, b.host_budget, b.policy) == (16384, 65536, "lru")
        rows = [s.lookup(T1, ids) for s in (a, b, c)]
        assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])
        assert [s.stats()["device"]["capacity_rows"] for s in (a, b, c)] == [a.stats()["device"]["capacity_rows"]] * 3


def test_open_sharded_says_budgets_are_per_rank():
    for doc in (tierstore.open_sharded.__doc__, StoreOptions.__doc__, tierstore.ShardedStore.__doc__):
        assert doc and re.search(r"(?i)budgets are per rank|budget is \*\*per rank", doc), doc
