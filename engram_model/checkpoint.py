"""Checkpoint directory: ``model.safetensors`` + ``config.json`` + ``tokenizer.json``.

config.json starts with a format name and version (minbpe style) and holds the model
config, the hasher's constructor arguments and the size of the compression map. The
compression map itself is saved inside model.safetensors as the ``compress`` buffer (a
few KB), so the weights are self-contained; on load it is also rebuilt from
tokenizer.json and the two must agree, which catches a checkpoint paired with the wrong
tokenizer. The Engram tables are the tensors named ``engram_model.model.table_name(i)``
(``blocks.<i>.engram.memory.weight``): ``tierstore build`` turns exactly those into store tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from tierstore import TierStoreError, check_versioned, read_json

from engram_model.compression import build_compression
from engram_model.errors import EngramConfigError
from engram_model.model import EngramLM, ModelConfig, table_name
from engram_model.tokenizer import load_tokenizer, save_tokenizer

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint", "read_config"]

FORMAT = "engram-model"
VERSION = 1


def save_checkpoint(model: EngramLM, tok: Tokenizer, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint directory ``out`` (created); returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT, "version": str(VERSION)})
    cfg: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": model.cfg.to_dict()}
    if model.hasher is not None:
        cfg["hasher"] = model.hasher.config()
        cfg["compressed_vocab_size"] = model.cfg.engram_vocab_size
        cfg["tables"] = {table_name(i): [model.hasher.total_rows(i), model.cfg.engram.d_head]
                         for i in model.cfg.engram_layers}
    cfg["params"] = model.num_params()
    if extra:
        cfg.update(extra)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_tokenizer(tok, out / "tokenizer.json")
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """Parse and check ``config.json`` (a directory means DIR/config.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        return check_versioned(read_json(path, what="model config"), fmt=FORMAT, version=VERSION,
                               where=str(path), fix="re-save the checkpoint with this engram_model")
    except TierStoreError as e:
        raise EngramConfigError(f"cannot read model config {str(path)!r}: {e}") from e


def load_checkpoint(
    ckpt: str | Path, *, tables: bool = True, config_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
) -> tuple[EngramLM, Tokenizer, dict[str, Any]]:
    """Load (model in eval mode, tokenizer, config dict) from a checkpoint directory.

    tables=False leaves the Engram tables out (not even read from disk): the model then
    needs ``attach_store`` before it runs. config_path / tokenizer_path override where
    those files come from (e.g. a store's attachments).
    """
    ckpt = Path(ckpt)
    meta = read_config(config_path or ckpt)
    tok = load_tokenizer(tokenizer_path or ckpt)
    cfg = ModelConfig(**meta["model"])
    lut = None
    if cfg.engram_layers:
        cmap = build_compression(tok)
        if cmap.num_compressed != cfg.engram_vocab_size:
            raise EngramConfigError(
                f"tokenizer compresses to {cmap.num_compressed} ids but the model was trained with "
                f"{cfg.engram_vocab_size}: wrong tokenizer.json for this checkpoint"
            )
        lut = cmap.lookup
    model = EngramLM(cfg, lut, tables=tables)
    state: dict[str, torch.Tensor] = {}
    weights = ckpt / "model.safetensors" if ckpt.is_dir() else ckpt
    table_names = {table_name(i) for i in cfg.engram_layers}
    with safe_open(str(weights), framework="pt") as f:
        for k in f.keys():
            if not tables and k in table_names:
                continue
            state[k] = f.get_tensor(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if tables or k not in table_names]
    if missing or unexpected:
        raise EngramConfigError(f"checkpoint {str(ckpt)!r} does not match its config: missing {missing}, "
                                f"unexpected {unexpected}")
    if lut is not None and not np.array_equal(model.compress.numpy(), lut):
        raise EngramConfigError("the compression map saved with the weights differs from the one the tokenizer gives")
    model.eval()
    return model, tok, meta
