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
from tierstore.cache.index import budget_for
from tierstore.format.profile import profile_paths, save_profile

from ...conftest import bits, random_table
from ..format.legacy import as_version3, save_v1_profile

T = "blocks.1.engram.memory.weight"
N, DIM = 150_000, 128  # float16: 256-byte rows; the dense order file is 600 KB, 2.3x the hot bytes
HOT = 1024  # profiled rows (256 KiB): the host budget holds exactly them
# budgets pay for the index's state too: these hold exactly 256 and HOT rows
BUDGETS = dict(device="cpu", device_budget=budget_for(256, 256, "static"), host_budget=budget_for(HOT, 256, "static"),
               policy="static", direct=False, exclusive=False)  # the host tier holds the top HOT ranks
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
    as_version3(out)  # negative control: the same store with a dense order file
    old = _open_bytes(out, w, counts)
    assert old > 2 * hot_bytes + FIXED, f"the dense order file read only {old / hot_bytes:.2f}x the hot bytes"
    print(f"\nopen read {old / hot_bytes:.2f}x the hot bytes with a dense order file, {new / hot_bytes:.2f}x now")


@pytest.mark.parametrize("version", [1, 2])
def test_a_large_profile_is_not_read_at_open(tmp_path, ckpt, version):
    """A profile that counts every row (a long trace) is far larger than the hot set the
    budgets hold: open read it whole to rank the rows (version 1: a count per table row,
    streamed; version 2: 16 bytes per counted row). With a snapshot made of that very profile,
    the ranking is the snapshot's ids prefix (4 bytes per hot row). Negative control: the
    same store once the profile is saved again (another profile id) reads the profile."""
    path, w = ckpt
    out = tierstore.build_store(path, tmp_path / "store", progress=False)
    rng = np.random.default_rng(2)
    counts = rng.integers(1, 1_000_000, N)  # every row counted: high-entropy counts, a large file
    counts[rng.choice(N, HOT, replace=False)] = rng.integers(10_000_000, 20_000_000, HOT)
    (save_v1_profile if version == 1 else save_profile)(out, T, counts)
    assert tierstore.save_snapshot(out, max_bytes=HOT * 256)[T]["n"] == HOT  # upgrades a v1 profile's JSON with an id
    hot_bytes = HOT * 256
    data = profile_paths(out, T)[0].stat().st_size
    assert data > 0.5 * hot_bytes, f"the profile file is only {data} bytes: nothing to avoid"
    _open_bytes(out, w, counts)  # compiles the policy's kernels
    new = _open_bytes(out, w, counts)
    assert new <= 1.2 * hot_bytes + FIXED, f"open read {new / hot_bytes:.2f}x the hot bytes"
    meta = profile_paths(out, T)[1]
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "profile_id": "another save"}))
    old = _open_bytes(out, w, counts)  # the snapshot is not of this profile: the ranking from the file
    assert old >= hot_bytes + data, f"the profile was not read ({old} bytes)"
    print(f"\nv{version}: open read {old / hot_bytes:.2f}x the hot bytes ranking from the profile, "
          f"{new / hot_bytes:.2f}x from the snapshot")
