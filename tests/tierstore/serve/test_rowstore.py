"""One interface, two stores (issue 20 item 1): the same contract functions
(``rowstore_contract.py``) run against ``tierstore.Store`` and a 2-rank gloo
``tierstore.ShardedStore`` on a quantized DeepSeek-V4.1-layout store, every row bit-exact
with the numpy oracle, the same dtypes, the same typed errors. Both are opened with the
same ``StoreOptions`` (small per-rank budgets: rows come from the device, host and disk
tiers)."""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tierstore
from tierstore.format.quant import Quant

from ...v41 import embed, scale_of, write_v41_checkpoint
from .rowstore_contract import CHECKS, Ref
from ...conftest import free_port

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them

LAYERS = {1: 700, 14: 500}
WORLD = 2
OPTIONS = tierstore.StoreOptions(device="cpu", device_budget=16 * 264, host_budget=64 * 264, threads=2)


@pytest.fixture(scope="module")
def v41(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rowstore")
    raw = write_v41_checkpoint(tmp / "ckpt", LAYERS)
    np.savez(tmp / "stored.npz", **{embed(layer).replace(".", "_"): np.concatenate(
        [raw[embed(layer)], raw[scale_of(embed(layer))]], axis=1) for layer in LAYERS})
    tierstore.build_store(tmp / "ckpt", tmp / "single", progress=False)
    for rank in range(WORLD):
        tierstore.build_shard(tmp / "ckpt", tmp / "sharded", rank, WORLD, progress=False)
    return tmp


def _ref(tmp: Path) -> Ref:
    stored = np.load(tmp / "stored.npz")
    return Ref({embed(layer): stored[embed(layer).replace(".", "_")] for layer in LAYERS},
               Quant("fp8_e4m3/ue8m0", 32, 256))


def test_the_stores_are_row_stores():
    # a protocol with properties refuses issubclass(); instances are checked in check_protocol
    for cls in (tierstore.Store, tierstore.ShardedStore):
        missing = [m for m in ("lookup", "prefetch", "prefetch_many", "hint", "stats", "reset_stats", "close",
                               "__enter__", "__exit__") if not callable(getattr(cls, m, None))]
        assert not missing, f"{cls.__name__} lacks {missing}"


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_store(v41, check):
    store = tierstore.open(v41 / "single", options=OPTIONS)
    try:
        check(store, _ref(v41), np.random.default_rng(0))
    finally:
        store.close()


def _rank(rank: int, port: int, tmp_s: str) -> None:
    tmp = Path(tmp_s)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    ref, rng = _ref(tmp), np.random.default_rng(10 + rank)  # each rank its own ids
    store = tierstore.open_sharded(tmp / "sharded", options=OPTIONS, timeout=30)
    try:
        for check in CHECKS:  # in order, every rank: the calls are collective
            try:
                check(store, ref, rng)
            except BaseException as e:
                raise AssertionError(f"rank {rank}: {check.__name__} failed on the sharded store: "
                                     f"{''.join(traceback.format_exception(e))}") from None
    finally:
        store.close()
        dist.destroy_process_group()


def test_sharded_store(v41):
    mp.spawn(_rank, args=(free_port(), str(v41)), nprocs=WORLD, join=True)
