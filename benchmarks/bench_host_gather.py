"""Host-tier gather against torch.index_select, same process, same threads.

Cases: rows of 128 B and 1 KiB, 64K ids per lookup, uniform and Zipf(1.0) ids.
Baselines: index_select into a preallocated out= (the practical limit) and index_select
allocating its output each call. Ours: the store with the table resident in the host tier
(lookup with out= and with pooled buffers), and a host *cache* of half the table (the
CacheIndex path: slot lookup, leases, policy bookkeeping, misses from disk).

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


def _rate(fn, reps: int) -> float:
    fn()  # warm: page faults, pools
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return reps / (time.perf_counter() - t0)


def run(table_mib: int, n_ids: int, reps: int, threads: int, cache: Path = CACHE) -> dict:
    torch.set_num_threads(threads)
    results = []
    for row_bytes in (128, 1024):
        dim = row_bytes // 2  # float16
        rows = table_mib * 2**20 // row_bytes
        path, name = table_store(rows, dim, cache=cache)
        table = load_table(path, name)
        rng = np.random.default_rng(0)
        for dist, a in (("uniform", 0.0), ("zipf1.0", 1.0)):
            ids_np = zipf_ids(rows, n_ids, a, rng)
            ids = torch.from_numpy(ids_np)
            buf = torch.empty(n_ids, dim, dtype=table.dtype)
            base_out = _rate(lambda: torch.index_select(table, 0, ids, out=buf), reps)
            base_alloc = _rate(lambda: torch.index_select(table, 0, ids), reps)
            with tierstore.open(path, device="cpu", device_budget=0, host_budget=table.nbytes) as store:
                ours_out = _rate(lambda: store.lookup(name, ids, out=buf), reps)
                ours_pool = _rate(lambda: store.lookup(name, ids), reps)
                assert torch.equal(store.lookup(name, ids).view(torch.int16), table[ids].view(torch.int16))
            with tierstore.open(path, device="cpu", device_budget=table.nbytes // 2, host_budget=table.nbytes,
                                policy="lru") as store:
                for _ in range(3):  # fill the cache
                    store.lookup(name, ids, out=buf)
                store.reset_stats()
                ours_cache = _rate(lambda: store.lookup(name, ids, out=buf), reps)
                hit = store.stats()["device"]["hit_ratio"]
            gbs = lambda r: r * n_ids * row_bytes / 1e9  # noqa: E731
            row = {
                "row_bytes": row_bytes, "ids": dist, "table_mib": table_mib,
                "index_select_out_GBps": round(gbs(base_out), 2),
                "index_select_alloc_GBps": round(gbs(base_alloc), 2),
                "store_resident_out_GBps": round(gbs(ours_out), 2),
                "store_resident_pooled_GBps": round(gbs(ours_pool), 2),
                "store_cache_half_GBps": round(gbs(ours_cache), 2), "cache_hit_ratio": round(hit, 3),
                "ratio_out": round(ours_out / base_out, 3), "ratio_pooled": round(ours_pool / base_out, 3),
                "ratio_pooled_vs_alloc": round(ours_pool / base_alloc, 2),
                "ratio_cache_half": round(ours_cache / base_out, 3),
                "Mrows_per_s_out": round(ours_out * n_ids / 1e6, 1),
            }
            results.append(row)
            print(f"{row_bytes:>5} B  {dist:<8}  index_select(out=) {row['index_select_out_GBps']:6.2f} GB/s  "
                  f"alloc {row['index_select_alloc_GBps']:6.2f}  | store out= {row['store_resident_out_GBps']:6.2f} "
                  f"({row['ratio_out']:.2f}x)  pooled {row['store_resident_pooled_GBps']:6.2f} "
                  f"({row['ratio_pooled']:.2f}x)  half-cache {row['store_cache_half_GBps']:6.2f} "
                  f"({row['ratio_cache_half']:.2f}x, hit {hit:.2f})")
        del table
    return {"benchmark": "host_gather", "threads": threads, "ids_per_lookup": n_ids, "results": results}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests")
    ap.add_argument("--table-mib", type=int, default=1024)
    ap.add_argument("--ids", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help="where benchmark stores are built and kept")
    args = ap.parse_args(argv)
    if args.quick:
        args.table_mib, args.ids, args.reps = 4, 4096, 3
    print_header("host-tier gather vs torch.index_select", machine_info(CACHE.parent),
                 [f"torch {torch.__version__}, {args.threads} threads, device=cpu (host tier in plain memory)"])
    res = run(args.table_mib, args.ids, args.reps, args.threads, args.cache_dir)
    json_line(res)
    return res


if __name__ == "__main__":
    main()
