"""Per-call cost of a synchronous lookup whose ids all hit a budgeted device tier, against
the same lookup on a resident table (no cache bookkeeping at all), same process.

This is the cost a decode step pays: an Engram step looks up a few dozen ids, and the
cache layer's bookkeeping (slot lookup, leases, the policy's per-batch update) is paid per
call, not per row. Cases: ids per lookup in ``--sizes``, every policy in ``--policies``;
the device tier holds a tenth of the table and is warmed so every id hits. Systems are
interleaved round by round; the fastest round is reported (CPU-bound, warm).

    python -m benchmarks.bench_lookup [--quick] [--rows 1048576] [--dim 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import tierstore
from tierstore.cache import hot_rows
from tierstore.profile import save_profile

from .common import json_line, machine_info, print_header

NAME = "bench.engram.memory.weight"


def _per_call_us(fn, calls: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for the test)")
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--dim", type=int, default=64, help="float16 values per row")
    ap.add_argument("--sizes", default="64,1024,16384", help="ids per lookup")
    ap.add_argument("--policies", default="lru,lfu,s3fifo,wtinylfu,static,default")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.sizes, args.rounds = 1 << 14, "64,1024", 2
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    policies = args.policies.split(",")
    row_bytes = 2 * args.dim
    info = machine_info()
    print_header("synchronous lookup, all ids hit a budgeted device tier, vs resident", info,
                 [f"table {args.rows:,} rows x {row_bytes} B; device tier 10% of it; 1 torch thread"])
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_lookup_") as tmp:
        w = torch.randn(args.rows, args.dim, generator=torch.Generator().manual_seed(0)).half()
        save_file({NAME: w}, str(Path(tmp) / "m.safetensors"))
        path = tierstore.build_store(Path(tmp) / "m.safetensors", Path(tmp) / "store", progress=False)
        counts = np.bincount(rng.zipf(1.1, 20 * args.rows) % args.rows, minlength=args.rows)
        save_profile(path, NAME, counts)  # static and default place by it
        budget = args.rows * row_bytes // 10
        resident = tierstore.open(path, device="cpu", device_budget=args.rows * row_bytes)
        cached = {p: tierstore.open(path, device="cpu", device_budget=budget, policy=p) for p in policies}
        try:
            for n in sizes:
                # the n hottest rows of the profile, shuffled: every policy's tier holds them
                # after the warm-up lookups (static pins them), so every lookup is all hits
                ids = rng.permutation(hot_rows(counts, n))
                out = torch.empty(n, args.dim, dtype=torch.float16)
                calls = max(20, 20000 // max(1, n // 16))
                row = {"ids": n, "resident_us": 0.0}
                for s in cached.values():
                    for _ in range(3):
                        s.lookup(NAME, ids, out=out)  # admit, then every id hits
                    s.reset_stats()
                for _ in range(args.rounds):  # interleave: noise hits every system alike
                    r = _per_call_us(lambda: resident.lookup(NAME, ids, out=out), calls, 1)
                    row["resident_us"] = min(row["resident_us"] or r, r)
                    for p, s in cached.items():
                        c = _per_call_us(lambda s=s: s.lookup(NAME, ids, out=out), calls, 1)
                        row[f"{p}_us"] = min(row.get(f"{p}_us", c), c)
                for p, s in cached.items():
                    hr = s.stats()["device"]["hit_ratio"]
                    assert hr == 1.0, f"{p}: hit ratio {hr}, the benchmark needs all hits"
                    row[f"{p}_x_resident"] = round(row[f"{p}_us"] / row["resident_us"], 2)
                    row[f"{p}_us"] = round(row[f"{p}_us"], 1)
                row["resident_us"] = round(row["resident_us"], 1)
                results.append(row)
                print(f"{n:>6} ids  resident {row['resident_us']:8.1f} us  " + "  ".join(
                    f"{p} {row[f'{p}_us']:8.1f} ({row[f'{p}_x_resident']:.1f}x)" for p in policies))
        finally:
            resident.close()
            for s in cached.values():
                s.close()
    res = {"benchmark": "lookup", "rows": args.rows, "row_bytes": row_bytes, "results": results,
           "machine": info.get("cpu", "")}
    json_line(res)
    return res


if __name__ == "__main__":
    main()
