"""A sharded store returns what ``Store`` returns (issue 20 item 1): on a DeepSeek-V4.1-layout
fp8 table built as 2 shards, lookups are bf16 rows dequantized bit-exactly (at the receiver:
peers exchange the stored rows), ``raw=True`` gives the stored bytes, and ``out=``,
``prefetch_many`` and ``hint`` behave as on the unsharded store. Two gloo ranks on loopback."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tierstore
from tierstore.serve.distributed import build_shard, open_sharded

from ...conftest import bits, free_port
from ...v41 import embed, oracle_bf16, scale_of, write_v41_checkpoint

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them

LAYERS = {1: 700, 14: 700}  # two same-shape tables, as in the released checkpoint
WORLD = 2


@pytest.fixture(scope="module")
def v41_shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("v41shards")
    raw = write_v41_checkpoint(tmp / "ckpt", LAYERS)
    np.savez(tmp / "raw.npz", **{k.replace(".", "_"): v for k, v in raw.items()})
    tierstore.build_store(tmp / "ckpt", tmp / "single", progress=False)
    for rank in range(WORLD):
        build_shard(tmp / "ckpt", tmp / "sharded", rank, WORLD, progress=False)
    return tmp


def _worker(rank: int, port: int, tmp_s: str) -> None:
    tmp = Path(tmp_s)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    raw = np.load(tmp / "raw.npz")
    single = tierstore.open(tmp / "single", device="cpu")
    # small budgets: rows come from the device, host and disk tiers of each shard
    sharded = open_sharded(tmp / "sharded", device="cpu", device_budget=16 * 264, host_budget=64 * 264, timeout=30)
    quant = single.tables[embed(1)].quant
    assert quant is not None
    for name in single.tables:
        s, d = single.tables[name], sharded.tables[name]
        assert (d.rows, d.lookup_dim, d.lookup_dtype, d.quant) == (s.rows, s.lookup_dim, s.lookup_dtype, s.quant)
    # a hint reaches the owner of each row: rank 0 hints rows of rank 1 and the other way round
    table = sharded.local._tables[embed(1)]
    table.events = []  # the tiers' record of lookups and hints (tierstore.serve.table)
    sharded.hint(embed(1), [1, 3, 5] if rank == 0 else [2, 4])
    sharded.lookup(embed(1), [0])  # issued after the hint: its exchange has run when this returns
    hinted = sorted(int(i) for kind, ids, *_ in table.events if kind == "hint" for i in ids)
    assert hinted == ([1, 2] if rank == 0 else [0, 1, 2]), f"rank {rank} was hinted local rows {hinted}"
    table.events = None
    rng = np.random.default_rng(rank)
    for step in range(4):
        for layer, rows in LAYERS.items():
            name = embed(layer)
            # duplicates, rows of both owners, a different 2-d shape on each rank
            ids = np.concatenate([rng.integers(0, rows, 40 + 10 * rank), [rows - 1] * 3, [0, 1, 0, 1]])
            ids = ids[: len(ids) // 2 * 2].reshape(2, -1)
            got, want = sharded.lookup(name, ids), single.lookup(name, ids)
            assert got.dtype == torch.bfloat16 and got.shape == ids.shape + (256,) == want.shape
            assert torch.equal(bits(got), bits(want)), f"rank {rank} step {step} {name}: differs from Store"
            oracle = oracle_bf16(raw[name.replace(".", "_")][ids.reshape(-1)],
                                 raw[scale_of(name).replace(".", "_")][ids.reshape(-1)], quant)
            assert torch.equal(bits(got.reshape(-1, 256)), bits(oracle)), f"rank {rank} step {step}: not the oracle"
            got_raw = sharded.prefetch(name, ids, raw=True).result(timeout=60)
            assert got_raw.dtype == torch.uint8 and got_raw.shape == ids.shape + (quant.row_bytes,)
            assert torch.equal(got_raw, single.lookup(name, ids, raw=True))
            stored = np.concatenate([raw[name.replace(".", "_")], raw[scale_of(name).replace(".", "_")]], axis=1)
            assert np.array_equal(got_raw.reshape(-1, quant.row_bytes).numpy(), stored[ids.reshape(-1)])
            out = torch.full(ids.shape + (256,), 7.0, dtype=torch.bfloat16)
            assert sharded.lookup(name, ids, out=out) is out and torch.equal(bits(out), bits(want))
            with pytest.raises(tierstore.TierStoreError, match="bfloat16"):  # Store's out= rule, on every rank
                sharded.lookup(name, ids, out=torch.empty(ids.shape + (264,), dtype=torch.uint8))
            sharded.hint(name, ids[:, :3])  # a later step's rows: forwarded to their owners
        reqs = {embed(14): rng.integers(0, LAYERS[14], 9 + rank), embed(1): rng.integers(0, LAYERS[1], (3, 2))}
        many, many_want = sharded.prefetch_many(reqs).result(timeout=60), single.prefetch_many(reqs).result()
        assert list(many) == list(reqs)
        for name in reqs:
            assert torch.equal(bits(many[name]), bits(many_want[name])), f"rank {rank} step {step}: prefetch_many"
    assert sharded.stats()["exchange"]["bytes_received"] > 0
    sharded.close()
    single.close()
    dist.destroy_process_group()


def test_sharded_quantized_rows_equal_store(v41_shards):
    mp.spawn(_worker, args=(free_port(), str(v41_shards)), nprocs=WORLD, join=True)
