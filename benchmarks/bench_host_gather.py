"""Host-tier gather against torch.index_select, same process, same threads.

Cases: rows of 128 B and 1 KiB, 64K ids per lookup, uniform and Zipf(1.0) ids.
Baselines: index_select into a preallocated out= (the practical limit), both on the
store's own slab (same memory, so the ratio is the API's overhead) and on the user's
own copy of the table; and index_select allocating its output each call. Ours: the store
with the table resident in the host tier (lookup with out= and with pooled buffers), and
a cache of half the table on the CacheIndex path (slot lookup, leases, LRU bookkeeping;
warmed so every id hits). Systems are interleaved round by round; medians reported.

    python -m benchmarks.bench_host_gather [--quick] [--table-mib 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import tierstore

from .common import json_line, machine_info, print_header

from .workloads import CACHE, load_table, table_store, zipf_ids


def _rates(systems: dict, reps: int, rounds: int) -> dict[str, float]:
    """Calls/s of each system: median over ``rounds`` interleaved rounds of ``reps`` calls, so
    drift in the machine's load hits every system alike."""
    for fn in systems.values():
        fn()  # warm: page faults, pools
    samples: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(rounds):
        for k, fn in systems.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[k].append(reps / (time.perf_counter() - t0))
    return {k: float(np.median(v)) for k, v in samples.items()}


def run(table_mib: int, n_ids: int, reps: int, threads: int, cache: Path = CACHE, rounds: int = 5) -> dict:
    torch.set_num_threads(threads)
    results = []
    for row_bytes in (128, 1024):
        dim = row_bytes // 2  # float16
        rows = table_mib * 2**20 // row_bytes
        path, name = table_store(rows, dim, cache=cache)
        table = load_table(path, name)  # the user's own in-memory copy
        rng = np.random.default_rng(0)
        resident = tierstore.open(path, device="cpu", device_budget=0, host_budget=table.nbytes)
        cached = tierstore.open(path, device="cpu", device_budget=table.nbytes // 2, host_budget=table.nbytes,
                                policy="lru")
        slab = resident._tables[name].host.slab  # the store's own memory, for a same-memory baseline
        try:
            for dist, a in (("uniform", 0.0), ("zipf1.0", 1.0)):
                ids = torch.from_numpy(zipf_ids(rows, n_ids, a, rng))
                buf = torch.empty(n_ids, dim, dtype=table.dtype)
                raw = buf.view(slab.dtype)
                for _ in range(3):  # fill the cache: every id is then a hit through the index path
                    cached.lookup(name, ids, out=buf)
                cached.reset_stats()
                r = _rates({
                    "index_select_slab": lambda: torch.index_select(slab, 0, ids, out=raw),
                    "index_select_out": lambda: torch.index_select(table, 0, ids, out=buf),
                    "index_select_alloc": lambda: torch.index_select(table, 0, ids),
                    "store_out": lambda: resident.lookup(name, ids, out=buf),
                    "store_pooled": lambda: resident.lookup(name, ids),
                    "store_cached": lambda: cached.lookup(name, ids, out=buf),
                }, reps, rounds)
                assert torch.equal(resident.lookup(name, ids).view(torch.int16), table[ids].view(torch.int16))
                hit = cached.stats()["device"]["hit_ratio"]
                gbs = {k: round(v * n_ids * row_bytes / 1e9, 2) for k, v in r.items()}
                base = max(r["index_select_slab"], r["index_select_out"])  # the stronger baseline
                row = {
                    "row_bytes": row_bytes, "ids": dist, "table_mib": table_mib,
                    **{f"{k}_GBps": v for k, v in gbs.items()},
                    "cache_hit_ratio": round(hit, 3),
                    "ratio_out": round(r["store_out"] / base, 3),
                    "ratio_pooled": round(r["store_pooled"] / base, 3),
                    "ratio_pooled_vs_alloc": round(r["store_pooled"] / r["index_select_alloc"], 2),
                    "ratio_cached": round(r["store_cached"] / base, 3),
                    "Mrows_per_s_out": round(r["store_out"] * n_ids / 1e6, 1),
                }
                results.append(row)
                print(f"{row_bytes:>5} B  {dist:<8}  index_select(out=) slab {gbs['index_select_slab']:6.2f} GB/s, "
                      f"own table {gbs['index_select_out']:6.2f}, alloc {gbs['index_select_alloc']:6.2f} | "
                      f"store out= {gbs['store_out']:6.2f} ({row['ratio_out']:.2f}x)  pooled {gbs['store_pooled']:6.2f} "
                      f"({row['ratio_pooled']:.2f}x, {row['ratio_pooled_vs_alloc']:.1f}x alloc)  "
                      f"cached {gbs['store_cached']:6.2f} ({row['ratio_cached']:.2f}x, hit {hit:.2f})")
        finally:
            resident.close()
            cached.close()
        del table, slab
    return {"benchmark": "host_gather", "threads": threads, "ids_per_lookup": n_ids, "rounds": rounds,
            "results": results}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests")
    ap.add_argument("--table-mib", type=int, default=1024)
    ap.add_argument("--ids", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=10, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help="where benchmark stores are built and kept")
    args = ap.parse_args(argv)
    if args.quick:
        args.table_mib, args.ids, args.reps, args.rounds = 4, 1024, 2, 2  # ids fit the cache: every one hits
    print_header("host-tier gather vs torch.index_select", machine_info(CACHE.parent),
                 [f"torch {torch.__version__}, {args.threads} threads, device=cpu (host tier in plain memory)"])
    res = run(args.table_mib, args.ids, args.reps, args.threads, args.cache_dir, args.rounds)
    json_line(res)
    return res


if __name__ == "__main__":
    main()
