"""Test helpers for DeepSeek-V4.1-style quantized tables: an independent dequantization
oracle in plain numpy, and a writer of small checkpoints in the released layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tierstore.format.quant import FP8_SCHEME, Quant


def e4m3_value(b: np.ndarray) -> np.ndarray:
    """E4M3 ("fn") bytes -> float64: sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 is subnormal (m/8 * 2**-6); 0x7F/0xFF are NaN; no infinities."""
    b = b.astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, np.ldexp(m / 8.0, -6), np.ldexp(1.0 + m / 8.0, e - 7))
    return np.where((e == 0xF) & (m == 0x7), np.nan, sign * mag)


def e2m1_value(c: np.ndarray) -> np.ndarray:
    """E2M1 nibbles -> float64: sign bit 3, 2 exponent bits (bias 1), 1 mantissa bit."""
    c = c.astype(np.int64)
    sign = np.where(c & 0x8, -1.0, 1.0)
    e, m = (c >> 1) & 0x3, c & 0x1
    return sign * np.where(e == 0, m * 0.5, np.ldexp(1.0 + m / 2.0, e - 1))


def e8m0_value(b: np.ndarray) -> np.ndarray:
    """UE8M0 bytes -> float64: 2**(e - 127); 0xFF is NaN."""
    e = b.astype(np.int64)
    return np.where(e == 0xFF, np.nan, np.ldexp(1.0, e - 127))


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 bits (uint16), round to nearest even. The products here are exact
    in float32 (at most 4 significant bits, exponents >= -136) unless they overflow it, and
    then they overflow bfloat16 too; so one float32 step, then RNE on the top 16 bits."""
    with np.errstate(over="ignore"):
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def oracle(values: np.ndarray, scales: np.ndarray, quant: Quant) -> tuple[np.ndarray, np.ndarray]:
    """(bf16 bits, NaN mask) of rows given as value bytes (n, value_bytes) and scale bytes (n, k)."""
    if quant.scheme == FP8_SCHEME:
        v = e4m3_value(values)
    else:  # low nibble first
        v = e2m1_value(np.stack([values & 0xF, values >> 4], axis=-1).reshape(len(values), -1))
    s = np.repeat(e8m0_value(scales), quant.block, axis=1)
    x = v * s
    return bf16_bits(x), np.isnan(x)


def assert_dequantized(got: torch.Tensor, values: np.ndarray, scales: np.ndarray, quant: Quant) -> None:
    want, nan = oracle(values.reshape(-1, values.shape[-1]), scales.reshape(-1, scales.shape[-1]), quant)
    assert got.dtype == torch.bfloat16
    g = got.detach().cpu().reshape(len(want), quant.values).view(torch.int16).numpy().view(np.uint16)
    g_nan = got.detach().cpu().reshape(len(want), -1).isnan().numpy()
    assert np.array_equal(g_nan, nan), f"{(g_nan != nan).sum()} NaN positions differ"
    bad = (g != want) & ~nan
    assert not bad.any(), (f"{bad.sum()} of {bad.size} values differ from the oracle, e.g. bits "
                           f"{g[bad][:4]} vs {want[bad][:4]}")


def oracle_bf16(values: np.ndarray, scales: np.ndarray, quant: Quant) -> torch.Tensor:
    """The oracle's rows as a bfloat16 tensor (n, values)."""
    bits_, _ = oracle(values, scales, quant)
    return torch.from_numpy(bits_.view(np.int16)).view(torch.bfloat16)


def embed(layer: int) -> str:
    return f"layers.{layer}.engram.embed.weight"


def scale_of(name: str) -> str:
    return name[: -len("weight")] + "scale"


def write_v41_checkpoint(root: Path, layers: dict[int, int], *, fp4: bool = False, seed: int = 0,
                         drop: str | None = None, override: dict | None = None,
                         text_config: dict | None = None,
                         scale_codes: tuple[int, int] = (110, 140)) -> dict[str, np.ndarray]:
    """A checkpoint directory in the released layout: sharded safetensors + index; dense tensors
    (bf16, fp8 with 32x32-block scales, the Engram projections) in the first shard; each Engram
    table (F8_E4M3 [rows, 256] or packed FP4 U8 [rows, 128]) and its F8_E8M0 [rows, 8] scale in
    a shard of its own at the end. Returns the raw bytes of the tables and scales."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    u8 = lambda shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    dense = {
        "embed.weight": torch.randn(64, 32).bfloat16(),
        "layers.0.attn.wq_a.weight": torch.from_numpy(u8((64, 32))).view(torch.float8_e4m3fn),
        "layers.0.attn.wq_a.scale": torch.from_numpy(u8((2, 1))).view(torch.float8_e8m0fnu),
        "layers.1.engram.wkv.weight": torch.from_numpy(u8((64, 48))).view(torch.float8_e4m3fn),
        "layers.1.engram.wkv.scale": torch.from_numpy(u8((2, 2))).view(torch.float8_e8m0fnu),
        "layers.1.engram.k_weight": torch.randn(4, 32).bfloat16(),
    }
    shards = [dense]
    raw: dict[str, np.ndarray] = {}
    for layer, rows in layers.items():
        w = u8((rows, 128 if fp4 else 256))
        if not fp4:
            w[(w & 0x7F) == 0x7F] -= 1  # no NaN codes (0x7F/0xFF): trained rows are finite
        s = rng.integers(*scale_codes, (rows, 8), dtype=np.uint8)  # UE8M0 codes: 2**(code - 127)
        raw[embed(layer)], raw[scale_of(embed(layer))] = w, s
        wt = torch.from_numpy(w) if fp4 else torch.from_numpy(w).view(torch.float8_e4m3fn)
        shards.append({embed(layer): wt, scale_of(embed(layer)): torch.from_numpy(s).view(torch.float8_e8m0fnu)})
    for name, t in (override or {}).items():
        shards[-1][name] = t
    weight_map = {}
    for i, tensors in enumerate(shards):
        tensors = {k: v for k, v in tensors.items() if k != drop}
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(root / fname))
        weight_map.update({k: fname for k in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = {"engram_layer_ids": list(layers), "engram_n_heads": 8, "engram_head_dim": 256, **(text_config or {})}
    (root / "config.json").write_text(json.dumps({"architectures": ["DeepseekV41ForCausalLM"], "text_config": text,
                                                  "quantization_config": {"quant_method": "fp8", "scale_fmt": "ue8m0"}}))
    return raw
