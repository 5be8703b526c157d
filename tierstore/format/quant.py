"""Block-scaled quantized rows: fp8 (E4M3) or fp4 (E2M1) values, one UE8M0 scale per block.

DeepSeek-V4.1-Flash ships its Engram tables this way: ``layers.{L}.engram.embed.weight``
(F8_E4M3, ``[rows, 256]``) with ``layers.{L}.engram.embed.scale`` (F8_E8M0, ``[rows, 8]``:
one power of two per 32 values); some repacks hold the values as packed FP4 E2M1 (U8
``[rows, 128]``, low nibble first) with the same scales. A store keeps each row *with its
scales*, as one stored row of raw bytes::

    [ value bytes (256 fp8, or 128 fp4 pairs) | scale bytes (8 UE8M0) ]   264 or 136 bytes

so one page read brings both, and every tier holds the quantized bytes (264 B per row
instead of 512 B of bf16). The manifest records the scheme (``TableInfo.quant``); the
stored table is ``uint8`` with ``dim`` = the stored row's bytes.

Dequantization (``dequantize``) is ``value x 2**(e - 127)`` rounded once to bfloat16. It is
exact wherever the product is in bf16's range: an fp8 value has a 4-bit significand and an
fp4 value a 2-bit one, bf16 has 8, and a power of two only moves the exponent. Out of
range it is the correctly rounded bf16 (inf past the top, bf16 subnormals at the bottom),
the same as DeepSeek's reference (``value.float() * scale``, then ``.bfloat16()``): the
product is formed exactly in float32 by torch's bf16 multiply and rounded once.

UE8M0 (OCP MX): byte ``e`` is ``2**(e - 127)``; 0xFF is NaN; there is no zero or sign.
E4M3 ("fn"): sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals, NaN at
0x7F/0xFF, no infinities. E2M1: sign, 2 exponent bits (bias 1), 1 mantissa bit, so the
magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import TierStoreError

__all__ = ["Quant", "SCHEMES", "FP8_SCHEME", "FP4_SCHEME", "dequantize", "split_rows"]

FP8_SCHEME = "fp8_e4m3/ue8m0"
FP4_SCHEME = "fp4_e2m1/ue8m0"
# scheme -> values per value byte
SCHEMES: dict[str, int] = {FP8_SCHEME: 1, FP4_SCHEME: 2}

# E2M1 code -> value (bit 3 is the sign): exact in bf16
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_CHUNK = 1 << 16  # rows per step of the fp4 gather: its int32 index scratch stays ~32 MiB


@dataclass(frozen=True)
class Quant:
    """How a quantized table's stored rows decode (the manifest's ``quant`` field).

    scheme: ``"fp8_e4m3/ue8m0"`` or ``"fp4_e2m1/ue8m0"``.
    block: values per scale (32 in DeepSeek-V4.1).
    values: values per row after dequantization (256 in DeepSeek-V4.1): what a lookup returns.
    """

    scheme: str
    block: int
    values: int

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise TierStoreError(f"quantization scheme {self.scheme!r} is unknown; known: {', '.join(SCHEMES)}")
        for key in ("block", "values"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TierStoreError(f"quant {key}={v!r} must be a positive integer")
        if self.values % self.block:
            raise TierStoreError(f"quant values={self.values} is not a whole number of blocks of {self.block}")
        if self.values % SCHEMES[self.scheme]:
            raise TierStoreError(f"quant values={self.values} must be even: {self.scheme} packs two per byte")

    @property
    def value_bytes(self) -> int:
        """Bytes of a row's values (the first part of a stored row)."""
        return self.values // SCHEMES[self.scheme]

    @property
    def n_scales(self) -> int:
        """Scales per row (one UE8M0 byte each, after the values)."""
        return self.values // self.block

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row: values then scales."""
        return self.value_bytes + self.n_scales

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "block": self.block, "values": self.values}


def split_rows(rows: torch.Tensor, quant: Quant) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of stored rows ``(..., row_bytes)`` uint8 as ``(values, scales)``: the values as
    ``float8_e4m3fn (..., values)`` (fp8) or packed ``uint8 (..., values / 2)`` (fp4, low
    nibble first), the scales as ``float8_e8m0fnu (..., n_scales)``. No copy."""
    _check_rows(rows, quant)
    values = rows[..., : quant.value_bytes]
    if quant.scheme == FP8_SCHEME:
        values = values.view(torch.float8_e4m3fn)
    return values, rows[..., quant.value_bytes :].view(torch.float8_e8m0fnu)


def _check_rows(rows: torch.Tensor, quant: Quant) -> None:
    if rows.dtype != torch.uint8 or rows.dim() < 1 or rows.shape[-1] != quant.row_bytes:
        raise TierStoreError(f"stored rows of a {quant.scheme} table must be uint8 (..., {quant.row_bytes}); "
                             f"got {rows.dtype} {tuple(rows.shape)}")


def _scales_bf16(scales: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes -> bfloat16 powers of two, by bits: bf16 has UE8M0's 8-bit exponent, so
    ``e << 7`` is ``2**(e - 127)`` for e in 1..254; e = 0 is the bf16 subnormal 0x0040 and
    e = 255 is NaN. Built from bits rather than a dtype conversion so that it is the same on
    every device (float8_e8m0fnu casts are not implemented everywhere)."""
    e = scales.to(torch.int16)
    bits = torch.where(e == 0, 0x0040, torch.where(e == 255, 0x7FC0, e << 7))
    return bits.to(torch.int16).view(torch.bfloat16)


def dequantize(rows: torch.Tensor, quant: Quant, out: torch.Tensor | None = None) -> torch.Tensor:
    """bfloat16 rows ``(..., values)`` from stored rows ``(..., row_bytes)`` uint8 (see the module
    docstring for the arithmetic). Vectorised torch on the rows' device (CPU or CUDA): the
    values are widened into ``out`` and multiplied in place by their block's scale, so the
    only scratch is the scales (and, for fp4, a bounded gather index).

    out: a contiguous bfloat16 tensor of the result's shape on the rows' device to fill.
    """
    _check_rows(rows, quant)
    lead = tuple(rows.shape[:-1])
    if out is None:
        out = torch.empty(lead + (quant.values,), dtype=torch.bfloat16, device=rows.device)
    elif (out.dtype != torch.bfloat16 or tuple(out.shape) != lead + (quant.values,) or out.device != rows.device
          or not out.is_contiguous()):
        raise TierStoreError(f"out= must be a contiguous bfloat16 tensor of shape {lead + (quant.values,)} on "
                             f"{rows.device}; got {out.dtype} {tuple(out.shape)} on {out.device}")
    n = int(np.prod(lead, dtype=np.int64))
    if n == 0:
        return out
    flat = rows.reshape(n, quant.row_bytes)
    dst = out.view(n, quant.values)
    values = flat[:, : quant.value_bytes]
    if quant.scheme == FP8_SCHEME:
        dst.copy_(values.view(torch.float8_e4m3fn))  # exact: every E4M3 value is a bf16 value
    else:
        mags = torch.tensor(_E2M1, dtype=torch.bfloat16)
        lut = torch.cat([mags, -mags])  # code -> value, sign in bit 3 (-0.0 for 0x8)
        pair = torch.stack([lut.repeat(16), lut.repeat_interleave(16)], dim=1).to(rows.device)  # byte -> (lo, hi)
        for s in range(0, n, _FP4_CHUNK):  # a loop over chunks of rows, not rows
            e = min(n, s + _FP4_CHUNK)
            idx = values[s:e].reshape(-1).to(torch.int32)
            dst[s:e].view(-1, 2).copy_(pair.index_select(0, idx))
    # one rounding: torch multiplies bf16 in float32 (exact here) and rounds to nearest even
    dst.view(n, quant.n_scales, quant.block).mul_(_scales_bf16(flat[:, quant.value_bytes :]).unsqueeze(-1))
    return out
