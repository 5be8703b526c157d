"""Sharded store on torch.distributed (gloo, loopback): exact rows, build per rank, fail-fast."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

import tierstore
from tierstore.serve.distributed import build_shard, open_sharded

from ...conftest import bits, free_port, random_table

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them

NAMES = ("blocks.1.engram.memory.weight", "blocks.2.engram.memory.weight")


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _exact_worker(rank: int, world: int, port: int, tmp: str) -> None:
    _init(rank, world, port)
    tmp_p = Path(tmp)
    build_shard(tmp_p / "m.safetensors", tmp_p / "sharded", rank, world, progress=False)  # only our rows
    dist.barrier()
    single = tierstore.open(tmp_p / "single", device="cpu")
    rng = np.random.default_rng(rank)
    with open_sharded(tmp_p / "sharded", device="cpu", device_budget=4096, host_budget=16384, timeout=30) as store:
        assert store.tables[NAMES[0]].rows == 1001
        for step in range(6):
            name = NAMES[step % 2]
            n = store.tables[name].rows
            # duplicates, ids owned by every rank, a different shape on each rank
            ids = np.concatenate([rng.integers(0, n, 300), np.arange(world * 3), [n - 1] * 5, rng.integers(0, 4, 50)])
            ids = ids[: len(ids) // 2 * 2].reshape(2, -1)
            got = store.prefetch(name, ids).result(timeout=60)
            want = single.lookup(name, ids)
            assert got.shape == want.shape and torch.equal(bits(got), bits(want)), f"rank {rank} step {step}"
        s = store.stats()["exchange"]
        assert s["ids_sent"] < s["ids_requested"]  # duplicates never crossed the wire
        if world > 1:
            assert s["bytes_sent"] > 0 and s["bytes_received"] > 0
    single.close()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    tensors = {NAMES[0]: random_table(1001, 24, torch.float32, seed=1),
               NAMES[1]: random_table(777, 40, torch.bfloat16, seed=2)}
    save_file(tensors, str(tmp / "m.safetensors"))
    tierstore.build_store(tmp / "m.safetensors", tmp / "single", progress=False)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_rows_equal_single_store(sharded_ckpt, world):
    mp.spawn(_exact_worker, args=(world, free_port(), str(sharded_ckpt)), nprocs=world, join=True)
    shards = sorted(p.name for p in (sharded_ckpt / "sharded").iterdir() if p.name.endswith(f"of-{world:05d}"))
    assert shards == [f"shard-{r:05d}-of-{world:05d}" for r in range(world)]


def _dying_worker(rank: int, world: int, port: int, tmp: str) -> None:
    _init(rank, world, port)
    tmp_p = Path(tmp)
    build_shard(tmp_p / "m.safetensors", tmp_p / "sharded", rank, world, progress=False, force=True)
    dist.barrier()
    store = open_sharded(tmp_p / "sharded", device="cpu", timeout=20)
    store.lookup(NAMES[0], [1, 2, 3])  # one good collective lookup
    if rank == 1:
        os._exit(17)  # dies without a word
    t0 = time.time()
    try:
        store.lookup(NAMES[0], [4, 5, 6])
        (tmp_p / "result").write_text("no error")
    except tierstore.TierStoreError as e:
        (tmp_p / "result").write_text(f"{time.time() - t0:.1f} {e}")
        try:  # the group is broken: a later call raises without entering a collective (and its timeout)
            store.lookup(NAMES[0], [7])
            again = "no error"
        except tierstore.TierStoreError as e2:
            again = str(e2)
        (tmp_p / "again").write_text(again)


@pytest.mark.slow
def test_dead_rank_fails_fast(sharded_ckpt):
    ctx = mp.start_processes(_dying_worker, args=(2, free_port(), str(sharded_ckpt)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 120
    for p in ctx.processes:
        p.join(max(1.0, deadline - time.time()))
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    assert all(not p.is_alive() for p in ctx.processes)
    text = (sharded_ckpt / "result").read_text()
    seconds, msg = text.split(" ", 1)
    assert "sharded lookup failed" in msg and "peer rank may have died" in msg, msg
    assert float(seconds) < 25, f"took {seconds}s to notice the dead rank"
    msg = (sharded_ckpt / "again").read_text()
    assert "earlier sharded lookup failed" in msg and "open it again on every rank" in msg, msg


def test_sharded_store_needs_a_process_group(sharded_ckpt):
    with pytest.raises(tierstore.TierStoreError, match="init_process_group"):
        open_sharded(sharded_ckpt / "sharded")


def test_bad_shard_spec(sharded_ckpt, tmp_path):
    with pytest.raises(tierstore.TierStoreError, match="rank"):
        build_shard(sharded_ckpt / "m.safetensors", tmp_path / "x", 3, 2)
