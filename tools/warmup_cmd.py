"""`tierstore warmup`: compile every cache kernel now, so the first `tierstore.open` of a
fresh install serves its first row in seconds instead of compiling for a minute.

The kernels (numba, ``tierstore.jit``) are compiled on first use and cached on disk per
source version; a fresh install has an empty cache and compiling takes 10-20 s per policy
on two cores. This command builds a tiny store in a temporary directory and runs, for
every policy, exactly what a store runs (open, lookups with hits and misses, a prefetch,
a hint, close) and, with ``--simulator``, what ``tierstore profile`` runs (a replay of a
small trace; LRU's stack distances and Belady's optimum, tierstore.analysis), so every specialization a user will need is in the cache. ``make`` runs it
once after installing; running it again costs a second or two (everything loads).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def warm(policies: list[str], *, simulator: bool, progress: bool = True) -> dict[str, float]:
    """Compile (or load) the kernels of ``policies``; seconds per policy."""
    import torch

    import tierstore
    from tierstore.format.profile import save_profile
    from tierstore.tiers.page_reader import warm_kernels

    warm_kernels()  # the cold path's completion booking: the tiny store below reads no large batch
    rows, dim = 4096, 8
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tierstore-warmup-") as tmp:
        ckpt = Path(tmp) / "warmup.pt"
        torch.save({"warmup.engram.memory.weight": torch.arange(rows * dim, dtype=torch.float32).view(rows, dim)},
                   ckpt)
        store = tierstore.build_store(ckpt, Path(tmp) / "store", progress=False)
        table = "warmup.engram.memory.weight"
        rng = np.random.default_rng(0)
        save_profile(store, table, rng.zipf(1.2, rows).clip(0, 10**6).astype(np.int64))
        trace = rng.zipf(1.2, 20_000).astype(np.int64) % rows
        for policy in tqdm(policies, desc="warmup", unit="policy", disable=not progress):
            t = time.perf_counter()
            with tierstore.open(store, device="cpu", device_budget=64 * dim * 4, host_budget=512 * dim * 4,
                                policy=policy) as s:
                s.hint(table, trace[:64])
                for lo in range(0, 4096, 1024):  # hits and misses, inline and on a worker
                    s.lookup(table, trace[lo:lo + 1024])
                s.prefetch(table, trace[:5000]).result()
            # a host budget that holds the whole table makes it a resident tier: other kernels,
            # and a hint then goes to the one cached tier (walk.announce_one_checked)
            with tierstore.open(store, device="cpu", device_budget=64 * dim * 4, host_budget=rows * dim * 4,
                                policy=policy) as s:
                s.hint(table, trace[:64])
                s.lookup(table, trace[:1024])
                s.prefetch(table, trace[:5000]).result()
            if simulator:
                from tierstore.analysis.simulate import simulate

                simulate(trace, [64, 512], [policy], n_rows=rows)
            out[policy] = time.perf_counter() - t
        if simulator:  # the analysis kernels every profile runs: LRU's stack distances (more than
            # two capacities), Belady's optimum with and without recorded batches
            from tierstore.analysis.simulate import simulate

            for offsets in (None, np.arange(0, trace.size, 16, dtype=np.int64)):
                simulate(trace, [64, 128, 512], ["lru", "opt"], n_rows=rows, offsets=offsets)
    return out


def run(args: argparse.Namespace) -> int:
    from tierstore.cache.registry import policy_names
    from tierstore.jit import KERNEL_CACHE_DIR

    policies = args.policy or policy_names()
    t = time.perf_counter()
    secs = warm(policies, simulator=args.simulator, progress=not args.json)
    total = time.perf_counter() - t
    if args.json:
        print(json.dumps({"cache": KERNEL_CACHE_DIR, "seconds": round(total, 2),
                          "per_policy": {k: round(v, 2) for k, v in secs.items()}}))
    else:
        print(f"kernels ready for {', '.join(policies)} in {total:.1f} s (cache: {KERNEL_CACHE_DIR})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("warmup", help="compile every cache kernel now (a fresh install's first open is then fast)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", action="append", help="only this policy (repeatable); default: every policy")
    p.add_argument("--simulator", action="store_true", help="also the simulator's kernels (`tierstore profile`)")
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=run)
