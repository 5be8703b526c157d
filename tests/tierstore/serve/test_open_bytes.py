"""Open reads O(hot set), whatever else the store holds (issue 19, item 1): a hot-ordered
store's order file and a large saved profile are not read whole at open.

Bytes are the process's ``rchar`` (``/proc/self/io``: every byte a read syscall returned, from
the page cache or the disk, all threads) across ``tierstore.open``, with ``direct=False`` so
every read of the store is a ``pread``/``read``. The bound: 1.2x the hot bytes the budgets
hold + 16 KiB (manifest, header pages, JSON). Each bound has its negative control, the path
before the change, reading several times the hot bytes on the same table. No timings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore.format.order import DenseOrder, load_order, write_order
from tierstore.format.profile import save_profile
from tierstore.format.spec import TableInfo, manifest_digest

from ...conftest import bits, random_table

T = "blocks.1.engram.memory.weight"
N, DIM = 150_000, 128  # float16: 256-byte rows; the dense order file is 600 KB, 2.3x the hot bytes
HOT = 1024  # profiled rows (256 KiB): the host budget holds exactly them
BUDGETS = dict(device="cpu", device_budget=256 * 256, host_budget=HOT * 256, policy="static", direct=False)
FIXED = 16 << 10


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _open_bytes(path: Path, w: torch.Tensor, counts: np.ndarray) -> int:
    """rchar across one open; then every profiled row and some others are checked exact."""
    before = rchar()
    s = tierstore.open(path, **BUDGETS)
    got = rchar() - before
    with s:
        hot = np.flatnonzero(counts)
        for ids in (hot, np.random.default_rng(0).integers(0, N, 2000)):
            assert torch.equal(bits(s.lookup(T, ids)), bits(w[torch.from_numpy(ids)]))
    return got


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    d = tmp_path_factory.mktemp("openbytes")
    w = random_table(N, DIM, torch.float16, seed=5)
    save_file({T: w}, str(d / "m.safetensors"))
    return d / "m.safetensors", w


def _as_version3(out: Path) -> None:
    """Rewrite a hot-ordered store's order file as version 3 wrote it: each row's position."""
    m = json.loads((out / "manifest.json").read_text())
    t = m["tables"][0]
    info = TableInfo(**t)
    pos = load_order(out, info, m["build_id"]).of(np.arange(info.rows))
    with open(out / t["order_file"], "wb") as f:
        write_order(f, info, pos, m["build_id"])
    m["version"] = 3
    m["digest"] = manifest_digest(m)
    (out / "manifest.json").write_text(json.dumps(m))
    assert isinstance(load_order(out, info, m["build_id"]), DenseOrder)


def test_a_hot_ordered_store_opens_reading_the_hot_set_not_the_order(tmp_path, ckpt):
    """Version 3 read the order file whole at open (4 bytes per table row: 1.5 GiB at 384M
    rows); version 4 stores the hot ids only and reads them (4 bytes per hot row)."""
    path, w = ckpt
    prof = tierstore.build_store(path, tmp_path / "prof", progress=False)
    rng = np.random.default_rng(1)
    counts = np.zeros(N, np.int64)
    counts[rng.choice(N, HOT, replace=False)] = rng.integers(1, 1000, HOT)
    save_profile(prof, T, counts)
    out = tierstore.build_store(path, tmp_path / "ordered", order_by=prof, progress=False)
    save_profile(out, T, counts)
    hot_bytes = HOT * 256
    _open_bytes(out, w, counts)  # compiles the policy's kernels (their cache files are read too)
    new = _open_bytes(out, w, counts)
    assert new <= 1.2 * hot_bytes + FIXED, f"open read {new / hot_bytes:.2f}x the hot bytes"
    _as_version3(out)  # negative control: the same store with a dense order file
    old = _open_bytes(out, w, counts)
    assert old > 2 * hot_bytes + FIXED, f"the dense order file read only {old / hot_bytes:.2f}x the hot bytes"
    print(f"\nopen read {old / hot_bytes:.2f}x the hot bytes with a dense order file, {new / hot_bytes:.2f}x now")
