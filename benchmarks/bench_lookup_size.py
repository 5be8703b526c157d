"""Per-id cost of one synchronous lookup against its size (1K..128K ids), every policy, with
and without a profile whose hot set fills the host tier, miss-heavy and repeated ids.

The store of issue 19's stall: a fp16 table of dim 128 (400,000 rows), device budget 16 MiB,
host budget 64 MiB (262,144 slots), ``device="cpu"``, the store file in the page cache.
With ``--profile`` the saved profile ranks 262,144 scattered rows by Zipf counts (the
repro's); without, no profile. Two kinds of lookup per size:

- ``miss``: fresh ids drawn uniformly from the table for every timed call (most miss the
  device tier, about a third miss the host tier too);
- ``repeat``: the ids of the previous call again (they hit as far as the tiers hold them;
  past the device tier's 65,536 slots a lookup streams through it).

Baseline in the same run: the same lookups on a resident table (``device_budget`` = the
table), whose per-id cost does not depend on bookkeeping. Reported per case: microseconds
per id, and ``growth`` = per-id cost at the largest size / at 4,096 ids (target <= 1.5).
A call over ``--max-seconds`` stops that case's larger sizes (reported as null): on a
stalling build the largest lookups take minutes.

    python -m benchmarks.bench_lookup_size [--quick] [--policies default,lru] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tierstore
from tierstore.cache import policy_names
from tierstore.format.profile import profile_paths, save_profile

from .common import json_line, machine_info, print_header
from .workloads import table_store

NAME = "bench.engram.memory.weight"


def per_id_us(store, ids_of, n: int, repeats: int, max_s: float, *, table: str = NAME) -> float | None:
    """Fastest of ``repeats`` lookups of ``ids_of(n)`` (after one untimed), us per id; None
    when one call took over ``max_s`` seconds."""
    best = None
    for i in range(repeats + 1):
        ids = torch.from_numpy(ids_of(n))
        t = time.perf_counter()
        store.lookup(table, ids)
        dt = time.perf_counter() - t
        if dt > max_s:
            return None
        if i:
            best = dt if best is None else min(best, dt)
    return best / n * 1e6


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for the test)")
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=128, help="float16 values per row")
    ap.add_argument("--device-budget", default="16MiB")
    ap.add_argument("--host-budget", default="64MiB")
    ap.add_argument("--sizes", default="1024,4096,16384,65536,131072", help="ids per lookup")
    ap.add_argument("--policies", default=",".join(policy_names()))
    ap.add_argument("--profiles", default="profile,none", help="'profile' (hot set fills the host tier), 'none'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=20.0)
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.dim, args.sizes, args.repeats = 20_000, 16, "1024,4096", 1
        args.device_budget, args.host_budget = "16KiB", "64KiB"
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    policies = args.policies.split(",")
    info = machine_info()
    print_header("per-id cost of one lookup vs its size, miss-heavy and repeated ids", info,
                 [f"table {args.rows:,} rows x {2 * args.dim} B; device {args.device_budget}, host "
                  f"{args.host_budget}; device='cpu'; 1 torch thread; sizes {sizes}"])
    rng = np.random.default_rng(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_lookup_size_") as tmp:
        path, _ = table_store(args.rows, args.dim, name=NAME, cache=Path(tmp))
        n_hot = min(args.rows, 262_144 if not args.quick else 2_048)
        hot = rng.choice(args.rows, size=n_hot, replace=False)
        counts = np.zeros(args.rows, np.int64)
        counts[hot] = np.maximum(1, 2e6 / np.arange(1, n_hot + 1)).astype(np.int64)
        cases = [("resident", "none")] + [(p, pr) for pr in args.profiles.split(",") for p in policies]
        for policy, prof in cases:
            if prof == "profile":
                save_profile(path, NAME, counts)
            else:
                for f in reversed(profile_paths(path, NAME)):  # the metadata first: no profile
                    f.unlink(missing_ok=True)
            if policy == "resident":
                store = tierstore.open(path, device="cpu", device_budget=args.rows * 2 * args.dim)
            else:
                store = tierstore.open(path, device="cpu", device_budget=args.device_budget,
                                       host_budget=args.host_budget, policy=policy)
            draw = np.random.default_rng(0)
            last = {"ids": np.empty(0, np.int64)}

            def fresh(n: int) -> np.ndarray:
                last["ids"] = draw.integers(0, args.rows, n)
                return last["ids"]

            def repeat(n: int) -> np.ndarray:
                return last["ids"] if last["ids"].size == n else fresh(n)

            row = {"policy": policy, "profile": prof}
            with store:
                for _ in range(4 * sizes[-1] // 4096):  # tiers full and churning, in small lookups
                    store.lookup(NAME, torch.from_numpy(fresh(4096)))
                for kind, ids_of in (("miss", fresh), ("repeat", repeat)):
                    stalled = False
                    for n in sizes:
                        v = None if stalled else per_id_us(store, ids_of, n, args.repeats, args.max_seconds)
                        stalled = v is None
                        row[f"{kind}_{n}_us_per_id"] = None if v is None else round(v, 3)
                    a, b = row.get(f"{kind}_4096_us_per_id"), row[f"{kind}_{sizes[-1]}_us_per_id"]
                    row[f"{kind}_growth"] = round(b / a, 2) if a and b else None
            results.append(row)
            print(f"{policy:>9s} {prof:>7s}  " + "  ".join(
                f"{kind} " + " ".join("stall" if row[f'{kind}_{n}_us_per_id'] is None else
                                      f"{row[f'{kind}_{n}_us_per_id']:.2f}" for n in sizes)
                + f" us/id (x{row[f'{kind}_growth']})" for kind in ("miss", "repeat")), flush=True)
    res = {"benchmark": "lookup_size", "rows": args.rows, "row_bytes": 2 * args.dim, "sizes": sizes,
           "device_budget": args.device_budget, "host_budget": args.host_budget, "results": results,
           "machine": info.get("cpu", "")}
    json_line(res)
    return res


if __name__ == "__main__":
    main()
