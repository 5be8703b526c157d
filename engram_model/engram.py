"""The Engram layer: gated n-gram memory added to the residual stream (docs/engram.md, steps 4-7).

Per position t, given the rows e_t fetched for its (N-1)*K hashed n-grams:

    k_m = W_k[m] e_t,  v = W_v e_t                      (m = 1..M branches; W_v shared)
    g_m = <RMSNorm(h_t,m), RMSNorm(k_m)> / sqrt(d)
    g_m = sign(g_m) * sqrt(max(|g_m|, 1e-6))            (signed sqrt, config switch)
    u_t,m = sigmoid(g_m) * v
    y = u + SiLU(DepthwiseCausalConv1d(RMSNorm(u)))     (kernel 4, dilation N, zero-init)
    h <- h + y

The gate lets the hidden state (which has seen the whole context) veto a memory row that
does not fit: hash collisions and ambiguous n-grams. The convolution is zero-initialized,
so at init the layer adds exactly the gated value. Dilation N lets the conv see the
previous n-gram spans instead of overlapping ones.

Decoding: the causal conv needs the last (kernel-1)*dilation normalized inputs; they are
kept in a :class:`ConvState` so one new token costs one conv step, like a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_model.errors import EngramConfigError
from engram_model.memory import EmbeddingMemory, MemorySource, UnattachedMemory

__all__ = ["EngramConfig", "EngramLayer", "ConvState"]


@dataclass
class EngramConfig:
    """Shapes of one Engram layer (the model fills it from ModelConfig)."""

    d_model: int  # width d of the residual stream
    max_ngram_size: int = 3  # N: orders 2..N are hashed
    n_head_per_ngram: int = 8  # K heads (tables) per order
    d_mem: int = 128  # values per order; each head's row holds d_mem / K values
    kernel_size: int = 4  # causal conv taps
    signed_sqrt: bool = True  # the demo's sign(g)*sqrt(|g|) before the sigmoid
    branches: int = 1  # M residual branches (hyper-connections); tables and W_v shared
    init_std: float = 1.0  # N(0, std) init of the table rows (the demo's nn.Embedding default)
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.branches < 1 or self.kernel_size < 1:
            raise EngramConfigError(f"d_model, branches, kernel_size must be >= 1: {self}")
        if self.max_ngram_size < 2:
            raise EngramConfigError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if self.d_mem % self.n_head_per_ngram:
            raise EngramConfigError(
                f"d_mem={self.d_mem} must be a multiple of n_head_per_ngram={self.n_head_per_ngram}"
            )

    @property
    def d_head(self) -> int:
        """Values per table row."""
        return self.d_mem // self.n_head_per_ngram

    @property
    def n_heads(self) -> int:
        """H = (N-1)*K rows fetched per position."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def d_retrieved(self) -> int:
        """Width of e_t: (N-1) * d_mem."""
        return self.n_heads * self.d_head

    @property
    def conv_context(self) -> int:
        """Past positions the causal conv reads: (kernel - 1) * dilation."""
        return (self.kernel_size - 1) * self.max_ngram_size


class ConvState:
    """The causal conv's memory for incremental decoding: last ``conv_context`` inputs."""

    def __init__(self, batch: int, context: int, channels: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None):
        self.buf = torch.zeros(batch, context, channels, dtype=dtype, device=device)  # (B, ctx, M*d)

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        """Return [past; x] along time and keep its last ``context`` steps as the new past."""
        full = torch.cat([self.buf, x], dim=1)  # (B, ctx+T, M*d)
        self.buf = full[:, full.shape[1] - self.buf.shape[1] :].clone()
        return full


class EngramLayer(nn.Module):
    """One Engram layer. ``memory`` holds (or serves) the packed table of ``sum(head_sizes)`` rows.

    Args:
        cfg: shapes.
        head_sizes: the layer's (N-1)*K table sizes (primes) in hasher output order.
        tables: False leaves the table out (a placeholder until a store is attached): a
            served table can be far larger than memory (DeepSeek-V4.1: 384M rows x 256).
    """

    def __init__(self, cfg: EngramConfig, head_sizes: list[int], tables: bool = True):
        super().__init__()
        if len(head_sizes) != cfg.n_heads:
            raise EngramConfigError(f"need {cfg.n_heads} head sizes, got {len(head_sizes)}")
        self.cfg = cfg
        d, M, E = cfg.d_model, cfg.branches, cfg.d_retrieved
        offsets = [0]
        for s in head_sizes[:-1]:
            offsets.append(offsets[-1] + s)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        # the hasher's ids are on the CPU even when the model is on a GPU: pack them there
        # (a plain attribute, which .to(device) leaves on the CPU) rather than copy offsets back
        self._offsets_host = torch.tensor(offsets, dtype=torch.int64)
        self.memory: MemorySource = (EmbeddingMemory(sum(head_sizes), cfg.d_head, init_std=cfg.init_std) if tables
                                     else UnattachedMemory(sum(head_sizes), cfg.d_head))
        self.value_proj = nn.Linear(E, d)
        self.key_projs = nn.ModuleList([nn.Linear(E, d) for _ in range(M)])
        self.norm_key = nn.ModuleList([nn.RMSNorm(d, eps=cfg.norm_eps) for _ in range(M)])
        self.norm_query = nn.ModuleList([nn.RMSNorm(d, eps=cfg.norm_eps) for _ in range(M)])
        self.norm_conv = nn.ModuleList([nn.RMSNorm(d, eps=cfg.norm_eps) for _ in range(M)])
        # depthwise over all M*d channels; causal padding is done by hand (left only)
        self.conv = nn.Conv1d(M * d, M * d, cfg.kernel_size, groups=M * d, bias=False, dilation=cfg.max_ngram_size)
        nn.init.zeros_(self.conv.weight)

    def pack(self, row_ids: torch.Tensor) -> torch.Tensor:
        """Per-head row ids (B, T, H) from the hasher -> rows of the packed table (on the ids' device)."""
        if row_ids.device == self.offsets.device:
            return row_ids + self.offsets
        return row_ids + self._offsets_host.to(row_ids.device)

    def forward(self, h: torch.Tensor, rows: torch.Tensor, conv_state: ConvState | None = None) -> torch.Tensor:
        """Return the residual update y (same shape as ``h``).

        h: (B, T, M, d) hidden states (or (B, T, d) when M = 1); rows: (B, T, H, d_head).
        conv_state: past conv inputs when decoding with a cache; None means the sequence
        starts here (zeros before it).
        """
        squeeze = h.dim() == 3
        if squeeze:
            h = h.unsqueeze(2)
        B, T, M, d = h.shape
        e = rows.to(h.dtype).flatten(2)  # (B, T, H*d_head) = (B, T, E)
        v = self.value_proj(e)  # (B, T, d)
        gates = []
        for m in range(M):
            k = self.norm_key[m](self.key_projs[m](e))  # (B, T, d)
            q = self.norm_query[m](h[:, :, m])  # (B, T, d)
            g = (k * q).sum(-1) / math.sqrt(d)  # (B, T)
            if self.cfg.signed_sqrt:
                g = g.abs().clamp_min(1e-6).sqrt() * g.sign()
            gates.append(g.sigmoid())
        u = torch.stack(gates, dim=2).unsqueeze(-1) * v.unsqueeze(2)  # (B, T, M, d)

        x = torch.cat([self.norm_conv[m](u[:, :, m]) for m in range(M)], dim=-1)  # (B, T, M*d)
        ctx = self.cfg.conv_context
        if conv_state is None:
            x = F.pad(x, (0, 0, ctx, 0))  # zeros before the start: causal
        else:
            x = conv_state.extend(x)
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, M*d): only the T new steps
        y = u + F.silu(y).view(B, T, M, d)
        return y.squeeze(2) if squeeze else y
