"""`tierstore warmup` leaves nothing for a store to compile: after it, a fresh process opens a
store, looks rows up and replays a trace without a single numba compile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Opens a store with the given policy the way a user does, then counts the compiles of every
# kernel in the package (numba's per-dispatcher cache_misses: a miss is a compile).
USE = textwrap.dedent("""
    import sys, tempfile, numpy as np, torch, numba
    from pathlib import Path
    import tierstore
    from tierstore.analysis.simulate import simulate
    policy, host_rows = sys.argv[1], int(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"t.engram.memory.weight": torch.randn(3000, 16)}, Path(tmp) / "c.pt")
        store = tierstore.build_store(Path(tmp) / "c.pt", Path(tmp) / "s", progress=False)
        ids = np.random.default_rng(1).integers(0, 3000, 4000)
        with tierstore.open(store, device="cpu", device_budget=16 * 64 * 4, host_budget=16 * host_rows * 4,
                            policy=policy) as s:
            s.hint("t.engram.memory.weight", ids[:10])
            assert torch.equal(s.lookup("t.engram.memory.weight", ids[:900]),
                               s.lookup("t.engram.memory.weight", ids[:900]))
            s.prefetch("t.engram.memory.weight", ids).result()
        simulate(ids, [64], [policy], n_rows=3000)
        for offsets in (None, np.arange(0, ids.size, 16)):  # the analysis kernels: stack distances, opt
            simulate(ids, [64, 128, 256], ["lru", "opt"], n_rows=3000, offsets=offsets)
    misses = 0
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("tierstore"):
            for v in list(vars(mod).values()):
                if isinstance(v, numba.core.registry.CPUDispatcher):
                    misses += sum(v.stats.cache_misses.values())
    print("COMPILES", misses)
""")


def _env(cache: Path) -> dict[str, str]:
    return dict(os.environ, TIERSTORE_KERNEL_CACHE=str(cache), PYTHONPATH=str(REPO))


def _compiles(cache: Path, policy: str, host_rows: int = 300) -> int:
    p = subprocess.run([sys.executable, "-c", USE, policy, str(host_rows)], env=_env(cache), capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return int(p.stdout.split("COMPILES")[1])


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    """One `tierstore warmup --policy s3fifo --simulator` into a fresh cache, shared by the
    cases below (each warmup compiles every kernel: ~50 s on 2 cores)."""
    warm = tmp_path_factory.mktemp("warm")
    p = subprocess.run([sys.executable, "-m", "tierstore_cli.cli", "warmup", "--policy", "s3fifo", "--simulator",
                        "--json"], env=_env(warm), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["per_policy"].keys() == {"s3fifo"}
    return warm


@pytest.mark.slow
def test_a_kernel_missing_from_the_cache_is_counted(warm_cache, tmp_path):
    # negative control for the count below: the warm cache less one small kernel every lookup
    # runs (the id check), so the same use compiles exactly what is missing (a fresh cache
    # compiled everything for ~40 s to show the same)
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache, cache)
    gone = [f for f in cache.rglob("ids._first_out_of_range-*") if f.is_file()]
    assert gone, "the warmup should have cached the id check"
    for f in gone:
        f.unlink()
    assert _compiles(cache, "s3fifo") >= 1


@pytest.mark.slow
@pytest.mark.parametrize("host_rows", [300, 3000], ids=["host-cache", "host-resident"])
def test_after_warmup_a_store_compiles_nothing(warm_cache, host_rows):
    # host_rows 3000: a host budget that holds the whole table makes the host tier resident,
    # whose kernels are other specializations (before: the first lookup compiled for 87 s)
    assert _compiles(warm_cache, "s3fifo", host_rows) == 0
