"""What a fresh process loads before its first row: ``import tierstore`` alone pulls in neither
torch nor numba, and a store's open and first lookups load only the kernels of its own cache
policy (plus the shared walk, queues, row maps), never another policy's. Each loaded kernel
costs numba start-up time on the way to the first row (docs/benchmarks.md, time to the first
row on a fresh install)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tierstore.cache.registry import POLICIES

REPO = Path(__file__).resolve().parents[3]

FIRST_ROW = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    import tierstore
    early = sorted(m for m in ("torch", "numba") if m in sys.modules)
    import numba, numpy as np, torch
    policy = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"t.engram.memory.weight": torch.randn(3000, 16)}, Path(tmp) / "c.pt")
        store = tierstore.build_store(Path(tmp) / "c.pt", Path(tmp) / "s", progress=False)
        ids = np.random.default_rng(1).integers(0, 3000, 900)
        with tierstore.open(store, device="cpu", device_budget=16 * 64 * 4, host_budget=16 * 512 * 4,
                            policy=policy) as s:
            s.lookup("t.engram.memory.weight", ids)  # misses: the walk
            s.lookup("t.engram.memory.weight", ids[:8])  # the decode path
    loaded = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("tierstore"):
            for k, v in list(vars(mod).items()):
                if isinstance(v, numba.core.registry.CPUDispatcher) and v.overloads:
                    loaded.setdefault(name, []).append(k)
    print(json.dumps({"early": early, "loaded": loaded}))
""")


@pytest.mark.parametrize("policy", ["lru", "default"])
def test_first_row_loads_only_its_policys_kernels(policy):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", FIRST_ROW, policy], env=env, capture_output=True, text=True,
                         timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["early"] == [], f"`import tierstore` imported {res['early']}"
    own = POLICIES[policy].__module__
    assert own in res["loaded"], res["loaded"]  # the check sees the policy's own kernels
    others = {m: k for m, k in res["loaded"].items() if m in {p.__module__ for p in POLICIES.values()} - {own}}
    assert others == {}, f"a {policy} store loaded other policies' kernels: {others}"
