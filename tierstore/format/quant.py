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

Speed: torch's CPU fp8 conversion costs ~7 ns a value, so on CPU every (scale byte, value
byte) pair is dequantized once into a table (128 KiB for fp8, 256 KiB for fp4) and a
compiled GIL-free gather reads it: 21.6 ms per 65,536 fp8 rows (3.0M rows/s, 1.3 ns a
value, one thread; 9.3 ms for fp4) against 176 ms elementwise (measured here). On CUDA
the elementwise torch path runs (it also builds the tables, so the two agree).

UE8M0 (OCP MX): byte ``e`` is ``2**(e - 127)``; 0xFF is NaN; there is no zero or sign.
A NaN scale is kept: its block dequantizes to NaN, as the reference arithmetic does. The
build counts them per table (``source["nan_scales"]`` in the manifest, shown by ``tierstore
inspect``) and warns with :class:`NanScaleWarning` when a table has any.
E4M3 ("fn"): sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals, NaN at
0x7F/0xFF, no infinities. E2M1: sign, 2 exponent bits (bias 1), 1 mantissa bit, so the
magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import functools

import numpy as np
import torch

from ..errors import TierStoreError
from ..jit import kernel

__all__ = ["Quant", "SCHEMES", "FP8_SCHEME", "FP4_SCHEME", "NAN_SCALE", "NanScaleWarning", "dequantize",
           "split_rows"]

FP8_SCHEME = "fp8_e4m3/ue8m0"
FP4_SCHEME = "fp4_e2m1/ue8m0"
# scheme -> values per value byte
SCHEMES: dict[str, int] = {FP8_SCHEME: 1, FP4_SCHEME: 2}

NAN_SCALE = 0xFF  # the UE8M0 code of NaN


class NanScaleWarning(UserWarning):
    """A quantized table's block scales hold NaN codes (UE8M0 0xFF): the build keeps them
    (bit-exact to the reference, whose blocks dequantize to NaN too) and says how many."""


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
        if SCHEMES[self.scheme] == 2 and self.block % 2:
            raise TierStoreError(f"quant block={self.block} must be even: {self.scheme} packs two values per byte, "
                                 "so a scale's block must be whole bytes")

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
    docstring for the arithmetic), on the rows' device. No Python per row: on CPU one compiled
    table gather (``_gather_table``), elsewhere (CUDA) vectorised torch (``_dequantize_torch``).

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
    if rows.device.type == "cpu":
        src = flat.contiguous().numpy()
        if quant.scheme == FP8_SCHEME:  # one bf16 (uint16) per value byte
            _gather_table(src, quant.value_bytes, quant.block, _table(quant.scheme), dst.view(torch.int16).numpy()
                          .view(np.uint16))
        else:  # two bf16 (one uint32) per value byte
            _gather_table(src, quant.value_bytes, quant.block // 2, _table(quant.scheme),
                          dst.view(n, quant.value_bytes, 2).view(torch.int32).numpy().reshape(n, quant.value_bytes)
                          .view(np.uint32))
    else:
        _dequantize_torch(flat, quant, dst)
    return out


def _dequantize_torch(flat: torch.Tensor, quant: Quant, dst: torch.Tensor) -> None:
    """Stored rows (n, row_bytes) -> bf16 ``dst`` (n, values), elementwise torch on any device:
    the values are widened into ``dst`` (exact: every E4M3/E2M1 value is a bf16 value), then
    multiplied in place by their block's scale. The only scratch is the scales and, for fp4,
    a bounded gather index. On CPU it runs only to build the tables of ``_table`` (torch's
    CPU fp8 conversion costs ~7 ns a value; the table gather, well under 1)."""
    n = flat.shape[0]
    values = flat[:, : quant.value_bytes]
    if quant.scheme == FP8_SCHEME:
        dst.copy_(values.view(torch.float8_e4m3fn))
    else:
        mags = torch.tensor(_E2M1, dtype=torch.bfloat16)
        lut = torch.cat([mags, -mags])  # code -> value, sign in bit 3 (-0.0 for 0x8)
        pair = torch.stack([lut.repeat(16), lut.repeat_interleave(16)], dim=1).to(flat.device)  # byte -> (lo, hi)
        for s in range(0, n, _FP4_CHUNK):  # a loop over chunks of rows, not rows
            e = min(n, s + _FP4_CHUNK)
            idx = values[s:e].reshape(-1).to(torch.int32)
            dst[s:e].view(-1, 2).copy_(pair.index_select(0, idx))
    # one rounding: torch multiplies bf16 in float32 (exact here) and rounds to nearest even
    dst.view(n, quant.n_scales, quant.block).mul_(_scales_bf16(flat[:, quant.value_bytes :]).unsqueeze(-1))


@functools.cache
def _table(scheme: str) -> np.ndarray:
    """Every (scale byte, value byte) pair dequantized once: ``table[e * 256 + b]`` is the bf16
    bits of byte ``b`` under scale ``e`` (fp8: uint16, 128 KiB; fp4: uint32, the two values
    of the byte, low nibble in the low half, 256 KiB: both stay in L2). Built by
    ``_dequantize_torch`` itself, so the two paths agree by construction (the tests hold
    both to an independent oracle)."""
    per_byte = SCHEMES[scheme]
    q = Quant(scheme, per_byte, per_byte)  # a "row" of one value byte and one scale byte
    codes = torch.arange(256, dtype=torch.uint8)
    rows = torch.stack([codes.repeat(256), codes.repeat_interleave(256)], dim=1)  # row e * 256 + b: [b, e]
    out = torch.empty(256 * 256, q.values, dtype=torch.bfloat16)
    _dequantize_torch(rows, q, out)
    bits = out.view(torch.int16).numpy().view(np.uint16)[:, : per_byte]  # one value byte's bf16 value(s)
    return np.ascontiguousarray(bits).view(np.uint16 if per_byte == 1 else np.uint32).reshape(-1)


@kernel
def _gather_table(rows, value_bytes, block_bytes, table, out):  # pragma: no cover - compiled
    """out[i, k] = table[scale_byte * 256 + value_byte] for every value byte k of every row i:
    rows uint8 (n, row_bytes), out (n, value_bytes) of the table's dtype. GIL-free."""
    n = rows.shape[0]
    for i in range(n):
        for j in range(value_bytes // block_bytes):
            base = np.int64(rows[i, value_bytes + j]) * 256
            for k in range(j * block_bytes, (j + 1) * block_bytes):
                out[i, k] = table[base + rows[i, k]]
