"""DeepSeek-V4.1-Flash's Engram, configured from its ``config.json`` (docs/deepseek_v41.md).

The released checkpoint declares its Engram in ``text_config``::

    engram_layer_ids [1, 14]           engram_max_ngram_size 4 (2-, 3- and 4-grams)
    engram_n_heads 8                   engram_head_dim 256 (values per table row)
    engram_vocab_size 16000000         (the size each head's primes start from)
    engram_num_embeddings [384006168, 384016682]   (rows of each layer's packed table)
    engram_compressed_vocab_size 99092 engram_pad_token_id 2 (a *raw* token id)

and stores each layer's table as ``layers.{L}.engram.embed.weight`` (fp8, 256 values)
with ``layers.{L}.engram.embed.scale`` (UE8M0, one per 32 values): ``tierstore build``
turns exactly those into quantized store tables, looked up as bf16 rows.

Our ``NgramHasher`` is the released addressing: compressed ids, multipliers from
``numpy.random.default_rng(10007 * L)`` bounded by the compressed vocabulary, primes
per layer and order from ``engram_vocab_size - 1``, unique across layers, and the
compressed pad id before the sequence start. The table sizes follow from the primes, so
``engram_num_embeddings`` is a check: a hasher whose sums differ would address other
rows of the same tables, silently (every row id still in range). :func:`v41_hasher`
refuses that, and a tokenizer whose compression differs from the checkpoint's.

Not reproduced (text serving does not need them): the released code also treats image
tokens, and the positions after one within an n-gram window, as padding; the V4.1 layer
itself (fused wkv projection, hyper-connection gate, no convolution) differs from our
:class:`~engram_model.engram.EngramLayer`. :func:`v41_model` builds a small model with
random dense weights that reads V4.1-shaped tables through the store (24 rows of 256
values per token per layer): it exercises and measures the serving path, not V4.1's outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram_model.compression import CompressionMap
from engram_model.errors import EngramConfigError
from engram_model.hasher import NgramHasher
from engram_model.model import EngramLM, ModelConfig

__all__ = ["V41EngramConfig", "V41_TABLE", "PRESETS", "v41_hasher", "v41_model_config", "v41_model"]

V41_TABLE = "layers.{layer}.engram.embed.weight"  # the released checkpoint's table names
_SEED = 0  # layer L draws its multipliers from default_rng(10007 * L): a global seed of 0

# The released geometry (``text_config`` of deepseek-ai/DeepSeek-V4.1-Flash's config.json):
# ``tierstore trace --preset deepseek-v4.1`` hashes with it, nothing downloaded but a tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v4.1": {
        "vocab_size": 129280, "engram_layer_ids": [1, 14], "engram_max_ngram_size": 4, "engram_n_heads": 8,
        "engram_head_dim": 256, "engram_vocab_size": 16_000_000, "engram_num_embeddings": [384006168, 384016682],
        "engram_compressed_vocab_size": 99092, "engram_pad_token_id": 2,
    },
}


@dataclass(frozen=True)
class V41EngramConfig:
    """The Engram fields of a V4.1 ``config.json`` (``text_config``), named as there."""

    engram_layer_ids: tuple[int, ...]  # decoder layers with an Engram (from 0)
    engram_max_ngram_size: int  # N: orders 2..N are hashed
    engram_n_heads: int  # K hash heads (tables) per order
    engram_head_dim: int  # values per table row
    engram_vocab_size: int  # the size every head's primes start from (all orders)
    engram_num_embeddings: tuple[int, ...]  # rows of each layer's packed table (sum of its primes)
    engram_compressed_vocab_size: int  # V': the tokenizer's compressed vocabulary
    engram_pad_token_id: int  # raw token id whose compressed id pads before the start
    vocab_size: int | None = None  # the model's raw vocabulary (129,280), when the config gives it

    def __post_init__(self) -> None:
        if not self.engram_layer_ids or len(set(self.engram_layer_ids)) != len(self.engram_layer_ids) \
                or min(self.engram_layer_ids) < 0:
            raise EngramConfigError(f"engram_layer_ids={list(self.engram_layer_ids)} must be distinct layer ids >= 0")
        if len(self.engram_num_embeddings) != len(self.engram_layer_ids):
            raise EngramConfigError(f"engram_num_embeddings has {len(self.engram_num_embeddings)} entries but "
                                    f"engram_layer_ids {len(self.engram_layer_ids)}: one table size per Engram layer")
        for name in ("engram_max_ngram_size", "engram_n_heads", "engram_head_dim", "engram_vocab_size",
                     "engram_compressed_vocab_size"):
            if getattr(self, name) < (2 if name == "engram_max_ngram_size" else 1):
                raise EngramConfigError(f"{name}={getattr(self, name)} is out of range")

    @classmethod
    def from_json(cls, config: str | os.PathLike[str] | dict[str, Any]) -> V41EngramConfig:
        """Read a V4.1 ``config.json`` (a path, a directory holding it, or the parsed dict).
        The fields live under ``text_config``; a flat config (the same keys at the top) is
        read too. A missing or non-integer field raises ``EngramConfigError`` naming it."""
        where = "config"
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            where = str(path)
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise EngramConfigError(f"cannot read the V4.1 config {where}: {e}") from None
        if not isinstance(config, dict):
            raise EngramConfigError(f"{where}: a config.json holds a JSON object")
        text = config.get("text_config", config)
        if not isinstance(text, dict):
            raise EngramConfigError(f"{where}: text_config is not an object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "vocab_size" and f.name not in text:
                continue  # optional: only the check of a partial tokenizer needs it (v41_hasher)
            if f.name not in text:
                raise EngramConfigError(f"{where}: text_config has no {f.name!r}: not a DeepSeek-V4.1 Engram config")
            v = text[f.name]
            many = f.name in ("engram_layer_ids", "engram_num_embeddings")
            items = v if many and isinstance(v, list) else [v]
            if (many and not isinstance(v, list)) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in items):
                raise EngramConfigError(f"{where}: {f.name}={v!r} must be {'a list of ' if many else 'an '}integer"
                                        f"{'s' if many else ''}")
            values[f.name] = tuple(v) if many else v
        return cls(**values)

    @classmethod
    def preset(cls, name: str) -> V41EngramConfig:
        """A released geometry by name (``PRESETS``: ``deepseek-v4.1``)."""
        if name not in PRESETS:
            raise EngramConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_json(PRESETS[name])

    def table_name(self, layer: int) -> str:
        """The store (and checkpoint) name of layer ``layer``'s table."""
        return V41_TABLE.format(layer=layer)

    @property
    def rows_per_token(self) -> int:
        """Rows one token reads per Engram layer: (N-1) orders x K heads (24)."""
        return (self.engram_max_ngram_size - 1) * self.engram_n_heads


def v41_hasher(cfg: V41EngramConfig, compress: CompressionMap, *, partial_tokenizer: bool = False) -> NgramHasher:
    """The hasher of a V4.1 checkpoint, checked against it.

    compress: the checkpoint tokenizer's compression (``build_compression(tokenizer)``); its
        size must be ``engram_compressed_vocab_size`` (else the tokenizer is not the
        checkpoint's), and it maps the raw ``engram_pad_token_id`` to the pad id.
    partial_tokenizer: accept a tokenizer that lacks the model's last raw ids (added special
        tokens), as DeepSeek's public tokenizer does: 128,815 of V4.1's 129,280 ids, which
        compress to 98,627 of its 99,092 (exactly 465 fewer). Compressed ids are handed out
        in raw-id order, so the ids of the tokens it has are the model's; each missing raw id
        adds at most one compressed id, so it needs ``vocab_size`` in the config and
        ``num_compressed <= engram_compressed_vocab_size <= num_compressed + missing``.
        Hashing (the multipliers' bound) always uses the config's V'. For traces, not for
        serving a model (its embedding needs every raw id).
    Raises ``EngramConfigError`` when the primes give other table sizes than
    ``engram_num_embeddings``: hashing with them would read the wrong rows, silently.
    """
    want = cfg.engram_compressed_vocab_size
    missing = (cfg.vocab_size or 0) - compress.vocab_size
    if partial_tokenizer and compress.num_compressed != want:
        if cfg.vocab_size is None:
            raise EngramConfigError(
                f"the tokenizer compresses to {compress.num_compressed} ids, the config says {want}, and the "
                "config has no vocab_size to tell whether the tokenizer only lacks the model's last added tokens: "
                "add text_config.vocab_size or use the checkpoint's own tokenizer.json")
        if not (compress.num_compressed <= want <= compress.num_compressed + max(missing, 0)):
            raise EngramConfigError(
                f"the tokenizer has {compress.vocab_size} of the model's {cfg.vocab_size} raw ids and compresses to "
                f"{compress.num_compressed} ids; engram_compressed_vocab_size={want} is not reachable by adding "
                f"the {max(missing, 0)} missing ids: not this model's tokenizer")
    elif compress.num_compressed != want:
        raise EngramConfigError(
            f"the tokenizer compresses to {compress.num_compressed} ids but the checkpoint was built with "
            f"engram_compressed_vocab_size={cfg.engram_compressed_vocab_size}: use the checkpoint's own tokenizer.json")
    if not 0 <= cfg.engram_pad_token_id < compress.vocab_size:
        raise EngramConfigError(f"engram_pad_token_id={cfg.engram_pad_token_id} is not a token id of the tokenizer "
                                f"(vocabulary {compress.vocab_size})")
    hasher = NgramHasher(
        cfg.engram_compressed_vocab_size, cfg.engram_max_ngram_size, cfg.engram_n_heads,
        base_sizes=[cfg.engram_vocab_size] * (cfg.engram_max_ngram_size - 1), layer_ids=cfg.engram_layer_ids,
        pad_id=int(compress.lookup[cfg.engram_pad_token_id]), seed=_SEED,
    )
    got = [hasher.total_rows(L) for L in cfg.engram_layer_ids]
    if got != list(cfg.engram_num_embeddings):
        raise EngramConfigError(
            f"engram_num_embeddings={list(cfg.engram_num_embeddings)} but the primes from engram_vocab_size="
            f"{cfg.engram_vocab_size} (N={cfg.engram_max_ngram_size}, K={cfg.engram_n_heads}, layers "
            f"{list(cfg.engram_layer_ids)}) give {got}: hashing would address other rows than the tables were "
            "trained with. The config does not describe these tables (or uses another prime rule): fix config.json")
    return hasher


def v41_model_config(cfg: V41EngramConfig, compress: CompressionMap, *, d_model: int = 64, n_head: int = 4,
                     d_ff: int = 128, max_seq_len: int = 512) -> ModelConfig:
    """A :class:`ModelConfig` whose Engram layers are V4.1's (same layers, orders, heads, row
    width, primes, multipliers and pad id; tables named ``layers.{L}.engram.embed.weight``),
    with a small dense part of the given sizes and ``max(engram_layer_ids) + 1`` blocks (the
    hasher keys its multipliers and primes by block index)."""
    v41_hasher(cfg, compress)  # every check, before a model is configured from it
    if list(cfg.engram_layer_ids) != sorted(cfg.engram_layer_ids):
        raise EngramConfigError(f"engram_layer_ids={list(cfg.engram_layer_ids)} must be ascending for this model: "
                                "it draws the primes in block order, the checkpoint in the listed order")
    return ModelConfig(
        vocab_size=compress.vocab_size, n_layer=max(cfg.engram_layer_ids) + 1, n_head=n_head, d_model=d_model,
        d_ff=d_ff, max_seq_len=max_seq_len, engram_layers=list(cfg.engram_layer_ids),
        engram_vocab_size=cfg.engram_compressed_vocab_size,
        engram_pad_id=int(compress.lookup[cfg.engram_pad_token_id]), engram_max_ngram=cfg.engram_max_ngram_size,
        engram_heads=cfg.engram_n_heads, engram_d_mem=cfg.engram_n_heads * cfg.engram_head_dim,
        engram_base_size=cfg.engram_vocab_size, engram_seed=_SEED, engram_table=V41_TABLE,
        engram_zero_value=False,  # untrained: a zero W_v would make the rows invisible in the output
    )


def v41_model(cfg: V41EngramConfig, compress: CompressionMap, *, seed: int = 0, **dense: int) -> EngramLM:
    """A model with V4.1's Engram addressing and random dense weights (``torch.manual_seed(seed)``),
    its tables left out: call ``model.attach_store(store)`` with a store built from the checkpoint.
    ``dense``: ``d_model``, ``n_head``, ``d_ff``, ``max_seq_len`` (see :func:`v41_model_config`).
    The model is in eval mode; its tokens come from random weights, not V4.1's."""
    mcfg = v41_model_config(cfg, compress, **dense)
    torch.manual_seed(seed)
    model = EngramLM(mcfg, np.asarray(compress.lookup), tables=False)
    assert model.hasher is not None
    assert [model.hasher.total_rows(L) for L in mcfg.engram_layers] == list(cfg.engram_num_embeddings)
    return model.eval()
