"""warm="open" against warm="background": time to the first row, time until the tiers are
fully warm, and a short workload counted from the open call.

One table of 264-byte rows (``bench_open.ensure_store``), a saved profile whose hot rows
(``--hot``) are scattered over it with Zipf counts, and its hot-set snapshot; host budget =
the hot set, device budget = a quarter of it. Each round opens the store once per mode, in
alternating order (the baseline in the same run), with the row file, its checksums and the
snapshot evicted from the page cache before every open. Per open:

- ``open_s``: ``tierstore.open`` returns;
- ``first_row_s``: open + one lookup of the hottest row;
- ``first_batch_s``: then one lookup of ``--batch`` ids drawn from the profile (Zipf);
- ``workload_s``: then ``--batches`` more such lookups (the whole workload, open counted);
- ``warm_s``: until every placed row is in its tier (``open_s`` for "open"; the loader's
  end for "background", waited for after the workload).

Medians over ``--rounds``, ratios open/background, and the load average (the machine may be
shared: read the ratios, not the seconds).

    python -m benchmarks.bench_warm [--quick] [--size 1536MiB] [--hot 768MiB] [--policy default] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import tierstore
from benchmarks.bench_open import ROW_BYTES, TABLE, ensure_store, save_scattered_profile
from benchmarks.common import evict, json_line, machine_info, print_header
from tierstore.format.snapshot import snapshot_path
from tierstore.sizes import format_size, parse_size

MODES = ("open", "background")


def one_open(store: Path, mode: str, *, policy: str, host: int, device: int, first: int, batches: list[np.ndarray]
             ) -> dict[str, Any]:
    info = tierstore.open(store, device="cpu").tables[TABLE]
    evict(store / info.file, store / info.checksum_file, snapshot_path(store, TABLE))
    t0 = time.perf_counter()
    s = tierstore.open(store, device="cpu", device_budget=device, host_budget=host, policy=policy, warm=mode)
    r: dict[str, Any] = {"open_s": time.perf_counter() - t0}
    try:
        s.lookup(TABLE, np.array([first]))
        r["first_row_s"] = time.perf_counter() - t0
        s.lookup(TABLE, batches[0])
        r["first_batch_s"] = time.perf_counter() - t0
        for ids in batches[1:]:
            s.lookup(TABLE, ids)
        r["workload_s"] = time.perf_counter() - t0
        if s._warmer is not None:
            s._warmer.wait()
        # the loader starts as open returns; its tiers load one after the other (seconds: their sum)
        r["warm_s"] = r["open_s"] if mode == "open" else r["open_s"] + s.stats()["open"]["seconds"]
        o = s.stats()["open"]
        r.update(warm=o["warm"], bytes_read=o["bytes_read"], on_demand=o["on_demand"], placed=o["placed"],
                 host_hits=s.stats()["host"]["hits"], disk_rows=s.stats()["disk"].get("rows_read", 0))
    finally:
        s.close()
    return r


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1536MiB", help="table size")
    p.add_argument("--hot", default="768MiB", help="bytes of scattered profiled rows; the host budget holds them")
    p.add_argument("--policy", default="default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096, help="ids per lookup of the workload")
    p.add_argument("--batches", type=int, default=50, help="lookups in the workload")
    p.add_argument("--quick", action="store_true", help="a 16 MiB table, 4 MiB hot: for the test")
    p.add_argument("--cache-dir", default=os.environ.get("TIERSTORE_BENCH_CACHE", "/tmp/tierstore_bench_cache"))
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.hot, args.rounds, args.batches = "16MiB", "4MiB", 1, 3
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    size, hot_bytes = parse_size(args.size), parse_size(args.hot)
    hot_rows = hot_bytes // ROW_BYTES
    host, device = hot_rows * ROW_BYTES, hot_rows * ROW_BYTES // 4
    print_header("warm='open' vs warm='background'", machine_info(cache),
                 [f"table {format_size(size)} of {ROW_BYTES}-byte rows; hot set {format_size(hot_bytes)} scattered, "
                  f"with a snapshot; host budget = the hot set, device 1/4; policy {args.policy}; page cache "
                  f"evicted before every open; {args.batches} lookups of {args.batch} Zipf ids"])
    store = ensure_store(cache, size)
    hot = save_scattered_profile(store, hot_rows)  # hot[i] has the i-th largest count (Zipf)
    tierstore.save_snapshot(store)
    with tierstore.open(store, device="cpu", device_budget=4096 * ROW_BYTES, host_budget=4096 * ROW_BYTES,
                        policy=args.policy, use_profile=False) as s:  # compile the kernels before any timing
        s.lookup(TABLE, np.arange(8192))
    rng = np.random.default_rng(0)
    w = 1.0 / np.arange(1, len(hot) + 1)
    batches = [hot[rng.choice(len(hot), args.batch, p=w / w.sum())] for _ in range(args.batches)]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    loads = []
    for k in range(args.rounds):
        for mode in (MODES if k % 2 == 0 else MODES[::-1]):  # alternate which goes first
            loads.append(os.getloadavg()[0])
            r = one_open(store, mode, policy=args.policy, host=host, device=device, first=int(hot[0]),
                         batches=batches)
            runs[mode].append(r)
            print(f"round {k} {mode:>10}: open {r['open_s']:6.2f} s, first row {r['first_row_s']:6.2f} s, first "
                  f"batch {r['first_batch_s']:6.2f} s, workload {r['workload_s']:6.2f} s, warm {r['warm_s']:6.2f} s"
                  f"  (on demand {r['on_demand']:,}, load {loads[-1]:.1f})")
    keys = ("open_s", "first_row_s", "first_batch_s", "workload_s", "warm_s")
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in keys} for m in MODES}
    ratio = {k: med["open"][k] / med["background"][k] for k in keys}
    print("medians:", {m: {k: round(v, 3) for k, v in med[m].items()} for m in MODES})
    print("open / background:", {k: round(v, 2) for k, v in ratio.items()}, f"loadavg {statistics.median(loads):.1f}")
    result = {"size": size, "hot_bytes": host, "policy": args.policy, "runs": runs, "median": med,
              "ratio_open_over_background": ratio, "loadavg": loads}
    json_line(result)
    return result


if __name__ == "__main__":
    main()
