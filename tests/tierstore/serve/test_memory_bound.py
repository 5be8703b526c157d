"""The store's anonymous memory is bounded by its budgets, not by its table (issue 19).

Bound, for every policy: RssAnon (private memory: heap, slabs, state; not files mapped,
not shared memory) grows by at most 1.1 x (device + host budgets) + 128 MiB over a process
that has imported torch and tierstore, when a store opens a table 100x larger than its
budgets with a saved profile (sparse, larger than the cache) and serves lookups of hits,
misses and hints. Each policy runs in a fresh process: RssAnon never shrinks back, so one
process would measure whatever ran before. That process first runs the same session on a
small store, so the policy's kernels are compiled (or loaded) before the baseline: their
code (30-60 MiB loaded, more when compiled) is not the store's memory. The 128 MiB covers
what no budget sizes: a lookup's temporaries (up to 16K ids here), the output pool, the
allocator's retained free memory.

Run as a script for figures: ``python tests/tierstore/serve/test_memory_bound.py STORE
POLICY DEVICE_BYTES HOST_BYTES [LOOKUP_SIZES [WARM_STORE]]`` prints one JSON line (bytes).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tierstore.cache import policy_names
from tierstore.format.profile import save_profile

T = "blocks.1.engram.memory.weight"
# float16 rows of 32 bytes: many rows per byte of table, so a cost per table row shows
ROWS, DIM = 13_107_200, 16  # a 400 MiB table ...
DEV_B, HOST_B = 1 << 20, 3 << 20  # ... 100x the budgets
SMALL_ROWS = 131_072  # the same budgets over a table they hold (the control)
PER_ROW_SLACK = 16 << 20  # the big table may cost this much more than the small: < 1.3 B/row
FIXED = 128 << 20
LOOKUPS = (1024, 4096, 16384)


def _anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _session(path: str, policy: str, dev_b: int, host_b: int, lookups: tuple[int, ...]) -> dict:
    with tierstore.open(path, device="cpu", device_budget=dev_b, host_budget=host_b, policy=policy) as s:
        _lookups(s, lookups)
        return s.stats()


def _lookups(s: tierstore.Store, lookups: tuple[int, ...]) -> None:
    n = s.tables[T].rows
    rng = np.random.default_rng(0)
    for k in lookups:
        s.hint(T, rng.integers(0, n, k // 4))
        s.lookup(T, rng.integers(0, n, k))  # mostly misses
        s.lookup(T, rng.integers(0, min(n, k), k))  # a small range: hits after the first pass


def measure(path: str, policy: str, dev_b: int, host_b: int, lookups: tuple[int, ...] = LOOKUPS,
            warm: str | None = None) -> dict:
    """In this process (imported torch and tierstore already): open, look up, hint; bytes.
    ``warm``: a store to run the same session on first, so the kernels are compiled (or
    loaded from the kernel cache) before the baseline: their code is not the store's memory
    (``code`` says how much it was)."""
    code = 0
    if warm is not None:
        c0 = _anon()
        _session(warm, policy, dev_b // 64, host_b // 64, (1024,))  # small: little freed memory to reuse
        gc.collect()
        code = _anon() - c0
    base = _anon()
    with tierstore.open(path, device="cpu", device_budget=dev_b, host_budget=host_b, policy=policy) as s:
        opened = _anon() - base
        n = s.tables[T].rows
        _lookups(s, lookups)
        grown = _anon() - base
        mem = s.stats()["memory"]
    return {"policy": policy, "budgets": dev_b + host_b, "rows": n, "open": opened, "anon": grown,
            "stats_total": mem["total"], "meta": mem["device_meta"] + mem["host_meta"], "code": code}


def _build(d: Path, rows: int) -> Path:
    from safetensors.torch import save_file

    save_file({T: torch.zeros(rows, DIM, dtype=torch.float16)}, str(d / "m.safetensors"))
    path = tierstore.build_store(d / "m.safetensors", d / "store", progress=False)
    (d / "m.safetensors").unlink()
    rng = np.random.default_rng(1)
    hot = np.sort(rng.choice(rows, rows // 4, replace=False))  # scattered; 25x the cache in the big one
    save_profile(path, T, (hot, rng.integers(1, 1000, hot.size)), n_rows=rows)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    return (_build(tmp_path_factory.mktemp("membound"), ROWS),
            _build(tmp_path_factory.mktemp("membound_small"), SMALL_ROWS))


def _run(path: Path, policy: str, warm: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, str(path), policy, str(DEV_B), str(HOST_B),
                          ",".join(map(str, LOOKUPS)), str(warm)],
                         capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("policy", policy_names())
def test_anonymous_memory_is_bounded_by_the_budgets(stores, policy):
    big, small = stores
    r, control = _run(big, policy, warm=small), _run(small, policy, warm=small)
    budgets = DEV_B + HOST_B
    bound = 1.1 * budgets + FIXED
    assert r["anon"] <= bound, (f"{policy}: RssAnon grew {r['anon'] / 2**20:.1f} MiB for budgets of "
                                f"{budgets / 2**20:.0f} MiB and a {ROWS}-row table (bound {bound / 2**20:.1f} MiB): {r}")
    # nothing per table row: 100x the rows cost (nearly) nothing more than the control
    assert r["anon"] - control["anon"] <= PER_ROW_SLACK, (
        f"{policy}: {ROWS} rows cost {(r['anon'] - control['anon']) / 2**20:.1f} MiB more than {SMALL_ROWS} "
        f"({(r['anon'] - control['anon']) / (ROWS - SMALL_ROWS):.2f} B per row): {r} {control}")
    # stats() accounts for the slabs and the bookkeeping (the rest is code and temporaries)
    slots = budgets // (DIM * 2)
    assert budgets - 2 * DIM * 2 <= r["stats_total"] - r["meta"] <= budgets + (64 << 20), r
    assert 0 < r["meta"] < 256 * slots, r  # under 256 B per slot, hint table included


@pytest.mark.parametrize("policy", ["lru", "default"])
def test_stats_report_the_whole_memory(tmp_path, policy):
    """stats()["memory"]: each tier's slab and bookkeeping (the index's state arrays, the
    row map included), the pool, and their total; the hint table counts once allocated."""
    from ...conftest import one_table_store

    path, _ = one_table_store(tmp_path, T, 5000, 16)
    with tierstore.open(path, device="cpu", device_budget=500 * 64, host_budget=2000 * 64, policy=policy) as s:
        s.lookup(T, np.arange(0, 5000, 7))
        t = s._tables[T]  # the tiers' own figures, to compare with
        mem = s.stats()["memory"]
        assert mem["device_slab"] == t.dev.slab.numel() * 4 == 500 * 64
        assert mem["host_slab"] == 2000 * 64
        assert mem["device_meta"] == sum(a.nbytes for a in t.dev.index.state) > 0
        assert mem["host_meta"] == sum(a.nbytes for a in t.host.index.state) > 0
        assert mem["total"] == sum(v for k, v in mem.items() if k != "total") >= mem["pool"] > 0
        before = mem["device_meta"]
        s.hint(T, np.arange(10))
        grown = s.stats()["memory"]["device_meta"] - before
        assert grown > 0 if policy == "default" else grown == 0  # default's hint table, on the first hint


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                             tuple(int(k) for k in sys.argv[5].split(",")) if len(sys.argv) > 5 else LOOKUPS,
                             sys.argv[6] if len(sys.argv) > 6 else None)))
