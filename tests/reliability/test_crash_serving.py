"""Crash test for serving: worker processes (the shared host tier's filler among them) are
SIGKILLed at random points while others keep serving; afterwards the store verifies, a new
opener serves exact rows, and no shared segment outlives its last user.

Bounded to ~15 s: seeds run until the time is up (at least 3).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import tierstore
from tierstore.tiers.shared_host import SHM_DIR, segment_prefix

from ..conftest import bits, random_table

import pytest

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them

REPO = Path(__file__).resolve().parents[2]
NAME = "blocks.1.engram.memory.weight"
ROWS, DIM = 1 << 15, 64  # 8 MiB: a fill takes long enough to be killed in the middle of

WORKER = textwrap.dedent("""
    import sys, numpy as np, tierstore
    path, shared, seed, ref = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), np.load(sys.argv[4], mmap_mode="r")
    kw = dict(host_budget=10**9, host_shared=True) if shared else dict(device_budget="64KiB", host_budget="256KiB")
    with tierstore.open(path, device="cpu", threads=2, **kw) as store:
        rng = np.random.default_rng(seed)
        print("OPEN", flush=True)
        for i in range(10**6):
            ids = rng.integers(0, ref.shape[0], 512)
            got = (store.lookup if i % 2 else lambda t, x: store.prefetch(t, x).result())(
                "blocks.1.engram.memory.weight", ids)
            if not np.array_equal(got.numpy().view(np.uint32), ref[ids].view(np.uint32)):
                print("MISMATCH", flush=True)
                sys.exit(3)
            if i % 64 == 0:
                print("OK", i, flush=True)
""")


def _segments(store: Path) -> list[Path]:
    return [p for p in SHM_DIR.glob(f"{segment_prefix(store, NAME)}*") if not p.name.endswith(".fill")] \
        if SHM_DIR.is_dir() else []


def test_killed_workers_and_fillers_leave_a_sound_store(tmp_path):
    w = random_table(ROWS, DIM, torch.float32, seed=11)
    save_file({NAME: w}, str(tmp_path / "m.safetensors"))
    store = tierstore.build_store(tmp_path / "m.safetensors", tmp_path / "store", progress=False)
    ref = tmp_path / "ref.npy"
    np.save(ref, w.numpy())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0, seeds, killed, survived = time.monotonic(), 0, 0, 0
    while seeds < 3 or time.monotonic() - t0 < 15:
        rng = np.random.default_rng(seeds)
        shared = seeds % 3 != 2  # two of three rounds use the shared tier
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(store), str(int(shared)), str(100 * seeds + k),
                                   str(ref)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in range(3)]
        # kill two of them at random moments: before, during or after the shared tier's fill
        victims = rng.choice(3, size=2, replace=False)
        for k in victims:
            time.sleep(float(rng.uniform(0.0, 1.2)))
            procs[k].send_signal(signal.SIGKILL)
        (k_live,) = set(range(3)) - set(victims.tolist())
        live = procs[k_live]
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:  # the survivor keeps serving exact rows
            line = live.stdout.readline()
            lines.append(line)
            if not line or line.startswith("MISMATCH") or (line.startswith("OK") and int(line.split()[1]) >= 128):
                break
        live.kill()
        for p in procs:
            _, err = p.communicate(timeout=30)
        killed += sum(procs[k].returncode == -signal.SIGKILL for k in victims)
        assert lines and lines[-1].startswith("OK"), f"round {seeds}: the survivor failed: {lines[-3:]} {err[-2000:]}"
        survived += 1
        # every user is gone (two killed, the survivor killed too): the next opener serves
        # exact rows whatever state the segment was left in, and removes it on close
        with tierstore.open(store, device="cpu", host_budget=10**9, host_shared=shared) as s:
            ids = rng.integers(0, ROWS, 4096)
            assert torch.equal(bits(s.lookup(NAME, ids)), bits(w[torch.from_numpy(ids)]))
        assert not _segments(store), f"round {seeds}: a shared segment outlived its last user"
        seeds += 1
    assert tierstore.verify_store(store, progress=False).ok
    print(f"\nserving crash test: {seeds} rounds, {killed} workers SIGKILLed at random points, "
          f"{survived} survivors served exact rows throughout")
