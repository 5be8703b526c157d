"""DeepSeek-V4.1-Flash's Engram from its config.json: hasher, checks, and a model served from
a store built from a V4.1-layout checkpoint (fp8 rows + UE8M0 scales)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tierstore
from engram_model import deepseek_v41 as v41
from engram_model.compression import CompressionMap
from engram_model.errors import EngramConfigError
from engram_model.hasher import NgramHasher
from engram_model.memory import EmbeddingMemory
from engram_model.model import InferenceCache
from tierstore.format.quant import FP8_SCHEME, Quant

from ..v41 import embed, oracle_bf16, scale_of, write_v41_checkpoint

torch.set_num_threads(1)

# text_config of the released deepseek-ai/DeepSeek-V4.1-Flash config.json (Engram fields)
RELEASED = {
    "engram_layer_ids": [1, 14], "engram_max_ngram_size": 4, "engram_n_heads": 8, "engram_head_dim": 256,
    "engram_vocab_size": 16_000_000, "engram_num_embeddings": [384006168, 384016682],
    "engram_compressed_vocab_size": 99092, "engram_pad_token_id": 2,
}
RAW_VOCAB = 129280  # the released tokenizer's vocabulary


def compression(raw_vocab: int, compressed: int, pad_to: int = 57) -> CompressionMap:
    """A surjective raw -> compressed map (the real one comes from the checkpoint's tokenizer)
    that sends raw id 2 (the pad token) to ``pad_to``."""
    lookup = np.arange(raw_vocab, dtype=np.int64) % compressed
    lookup[2] = pad_to
    return CompressionMap(lookup=lookup, num_compressed=compressed)


@pytest.fixture(scope="module")
def released_hasher() -> NgramHasher:
    cfg = v41.V41EngramConfig.from_json({"text_config": RELEASED})
    return v41.v41_hasher(cfg, compression(RAW_VOCAB, 99092))


def test_hasher_table_sizes_are_the_released_ones():
    h = NgramHasher(99092, 4, 8, base_sizes=[16_000_000] * 3, layer_ids=[1, 14])
    assert [h.total_rows(1), h.total_rows(14)] == [384006168, 384016682]
    assert h.heads_per_layer == 24 and all(p > 16_000_000 for L in (1, 14) for p in h.head_sizes(L))


def test_released_config_builds_the_reference_hasher(tmp_path, released_hasher):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekV41ForCausalLM"],
                                                      "text_config": RELEASED}))
    cfg = v41.V41EngramConfig.from_json(tmp_path)  # the directory of a download
    assert cfg.engram_num_embeddings == (384006168, 384016682) and cfg.rows_per_token == 24
    assert cfg.table_name(14) == "layers.14.engram.embed.weight"
    h = released_hasher
    assert h.pad_id == 57, "the raw pad id 2 is mapped through the compression"
    bound = ((2**63 - 1) // 99092) // 2  # the reference's multipliers, recomputed here
    for L in (1, 14):
        want = np.random.default_rng(10007 * L).integers(0, bound, size=4, dtype=np.int64) * 2 + 1
        assert np.array_equal(h.multipliers[L], want)
    # positions before the start hash as the compressed pad id
    x = np.array([[5, 900, 31, 77, 4]])
    padded = np.concatenate([np.full((1, 3), 57), x], axis=1)
    for L, rows in h.hash(x).items():
        assert np.array_equal(rows, h.hash(padded)[L][:, 3:])


@pytest.mark.parametrize("sizes", [[384006168 + 1, 384016682], [384016682, 384006168], [384006168]])
def test_mismatched_num_embeddings_is_refused(sizes):
    with pytest.raises(EngramConfigError, match=r"engram_num_embeddings|one table size per Engram layer"):
        cfg = v41.V41EngramConfig.from_json({"text_config": {**RELEASED, "engram_num_embeddings": sizes}})
        v41.v41_hasher(cfg, compression(RAW_VOCAB, 99092))


def test_mismatch_message_names_both_sizes():
    cfg = v41.V41EngramConfig.from_json({"text_config": {**RELEASED, "engram_vocab_size": 15_999_000}})
    with pytest.raises(EngramConfigError, match=r"\[384006168, 384016682\] but the primes .* give \[\d+, \d+\]"):
        v41.v41_hasher(cfg, compression(RAW_VOCAB, 99092))


def test_wrong_tokenizer_or_config_is_refused():
    cfg = v41.V41EngramConfig.from_json({"text_config": RELEASED})
    with pytest.raises(EngramConfigError, match="compresses to 99000 ids.*99092"):
        v41.v41_hasher(cfg, compression(RAW_VOCAB, 99000))
    with pytest.raises(EngramConfigError, match="engram_pad_token_id=2 is not a token id"):
        v41.v41_hasher(cfg, CompressionMap(lookup=np.arange(2), num_compressed=99092))
    with pytest.raises(EngramConfigError, match="has no 'engram_head_dim'"):
        v41.V41EngramConfig.from_json({"text_config": {k: v for k, v in RELEASED.items() if k != "engram_head_dim"}})
    with pytest.raises(EngramConfigError, match="engram_n_heads='8' must be an integer"):
        v41.V41EngramConfig.from_json({"text_config": {**RELEASED, "engram_n_heads": "8"}})


def test_model_for_released_tables_allocates_no_table(monkeypatch):
    """384M x 256 rows per layer: building the serving model must not allocate them (the
    in-memory table was created and then dropped before, 393 GB of float32)."""
    def boom(*a, **k):
        raise AssertionError("an in-memory Engram table was allocated")

    monkeypatch.setattr(EmbeddingMemory, "__init__", boom)
    cfg = v41.V41EngramConfig.from_json({"text_config": RELEASED})
    model = v41.v41_model(cfg, compression(RAW_VOCAB, 99092), d_model=32, n_head=2, d_ff=32)
    assert model.num_params()["tables"] == 0
    mem = model.blocks[14].engram.memory
    assert (mem.rows, mem.dim) == (384016682, 256)
    with pytest.raises(EngramConfigError, match="not loaded"):
        model(torch.zeros(1, 3, dtype=torch.int64))


def test_model_serves_v41_tables_through_the_store_exactly(tmp_path):
    """A V4.1-shaped checkpoint at a small engram_vocab_size: the store-served model gives the
    same logits, bit for bit, as the same model holding the dequantized tables in memory
    (the oracle's dequantization, not the store's), through the device, host and disk tiers."""
    layers, raw_vocab, compressed = [1, 3], 300, 250
    sizes = NgramHasher(compressed, 4, 8, base_sizes=[500] * 3, layer_ids=layers)
    text = {**RELEASED, "engram_layer_ids": layers, "engram_vocab_size": 500,
            "engram_num_embeddings": [sizes.total_rows(L) for L in layers], "engram_compressed_vocab_size": compressed}
    raw = write_v41_checkpoint(tmp_path / "ckpt", {L: sizes.total_rows(L) for L in layers}, text_config=text,
                               scale_codes=(118, 124))  # scales 2**-9 .. 2**-4, like trained rows
    cfg = v41.V41EngramConfig.from_json(tmp_path / "ckpt" / "config.json")
    cmap = compression(raw_vocab, compressed, pad_to=11)
    store_path = tierstore.build_store(tmp_path / "ckpt", tmp_path / "store", progress=False)

    dense = dict(d_model=32, n_head=2, d_ff=64, max_seq_len=64)
    served = v41.v41_model(cfg, cmap, seed=3, **dense)
    resident = v41.v41_model(cfg, cmap, seed=3, **dense)
    quant = Quant(FP8_SCHEME, 32, 256)
    for L in layers:
        mem = EmbeddingMemory(sizes.total_rows(L), 256)
        mem.weight.data = oracle_bf16(raw[embed(L)], raw[scale_of(embed(L))], quant).float()
        resident.blocks[L].engram.memory = mem
    table_bytes = sum(sizes.total_rows(L) for L in layers) * quant.row_bytes
    with tierstore.open(store_path, device="cpu", device_budget=table_bytes // 20, host_budget=table_bytes // 8) as store:
        served.attach_store(store, sync_below=0)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, raw_vocab, (3, 16), generator=g) for _ in range(3)]
        plan = served.prepare(prompts[0])
        assert plan.futures[3].result().shape == (3, 16, 24, 256), "24 rows of 256 values per token per layer"
        with torch.no_grad():
            logits = []
            for idx in prompts:
                a, _ = resident(idx)
                b, _ = served(idx)
                assert torch.isfinite(a).all()
                assert torch.equal(a, b), f"max |served - resident| = {(a - b).abs().max().item()}"
                logits.append(b)
            ca, cb = InferenceCache(resident, 3), InferenceCache(served, 3)
            resident(prompts[1], cache=ca)
            served(prompts[1], cache=cb)
            for t in range(4):
                nxt = prompts[2][:, t : t + 1]
                a, _ = resident(nxt, cache=ca)
                b, _ = served(nxt, cache=cb)
                assert torch.equal(a, b), f"decode step {t}: max diff {(a - b).abs().max().item()}"
        st = store.stats()
    assert st["disk"]["rows_read"] > 0 and st["host"]["hits"] > 0, st
    # negative control: the rows reach the logits (W_v is random, not zero), so the equality
    # above compares the tables; zeroing one table changes the output
    resident.blocks[1].engram.memory.weight.data.zero_()
    with torch.no_grad():
        assert not torch.equal(resident(prompts[0])[0], logits[0])
