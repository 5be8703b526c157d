"""Shared fixtures: real checkpoints written with safetensors / torch.save, built stores."""

from __future__ import annotations

import os
import re
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_table(rows: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A table whose every row is distinct, in any dtype (fp8 via float32 -> cast)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g) * 0.05
    return w.to(dtype)


def real_text_trace(n: int) -> np.ndarray:
    """Word ids of the Python standard library's source, in reading order: a real, Zipfian
    access trace of ``n`` ids (the first occurrence order numbers the words)."""
    ids: dict[str, int] = {}
    out: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        for w in re.findall(r"[A-Za-z_]+", path.read_text(errors="replace")):
            out.append(ids.setdefault(w, len(ids)))
        if len(out) >= n:
            break
    return np.array(out[:n], dtype=np.int64)


def one_table_store(tmp: Path, name: str, rows: int, dim: int, seed: int = 0) -> tuple[Path, torch.Tensor]:
    """A store built from a safetensors checkpoint of one random float32 table (rows x dim)
    in ``tmp``; returns the store's path and the table."""
    from safetensors.torch import save_file

    import tierstore

    w = random_table(rows, dim, torch.float32, seed=seed)
    save_file({name: w}, str(tmp / "m.safetensors"))
    return tierstore.build_store(tmp / "m.safetensors", tmp / "store", progress=False), w


def ordered_dict_lru_hits(trace: np.ndarray, cap: int) -> int:
    """Hits of a textbook LRU (an OrderedDict) of ``cap`` rows over ``trace``: the oracle of
    every exact-LRU test."""
    from collections import OrderedDict

    d: OrderedDict[int, bool] = OrderedDict()
    hits = 0
    for r in trace.tolist():
        if r in d:
            hits += 1
            d.move_to_end(r)
        else:
            d[r] = True
            if len(d) > cap:
                d.popitem(last=False)
    return hits


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-exact comparison (NaN-safe, -0.0 != 0.0)."""
    return t.contiguous().view(torch.uint8)


@pytest.fixture
def small_ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A safetensors checkpoint with two Engram-named tables and a non-table tensor."""
    from safetensors.torch import save_file

    tensors = {
        "blocks.1.engram.memory.weight": random_table(5003, 64, torch.float32, seed=1),
        "blocks.3.engram.memory.weight": random_table(1201, 48, torch.float32, seed=2),
        "blocks.0.attn.wq.weight": random_table(64, 64, torch.float32, seed=3),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


# -- a tiny trained Engram checkpoint on real stdlib text: trained once per pytest run and
# shared by the model, serving, trace, profile-command and sharded-model tests ------------
TINY = ["--steps", "6", "--eval-every", "3", "--eval-windows", "4", "--batch-size", "4", "--seq-len", "32",
        "--vocab-size", "600", "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--d-ff", "64",
        "--engram-layers", "0", "1", "--engram-heads", "2", "--engram-d-mem", "8", "--threads", "1", "--no-progress", "--quiet",
        "--data-max-bytes", "300000", "--tok-max-bytes", "300000"]


@pytest.fixture(scope="session")
def text_files() -> list[str]:
    from engram_model.tokenizer import stdlib_text_files

    return [str(p) for p in stdlib_text_files()[:60]]


@pytest.fixture(scope="session")
def engram_run(tmp_path_factory: pytest.TempPathFactory, text_files: list[str]) -> tuple[Path, dict[str, Any]]:
    from engram_model.train import main

    out = tmp_path_factory.mktemp("ckpt") / "engram"
    res = main([*TINY, "--out", str(out), "--text", *text_files])
    return out, res


def free_port() -> int:
    """A free TCP port on the loopback address, for a test's process group rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
