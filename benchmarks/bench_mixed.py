"""Mixed workload: Zipf(1.0) ids over a table 20x the device budget and 4x the host budget.

Reports lookups/s through all three tiers (synchronous, and pipelined with the caller
computing between prefetch and result), per-tier hit rates, the fraction of lookup time
hidden behind compute, and the index metadata per table row and per cached row. The
baseline in the same run is the all-in-memory table (torch.index_select into out=).
Cold reads use O_DIRECT, so every disk-tier row is a real device read, not the page cache.

    python -m benchmarks.bench_mixed [--quick] [--table-mib 1024] [--ids 16384] [--batches 60]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import tierstore

from .common import evict, json_line, machine_info, print_header

from .workloads import CACHE, load_table, table_store, zipf_ids


def _compute(seconds: float, a: torch.Tensor) -> None:
    """Stand-in for the model's layers before the Engram layer: real matmuls (GIL released)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


def _arrays(obj: object, seen: set[int], n_rows: int) -> tuple[int, int]:
    """(bytes of arrays with one entry per table row, bytes of all other arrays) reachable
    from ``obj``'s attributes, each array counted once."""
    per_row = other = 0
    for v in vars(obj).values():
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, np.ndarray):
            if v.ndim >= 1 and v.shape[0] == n_rows:
                per_row += v.nbytes
            else:
                other += v.nbytes
        elif hasattr(v, "__dict__") and not isinstance(v, type) and type(v).__module__.startswith("tierstore"):
            a, b = _arrays(v, seen, n_rows)
            per_row, other = per_row + a, other + b
    return per_row, other


def _metadata_bytes(store: tierstore.Store) -> tuple[int, int, int, int]:
    """(per-table-row bytes, per-slot bytes, table rows, cached slots) over all cache tiers."""
    per_row = other = rows = slots = 0
    seen: set[int] = set()
    for t in store._tables.values():
        rows += t.info.rows
        for tier in (t.dev, t.host):
            if tier.index is not None:
                slots += tier.capacity
                a, b = _arrays(tier.index, seen, t.info.rows)
                per_row, other = per_row + a, other + b
    return per_row, other, rows, slots


def run(table_mib: int, n_ids: int, batches: int, row_bytes: int, threads: int, cache: Path = CACHE) -> dict:
    torch.set_num_threads(threads)
    dim = row_bytes // 2
    rows = table_mib * 2**20 // row_bytes - 7  # not a power of two: per-row arrays are told apart by length
    path, name = table_store(rows, dim, torch.bfloat16, cache=cache)
    nbytes = rows * row_bytes
    rng = np.random.default_rng(0)
    warm = [zipf_ids(rows, n_ids, 1.0, rng) for _ in range(batches)]
    test = [zipf_ids(rows, n_ids, 1.0, rng) for _ in range(batches)]

    table = load_table(path, name)
    buf = torch.empty(n_ids, dim, dtype=table.dtype)
    t0 = time.perf_counter()
    for ids in test:
        torch.index_select(table, 0, torch.from_numpy(ids), out=buf)
    base_rate = len(test) * n_ids / (time.perf_counter() - t0)
    del table

    evict(path / "tables" / "t0000.rows")
    res: dict = {"table_mib": table_mib, "row_bytes": row_bytes, "ids_per_lookup": n_ids,
                 "device_budget": nbytes // 20, "host_budget": nbytes // 4}
    with tierstore.open(path, device="cpu", device_budget=nbytes // 20, host_budget=nbytes // 4,
                        direct=True) as store:
        out = torch.empty(n_ids, dim, dtype=torch.bfloat16)
        for ids in warm:  # warm the caches on a separate sample of the same distribution
            store.lookup(name, ids, out=out)
        store.reset_stats()
        t0 = time.perf_counter()
        for ids in test:
            store.lookup(name, ids, out=out)
        sync_s = time.perf_counter() - t0
        s = store.stats()
        res.update({
            "sync_lookups_per_s": len(test) * n_ids / sync_s,
            "device_hit_ratio": s["device"]["hit_ratio"], "host_hit_ratio": s["host"]["hit_ratio"],
            "disk_rows_per_lookup": s["disk"]["rows_read"] / len(test),
            "disk_rows_per_s": s["disk"]["rows_read"] / max(1e-9, s["disk"]["read_seconds"]),
        })
        # pipelined: prefetch batch i+1, compute for the time one lookup took, then take its result
        per_lookup = sync_s / len(test)
        a = torch.randn(256, 256)
        store.reset_stats()
        outs = [torch.empty(n_ids, dim, dtype=torch.bfloat16) for _ in range(2)]
        t0 = time.perf_counter()
        fut = store.prefetch(name, test[0], out=outs[0])
        for i in range(len(test)):
            nxt = store.prefetch(name, test[i + 1], out=outs[(i + 1) % 2]) if i + 1 < len(test) else None
            _compute(per_lookup, a)
            fut.result()
            fut = nxt
        pipe_s = time.perf_counter() - t0
        lat = store.stats()["latency"]
        meta_rows, meta_slots, trows, slots = _metadata_bytes(store)
    hidden = 1.0 - lat["stall_seconds"] / sync_s
    res.update({
        "pipelined_wall_s": pipe_s, "compute_s": per_lookup * len(test), "sync_wall_s": sync_s,
        "stall_s": lat["stall_seconds"], "hidden_fraction": hidden,
        "ready_at_result": lat["ready_at_result"] / max(1, lat["results"]),
        "all_in_memory_lookups_per_s": base_rate,
        "ratio_sync_vs_in_memory": (len(test) * n_ids / sync_s) / base_rate,
        "metadata_bytes_per_table_row": meta_rows / trows, "metadata_bytes_per_cached_row": meta_slots / max(1, slots),
    })
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--table-mib", type=int, default=1024)
    ap.add_argument("--ids", type=int, default=16384)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--row-bytes", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help="where benchmark stores are built and kept")
    args = ap.parse_args(argv)
    if args.quick:
        args.table_mib, args.ids, args.batches = 8, 2048, 6
    print_header("mixed workload: device 1/20, host 1/4 of the table, rest on disk (O_DIRECT)",
                 machine_info(CACHE.parent), [f"torch {torch.__version__}, {args.threads} threads, device=cpu"])
    r = run(args.table_mib, args.ids, args.batches, args.row_bytes, args.threads, args.cache_dir)
    print(f"in-memory index_select: {r['all_in_memory_lookups_per_s'] / 1e6:.2f} M ids/s")
    print(f"store, synchronous:     {r['sync_lookups_per_s'] / 1e6:.2f} M ids/s ({r['ratio_sync_vs_in_memory']:.3f}x)  "
          f"hit device {r['device_hit_ratio']:.3f} host {r['host_hit_ratio']:.3f}  "
          f"disk {r['disk_rows_per_lookup']:.0f} rows/lookup at {r['disk_rows_per_s']:.0f} rows/s")
    print(f"pipelined: wall {r['pipelined_wall_s']:.2f}s for {r['compute_s']:.2f}s compute + {r['sync_wall_s']:.2f}s "
          f"lookups; stall {r['stall_s']:.2f}s -> {100 * r['hidden_fraction']:.1f}% of lookup time hidden")
    print(f"index metadata: {r['metadata_bytes_per_table_row']:.2f} B per table row (both tiers) + "
          f"{r['metadata_bytes_per_cached_row']:.1f} B per cached row (slot map, leases, policy state)")
    res = {"benchmark": "mixed", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}
    json_line(res)
    return res


if __name__ == "__main__":
    main()
