"""The Engram model runs unchanged on a sharded store: logits bit-identical to the in-memory model."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tierstore.serve.distributed import build_shard, open_sharded

from .engram_model.conftest import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    from engram_model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    build_shard(Path(ckpt) / "model.safetensors", out, rank, world, progress=False)
    dist.barrier()
    resident, _, _ = load_checkpoint(ckpt)
    served, _, _ = load_checkpoint(ckpt, tables=False)
    with open_sharded(out, device="cpu", device_budget=256, host_budget=1024, timeout=30) as store:
        served.attach_store(store)
        g = torch.Generator().manual_seed(rank)
        for step in range(3):  # every rank runs its own prompts; lookups stay collective
            idx = torch.randint(0, resident.cfg.vocab_size, (2, 12 + step), generator=g)
            with torch.no_grad():
                a, _ = resident(idx)
                b, _ = served(idx)
            assert torch.equal(a, b), f"rank {rank} step {step}: max diff {(a - b).abs().max().item()}"
        assert store.stats()["exchange"]["bytes_received"] > 0
    dist.destroy_process_group()


@pytest.mark.slow
def test_engram_model_on_two_shards(tmp_path):
    from engram_model.tokenizer import stdlib_text_files
    from engram_model.train import main as train

    ckpt = tmp_path / "ckpt"
    train([*TINY, "--out", str(ckpt), "--text", *[str(p) for p in stdlib_text_files()[:60]]])
    mp.spawn(_rank, args=(2, _free_port(), str(ckpt), str(tmp_path / "sharded")), nprocs=2, join=True)
