"""A small decoder-only LM with Engram memory at configurable blocks (nanoGPT-style, one file).

Backbone: token embedding (tied with the output head), n_layer pre-norm blocks of
RMSNorm -> rotary causal attention and RMSNorm -> SwiGLU feed-forward (or a small top-k
MoE), a final RMSNorm. Blocks listed in ``engram_layers`` first add an Engram update to
the residual stream (docs/engram.md step 7: before attention and FFN).

Engram addressing depends only on the input ids, so :meth:`EngramLM.prepare` hashes the
ids for every Engram layer and starts every row fetch before the first block runs;
each Engram block then only waits on its own future. A caller that already knows the
next batch can call ``prepare`` for it while the current batch computes and pass the
plan to ``forward``.

Multi-branch residual (``engram_branches`` = M > 1): a static hyper-connection. The
stream is M copies (B, T, M, d); Engram updates every branch with its own gate; attention
and FFN read a learned mix of the branches and write back with per-branch weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_model.engram import ConvState, EngramConfig, EngramLayer
from engram_model.errors import EngramConfigError
from engram_model.flags import setting
from engram_model.hasher import NgramHasher
from engram_model.memory import RowsFuture, StoreMemory

if TYPE_CHECKING:  # the model reaches the store only through StoreMemory
    import tierstore

__all__ = ["ModelConfig", "EngramLM", "EngramPlan", "InferenceCache", "table_name"]


# An Engram layer's packed table is the parameter ``blocks.<i>.engram.memory.weight`` of an
# in-memory model and, by default, the store table of the same name (``tierstore build``
# makes store tables of exactly those parameters).
TABLE_PARAM = "engram.memory.weight"
ENGRAM_TABLE = "blocks.{layer}." + TABLE_PARAM

@dataclass
class ModelConfig:
    """Every model setting, once: ``engram_model.flags`` derives train.py's flags from these
    fields (``--n-layer``, ...), and checkpoints save them as ``config.json["model"]``."""

    # backbone
    vocab_size: int = setting(8192, "raw tokenizer vocabulary (embedding rows and logits)", cli=False)  # from the tokenizer
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "attention heads; head dim = d_model / n_head")
    d_model: int = setting(192, "residual stream width")
    d_ff: int = setting(512, "SwiGLU hidden width (per expert with MoE)")
    max_seq_len: int = setting(256, "longest sequence (rotary table and KV cache size)", cli=False)  # from --seq-len
    rope_theta: float = setting(10000.0, "rotary base")
    norm_eps: float = setting(1e-5, "RMSNorm epsilon")
    n_expert: int = setting(0, "0: dense SwiGLU FFN; > 0: top-k MoE feed-forward with this many experts")
    moe_top_k: int = setting(2, "experts per token when n_expert > 0")
    # Engram (docs/engram.md); engram_layers = [] gives the plain baseline
    engram_layers: list[int] = setting([1], "blocks (from 0) with an Engram layer", group="engram")
    engram_vocab_size: int = setting(0, "compressed vocabulary V' (from the tokenizer's CompressionMap)", cli=False)
    engram_pad_id: int = setting(0, "compressed id of the pad token (positions before the start)", cli=False)
    engram_max_ngram: int = setting(3, "N: hash n-gram orders 2..N", group="engram")
    engram_heads: int = setting(8, "K hash heads (tables) per order", group="engram")
    engram_d_mem: int = setting(128, "values per order; row width = engram_d_mem / engram_heads", group="engram")
    engram_base_size: int = setting(0, "per-head table size before rounding to primes; 0: 5 x compressed vocabulary",
                                    group="engram")
    engram_seed: int = setting(0, "hash seed (multipliers of layer L from seed + 10007 * L)", group="engram")
    engram_kernel: int = setting(4, "causal conv taps (dilation = N)", group="engram")
    engram_signed_sqrt: bool = setting(True, "sign(g)*sqrt(|g|) on the gate logit (as the public demo)",
                                       flag="--no-signed-sqrt", group="engram")
    engram_branches: int = setting(1, "M residual branches (hyper-connections); 1 = plain stream", group="engram")
    engram_init_std: float = setting(1.0, "N(0, std) init of table rows", group="engram")
    engram_zero_value: bool = setting(True, "W_v starts at 0, so each Engram layer starts as an exact identity "
                                      "(else random, std 0.02)", flag="--random-value-init", group="engram")
    # store table serving block L's Engram rows ("{layer}" -> L); DeepSeek-V4.1's are
    # "layers.{layer}.engram.embed.weight" (engram_model.deepseek_v41)
    engram_table: str = setting(ENGRAM_TABLE,
                                "store table of block L's Engram rows ('{layer}' -> L)", cli=False)

    def __post_init__(self) -> None:
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise EngramConfigError(f"d_model={self.d_model} must split into n_head={self.n_head} even head dims")
        for name in ("vocab_size", "n_layer", "d_ff", "max_seq_len", "engram_branches"):
            if getattr(self, name) < 1:
                raise EngramConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_expert < 0 or (self.n_expert and not 1 <= self.moe_top_k <= self.n_expert):
            raise EngramConfigError(f"need 0 <= moe_top_k <= n_expert, got {self.moe_top_k} of {self.n_expert}")
        self.engram_layers = sorted(int(i) for i in self.engram_layers)
        if len(set(self.engram_layers)) != len(self.engram_layers) or any(
            not 0 <= i < self.n_layer for i in self.engram_layers
        ):
            raise EngramConfigError(f"engram_layers must be distinct blocks in [0, {self.n_layer}): {self.engram_layers}")
        if self.engram_layers and self.engram_vocab_size < 1:
            raise EngramConfigError("engram_vocab_size (compressed vocabulary) must be set when engram_layers is used")
        if self.engram_branches > 1 and not self.engram_layers:
            raise EngramConfigError("engram_branches > 1 needs engram_layers")
        if "{layer}" not in self.engram_table:
            raise EngramConfigError(f"engram_table={self.engram_table!r} must contain '{{layer}}' (the block index), "
                                    "e.g. 'layers.{layer}.engram.embed.weight'")

    @property
    def engram(self) -> EngramConfig:
        return EngramConfig(
            d_model=self.d_model, max_ngram_size=self.engram_max_ngram, n_head_per_ngram=self.engram_heads,
            d_mem=self.engram_d_mem, kernel_size=self.engram_kernel, signed_sqrt=self.engram_signed_sqrt,
            branches=self.engram_branches, init_std=self.engram_init_std, norm_eps=self.norm_eps,
        )

    def hasher(self) -> NgramHasher:
        base = self.engram_base_size or 5 * self.engram_vocab_size
        return NgramHasher(
            self.engram_vocab_size, self.engram_max_ngram, self.engram_heads,
            base_sizes=[base] * (self.engram_max_ngram - 1), layer_ids=self.engram_layers,
            pad_id=self.engram_pad_id, seed=self.engram_seed,
        )

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def table_name(block: int, pattern: str = ENGRAM_TABLE) -> str:
    """Store table name of a block's packed Engram table (``ModelConfig.engram_table``). The
    default is also the in-module parameter's state-dict name, so a trained checkpoint's
    tables build into a store under the names the model asks for."""
    return pattern.format(layer=block)


# --- rotary position embedding ------------------------------------------------------------
def rope_table(max_len: int, head_dim: int, theta: float) -> torch.Tensor:
    """(max_len, head_dim/2, 2): cos and sin of position * frequency."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return torch.stack([ang.cos(), ang.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x: (B, T, nh, hd) by rope (T, hd/2, 2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, nh, hd/2) each
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


# --- inference cache ----------------------------------------------------------------------
class KVCache(nn.Module):
    """Keys and values of past positions for one attention layer (gpt-fast style)."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | None = None):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hd) at positions pos..pos+T; return all keys/values so far."""
        T = k.shape[2]
        self.k[:, :, pos : pos + T] = k
        self.v[:, :, pos : pos + T] = v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]


class InferenceCache:
    """Everything incremental decoding carries between calls: KV caches, Engram conv states,
    the position, and the last N-1 token ids (the n-gram context of the next token)."""

    def __init__(self, model: EngramLM, batch: int, dtype: torch.dtype = torch.float32):
        cfg = model.cfg
        hd = cfg.d_model // cfg.n_head
        device = model.tok_emb.weight.device  # the caches live where the model runs
        self.kv = [KVCache(batch, cfg.n_head, cfg.max_seq_len, hd, dtype, device) for _ in range(cfg.n_layer)]
        ec = cfg.engram
        self.conv = {i: ConvState(batch, ec.conv_context, cfg.d_model * ec.branches, dtype, device)
                     for i in cfg.engram_layers}
        self.pos = 0
        self.tail = torch.zeros(batch, 0, dtype=torch.int64, device=device)  # last N-1 ids seen
        self.keep = cfg.engram_max_ngram - 1


# --- blocks -------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv: KVCache | None, pos: int) -> torch.Tensor:
        B, T, C = x.shape  # batch, time, channels
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, nh, hd) each
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if kv is not None:
            k, v = kv.update(pos, k, v)  # (B, nh, pos+T, hd)
        if pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token sees every cached one
        else:  # a chunk after a cached prefix: query i sees keys <= pos + i
            allowed = torch.arange(pos + T)[None, :] <= (pos + torch.arange(T))[:, None]  # (T, pos+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.w_gate = nn.Linear(d, d_ff, bias=False)
        self.w_up = nn.Linear(d, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (softmax router, weights renormalized over the top k).

    ``aux_loss`` after a forward pass is the Switch-Transformer load-balancing term.
    Experts run on their own tokens only (a loop over the few experts, not over tokens).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.router = nn.Linear(cfg.d_model, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList([SwiGLU(cfg.d_model, cfg.d_ff) for _ in range(cfg.n_expert)])
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)
        probs = self.router(flat).softmax(-1)  # (BT, E)
        w, idx = probs.topk(self.top_k, dim=-1)  # (BT, k)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(flat[tok]) * w[tok, slot, None])
        E = len(self.experts)
        frac = F.one_hot(idx[:, 0], E).float().mean(0)  # share of tokens whose first choice is e
        self.aux_loss = E * (frac * probs.mean(0)).sum()
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, head_sizes: list[int] | None, tables: bool = True):
        super().__init__()
        self.index = index
        self.engram = EngramLayer(cfg.engram, head_sizes, tables=tables) if head_sizes is not None else None
        self.norm_attn = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm_ffn = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn: nn.Module = MoE(cfg) if cfg.n_expert else SwiGLU(cfg.d_model, cfg.d_ff)
        M = cfg.engram_branches
        if M > 1:  # static hyper-connection: read a mix of the branches, write to each
            self.hc_read = nn.Parameter(torch.full((2, M), 1.0 / M))  # (attn|ffn, M)
            self.hc_write = nn.Parameter(torch.ones(2, M))

    def _sublayer(self, x: torch.Tensor, which: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if x.dim() == 3:  # (B, T, d): plain residual
            return x + fn(x)
        inp = torch.einsum("btmd,m->btd", x, self.hc_read[which])  # (B, T, d)
        return x + fn(inp).unsqueeze(2) * self.hc_write[which][:, None]  # (B, T, M, d)

    def forward(
        self, x: torch.Tensor, rope: torch.Tensor, rows: torch.Tensor | None,
        kv: KVCache | None = None, conv: ConvState | None = None, pos: int = 0,
    ) -> torch.Tensor:
        if self.engram is not None:
            assert rows is not None
            x = x + self.engram(x, rows, conv)
        x = self._sublayer(x, 0, lambda h: self.attn(self.norm_attn(h), rope, kv, pos))
        x = self._sublayer(x, 1, lambda h: self.ffn(self.norm_ffn(h)))
        return x


@dataclass
class EngramPlan:
    """Row fetches started for one input batch: block index -> future of (B, T, H, d_head)."""

    futures: dict[int, RowsFuture]


class EngramLM(nn.Module):
    """The language model. ``compress_lookup`` (raw id -> compressed id, from the tokenizer)
    is required when the config has Engram layers; ``tables=False`` skips allocating the
    Engram tables (they will be served by a store)."""

    def __init__(self, cfg: ModelConfig, compress_lookup: np.ndarray | torch.Tensor | None = None, *, tables: bool = True):
        super().__init__()
        self.cfg = cfg
        self.hasher = cfg.hasher() if cfg.engram_layers else None
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            [Block(cfg, i, self.hasher.head_sizes(i) if self.hasher and i in cfg.engram_layers else None, tables)
             for i in range(cfg.n_layer)]
        )
        self.norm_out = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.register_buffer("rope", rope_table(cfg.max_seq_len, cfg.d_model // cfg.n_head, cfg.rope_theta),
                             persistent=False)
        if cfg.engram_layers:
            if compress_lookup is None:
                raise EngramConfigError("an Engram model needs compress_lookup (CompressionMap.lookup)")
            lut = torch.as_tensor(np.asarray(compress_lookup), dtype=torch.int64)
            if lut.shape != (cfg.vocab_size,) or int(lut.max()) >= cfg.engram_vocab_size or int(lut.min()) < 0:
                raise EngramConfigError(
                    f"compress_lookup must map {cfg.vocab_size} raw ids into [0, {cfg.engram_vocab_size})"
                )
            # saved with the weights, so a checkpoint is self-contained (checked against the tokenizer on load)
            self.register_buffer("compress", lut)
        self._init_weights()

    def _init_weights(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith(TABLE_PARAM) or p.dim() < 2 or ".hc_" in name:
                continue  # tables keep their own init; norms stay 1, biases 0
            if name.endswith("conv.weight"):
                continue  # Engram's conv is zero-init (starts as identity)
            scale = std / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("proj.weight", "w_down.weight")) \
                and ".engram." not in name else std
            nn.init.normal_(p, std=scale)
        for blk in self.engram_blocks():
            for lin in [blk.engram.value_proj, *blk.engram.key_projs]:
                nn.init.zeros_(lin.bias)
            if self.cfg.engram_zero_value:
                # random rows times a random W_v would add noise ~8x the token embeddings' scale
                # to the residual stream at step 0; zero W_v lets the model open the memory gradually
                nn.init.zeros_(blk.engram.value_proj.weight)

    # --- bookkeeping ----------------------------------------------------------------------
    def engram_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.engram is not None]

    def table_parameters(self) -> list[nn.Parameter]:
        """The Engram tables (sparse gradients; their own optimizer group)."""
        return [p for n, p in self.named_parameters() if n.endswith(TABLE_PARAM)]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.endswith(TABLE_PARAM)]

    def num_params(self) -> dict[str, int]:
        """Parameter counts: tables, the rest, and what one token uses (every dense weight, the tied
        embedding/head included, except idle experts; of the tables only the rows it reads)."""
        tables = sum(p.numel() for p in self.table_parameters())
        dense = sum(p.numel() for p in self.dense_parameters())
        ec = self.cfg.engram
        per_tok_tables = len(self.cfg.engram_layers) * ec.n_heads * ec.d_head
        idle_experts = 0
        if self.cfg.n_expert:  # only top_k of the n_expert experts run per token
            per_expert = sum(p.numel() for p in self.blocks[0].ffn.experts[0].parameters())
            idle_experts = self.cfg.n_layer * (self.cfg.n_expert - self.cfg.moe_top_k) * per_expert
        return {"tables": tables, "dense": dense, "total": tables + dense,
                "active_per_token": dense - idle_experts + per_tok_tables}

    def attach_store(self, store: tierstore.RowStore, *, sync_below: int | None = None) -> None:
        """Serve every Engram table from ``store`` instead of memory: any ``tierstore.RowStore``,
        a ``Store`` or a ``ShardedStore`` (then every rank runs the model; lookups are collective).

        sync_below: requests of fewer ids are looked up in the caller's thread instead of
        prefetched (see StoreMemory); None: ``tierstore.INLINE_BELOW``, 0: always prefetch."""
        for blk in self.engram_blocks():
            mem = blk.engram.memory
            del blk.engram.memory
            blk.engram.memory = StoreMemory(store, table_name(blk.index, self.cfg.engram_table), mem.rows, mem.dim,
                                            sync_below=sync_below)

    # --- forward --------------------------------------------------------------------------
    @torch.no_grad()
    def row_ids(self, idx: torch.Tensor, prev: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Packed row ids per Engram block for tokens ``idx`` (B, T) -> (B, T, H).

        ``prev`` (B, <= N-1) are the tokens just before ``idx`` (their n-gram context);
        None means ``idx`` starts the sequence.
        """
        assert self.hasher is not None
        T = idx.shape[1]
        full = idx if prev is None or prev.shape[1] == 0 else torch.cat([prev, idx], dim=1)
        per_head = self.hasher.hash_torch(self.compress[full])  # {block: (B, T_full, H)}
        return {blk.index: blk.engram.pack(per_head[blk.index][:, -T:]) for blk in self.engram_blocks()}

    def announce(self, idx: torch.Tensor) -> None:
        """Tell every Engram table which rows the prompts ``idx`` (B, T) will read when they are
        served later (a request queue's known future; ``Store.hint``): nothing is fetched."""
        if self.hasher is None:
            return
        for i, ids in self.row_ids(idx).items():
            self.blocks[i].engram.memory.announce(ids)

    def prepare(self, idx: torch.Tensor, prev: torch.Tensor | None = None) -> EngramPlan:
        """Hash ``idx`` for every Engram block and start every row fetch; returns at once."""
        if self.hasher is None:
            return EngramPlan({})
        ids = self.row_ids(idx, prev)
        return EngramPlan({i: self.blocks[i].engram.memory.fetch(r) for i, r in ids.items()})

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
        plan: EngramPlan | None = None, cache: InferenceCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, with ``targets``, the mean cross-entropy.

        plan: fetches already started for ``idx`` (see :meth:`prepare`); made here if None.
        cache: incremental decoding state; ``idx`` continues the cached sequence.
        """
        B, T = idx.shape  # batch, time
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.max_seq_len:
            raise EngramConfigError(f"sequence of {pos + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if plan is None:
            plan = self.prepare(idx, cache.tail if cache is not None else None)  # all fetches start here
        x = self.tok_emb(idx)  # (B, T, d)
        if self.cfg.engram_branches > 1:
            x = x.unsqueeze(2).expand(B, T, self.cfg.engram_branches, self.cfg.d_model).contiguous()  # (B, T, M, d)
        rope = self.rope[pos : pos + T]
        for i, blk in enumerate(self.blocks):
            rows = plan.futures[i].result() if blk.engram is not None else None  # waits only here
            x = blk(x, rope, rows, cache.kv[i] if cache else None, cache.conv.get(i) if cache else None, pos)
        if x.dim() == 4:
            x = x.mean(2)  # (B, T, d): merge the branches
        logits = F.linear(self.norm_out(x), self.tok_emb.weight)  # (B, T, vocab), tied head
        if cache is not None:
            cache.pos += T
            cache.tail = torch.cat([cache.tail, idx], dim=1)[:, -cache.keep :] if cache.keep else cache.tail
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def aux_loss(self) -> torch.Tensor:
        """MoE load-balancing loss of the last forward pass (0 for a dense model); add it when training."""
        if not self.cfg.n_expert:
            return torch.zeros(())
        return sum(b.ffn.aux_loss for b in self.blocks) / self.cfg.n_layer  # type: ignore[return-value]
