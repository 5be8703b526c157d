"""Regression tests for paths that once returned wrong rows with no error (issue 9)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tierstore import CorruptDataError, TierStoreError

from ..conftest import bits, random_table

NAME = "blocks.1.engram.memory.weight"


def _build(tmp_path: Path, rows: int, dim: int, dtype: torch.dtype = torch.float32, name: str = "s"):
    from safetensors.torch import save_file

    w = random_table(rows, dim, dtype, seed=rows + dim)
    ckpt = tmp_path / f"{name}.safetensors"
    save_file({NAME: w}, str(ckpt))
    return tierstore.build_store(ckpt, tmp_path / name, progress=False), w


# budgets (device, host) in rows: resident on the device, resident on the host, small caches,
# disk only; and the shared host tier holding the whole table
_BUDGETS = [("resident", 10**9, 0, False), ("host-resident", 0, 10**9, False), ("cached", 3, 5, False),
            ("disk", 0, 0, False), ("shared", 0, 10**9, True)]


@pytest.mark.parametrize("dim", [1500, 3000, 4096, 16384], ids=lambda d: f"{4 * d}B")
@pytest.mark.parametrize("budget", _BUDGETS, ids=lambda b: b[0])
def test_rows_wider_than_a_page_are_exact(tmp_path, dim, budget):
    """A row spanning three or more 4 KiB pages was cut from the wrong pages (18/40 wrong
    single-row lookups at 6,000 B; IndexError at 12,000 B)."""
    _, dev_rows, host_rows, shared = budget
    out, w = _build(tmp_path, 40, dim)
    row_bytes = 4 * dim
    with tierstore.open(out, device="cpu", device_budget=dev_rows * row_bytes, host_budget=host_rows * row_bytes,
                        host_shared=shared) as store:
        for r in range(40):  # single rows: each a separate read
            got = store.lookup(NAME, [r])
            assert torch.equal(bits(got[0]), bits(w[r])), f"row {r} of {row_bytes} B rows wrong"
        ids = np.random.default_rng(0).integers(0, 40, size=200)
        got = store.lookup(NAME, ids)
        wrong = int((bits(got) != bits(w[torch.from_numpy(ids)])).any(dim=1).sum())
        assert wrong == 0, f"{wrong} of 200 rows wrong"


def test_prefetch_reads_the_ids_as_they_were_at_the_call(tmp_path):
    """prefetch kept a view of the caller's id buffer: a loop refilling it right after the call
    got other rows, and a negative id written after validation came back as header bytes."""
    out, w = _build(tmp_path, 5000, 16)
    with tierstore.open(out, device="cpu", device_budget="8KiB", host_budget="16KiB", threads=1) as store:
        rng = np.random.default_rng(1)
        for _ in range(20):
            ids = rng.integers(0, 5000, size=200)
            want = w[torch.from_numpy(ids.copy())]
            # block the single worker so the prefetch below is still queued when we overwrite
            blocker = store.prefetch(NAME, rng.integers(0, 5000, size=20000))
            fut = store.prefetch(NAME, ids)
            ids[:] = rng.integers(0, 5000, size=200)
            ids[0] = -1
            blocker.result()
            assert torch.equal(bits(fut.result()), bits(want))
        t_ids = torch.arange(100)
        fut = store.prefetch(NAME, t_ids)
        t_ids.fill_(7)
        assert torch.equal(bits(fut.result()), bits(w[:100]))
