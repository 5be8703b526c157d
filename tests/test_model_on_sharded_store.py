"""The Engram model runs unchanged on a sharded store (issue 20 item 1): the model takes any
``tierstore.RowStore``, so ``engram_model.generate.served_model(ckpt, tierstore.open_sharded(...))``
serves it on every rank of a 2-rank gloo group, each rank with its own prompts, the lookups
collective. Logits and the generation loop (``serve``: next-batch prefetch, announcements,
decode steps looked up in the model's thread) are bit-identical to the in-memory model."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tierstore
from .conftest import free_port

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def _rank(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    from engram_model.checkpoint import load_checkpoint
    from engram_model.generate import served_model, serve

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    tierstore.build_shard(Path(ckpt) / "model.safetensors", out, rank, world, progress=False)
    dist.barrier()
    resident, _, _ = load_checkpoint(ckpt)
    options = tierstore.StoreOptions(device="cpu", device_budget=256, host_budget=1024, timeout=30)  # per rank
    with tierstore.open_sharded(out, options=options) as store:
        assert isinstance(store, tierstore.RowStore)
        served, _ = served_model(ckpt, store, sync_below=0)  # every fetch a (collective) prefetch
        g = torch.Generator().manual_seed(rank)
        for step in range(3):  # every rank runs its own prompts; lookups stay collective
            idx = torch.randint(0, resident.cfg.vocab_size, (2, 12 + step), generator=g)
            with torch.no_grad():
                a, _ = resident(idx)
                b, _ = served(idx)
            assert torch.equal(a, b), f"rank {rank} step {step}: max diff {(a - b).abs().max().item()}"
        assert store.stats()["exchange"]["bytes_received"] > 0
        # the serving loop, as on one process: the same code, the same tokens, the same logits
        batches = [torch.randint(0, resident.cfg.vocab_size, (2, 10), generator=g) for _ in range(3)]
        ref = serve(resident, batches, max_new_tokens=5, seed=7, prefetch_next=False)
        for sync_below in (0, 64):  # 64: decode steps (2 x 1 x 4 ids) looked up in the model's thread
            served.attach_store(store, sync_below=sync_below)
            got = serve(served, batches, max_new_tokens=5, seed=7, prefetch_next=True, announce=1)
            for i, (x, y) in enumerate(zip(ref.outputs, got.outputs)):
                assert torch.equal(x, y), f"rank {rank} sync_below {sync_below} batch {i}: other tokens"
            for i, (x, y) in enumerate(zip(ref.last_logits, got.last_logits)):
                assert torch.equal(x, y), f"rank {rank} batch {i}: max diff {(x - y).abs().max().item()}"
    dist.destroy_process_group()


@pytest.mark.slow
def test_engram_model_on_two_shards(tmp_path, engram_run):
    ckpt = engram_run[0]  # the session's tiny trained checkpoint (tests/conftest.py)
    mp.spawn(_rank, args=(2, free_port(), str(ckpt), str(tmp_path / "sharded")), nprocs=2, join=True)
