"""The Engram model served on a GPU (marked ``gpu``: skipped without one; ``make gpu-check``
runs it). Status: written without a GPU; never run yet."""

from __future__ import annotations

import pytest
import torch

import tierstore
from engram_model.checkpoint import load_checkpoint
from engram_model.generate import build_store_for, main, open_served_model, serve, table_bytes


@pytest.mark.gpu
def test_generate_on_cuda_same_tokens_as_resident_and_rows_as_cpu_store(engram_run, tmp_path):
    """Store-served on CUDA generates exactly the tokens the resident model generates on
    CUDA, and every Engram row it fetched is bit-identical to the CPU store's."""
    ckpt, _ = engram_run
    store_path = build_store_for(ckpt, tmp_path / "store")
    tb = table_bytes(ckpt)
    resident, tok, _ = load_checkpoint(ckpt)
    resident.to("cuda")
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, resident.cfg.vocab_size, (2, 16), generator=g) for _ in range(3)]
    ref = serve(resident, batches, max_new_tokens=8, seed=4, temperature=0.8)
    served, _, store = open_served_model(ckpt, store_path, device_budget=tb // 20, host_budget=tb // 10,
                                         device="cuda")
    with store:
        got = serve(served, batches, max_new_tokens=8, seed=4, temperature=0.8)
        assert store.stats()["disk"]["rows_read"] > 0  # tables larger than the budgets: cold reads happened
        ids = served.row_ids(batches[0].cuda())
        with tierstore.open(store_path, device="cpu") as cpu_store:
            for i, r in ids.items():
                name = f"blocks.{i}.engram.memory.weight"
                a = store.lookup(name, r).cpu()
                b = cpu_store.lookup(name, r)
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    for a, b in zip(ref.outputs, got.outputs):
        assert a.is_cuda and torch.equal(a, b)
    for a, b in zip(ref.last_logits, got.last_logits):
        assert torch.equal(a, b), f"max diff {(a - b).abs().max().item()}"


@pytest.mark.gpu
def test_generate_cli_on_cuda(engram_run, tmp_path, capsys):
    ckpt, _ = engram_run
    res = main(["--ckpt", str(ckpt), "--store", str(tmp_path / "s"), "--prompts", "2", "--batch-size", "2",
                "--prompt-len", "12", "--max-new-tokens", "4", "--compare-resident", "--device", "cuda"])
    assert res["device"].startswith("cuda") and res["same_tokens_as_resident"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_generate_on_cuda_without_cuda_says_so(engram_run, tmp_path):
    ckpt, _ = engram_run
    with pytest.raises(tierstore.TierStoreError, match="CUDA is not available"):
        main(["--ckpt", str(ckpt), "--store", str(tmp_path / "s"), "--prompts", "2", "--device", "cuda"])
