"""Shared inputs for the store benchmarks: Zipf ids and synthetic-but-real stores on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import tierstore

CACHE = Path(__file__).resolve().parents[1] / ".bench_cache"


def zipf_ids(n_rows: int, size: int, a: float, rng: np.random.Generator) -> np.ndarray:
    """Ids drawn with P(rank k) ~ 1/k**a (a may be 1.0), ranks scattered over the table
    the way hashed n-gram rows are. a == 0 gives uniform ids."""
    if a == 0:
        return rng.integers(0, n_rows, size=size, dtype=np.int64)
    weights = 1.0 / np.arange(1, n_rows + 1, dtype=np.float64) ** a
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1])
    perm = np.random.default_rng(1234).permutation(n_rows)  # fixed rank -> row scatter
    return perm[np.minimum(ranks, n_rows - 1)].astype(np.int64)


def table_store(rows: int, dim: int, dtype: torch.dtype = torch.float16, *, name: str = "t.engram.memory.weight",
                seed: int = 0, cache: Path = CACHE) -> tuple[Path, str]:
    """A store with one table of ``rows`` x ``dim`` random rows, built once and kept in ``cache``."""
    key = f"store-{rows}x{dim}-{str(dtype).split('.')[-1]}-{seed}"
    out = cache / key
    if (out / "manifest.json").exists():
        return out, name
    cache.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    # write the checkpoint in slices so that a multi-GiB table never sits in memory twice
    ckpt = cache / f"{key}.safetensors"
    elem = torch.empty((), dtype=dtype).element_size()
    tag = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    header = json.dumps({name: {"dtype": tag, "shape": [rows, dim], "data_offsets": [0, rows * dim * elem]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(ckpt, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        step = max(1, (64 << 20) // (dim * elem))
        for s in range(0, rows, step):
            n = min(step, rows - s)
            f.write((torch.randn(n, dim, generator=g) * 0.02).to(dtype).view(torch.uint8).numpy().tobytes())
    tierstore.build_store(ckpt, out, progress=False)
    ckpt.unlink()
    return out, name


def load_table(store: Path, name: str) -> torch.Tensor:
    """The whole table as one in-memory tensor (the baseline's copy)."""
    with tierstore.open(store, device="cpu", host_budget=0) as s:
        info = s.tables[name]
        return s.lookup(name, torch.arange(info.rows))
