"""Cache-policy simulation speed: exact replays (one access at a time, or the recorded
batches) of every policy through the store's compiled walk, LRU at 50 capacities from one
stack-distance pass, exact MIN, vs a plain LRU.

Targets: >= 20M lookups/s for lru and >= 5M/s for every other policy, exact, one
core, over a 10M-lookup trace; LRU at 50 capacities in the time of 2 single replays.
Baseline, same process: a textbook LRU on an ``OrderedDict`` (one Python step per lookup),
whose hits our LRU must reproduce exactly.

    python -m benchmarks.bench_policies                 # 10M Zipf(1.0) lookups, 1M rows
    python -m benchmarks.bench_policies --trace T.zst   # a real trace (first table)
    python -m benchmarks.bench_policies --quick         # tiny, for the test
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import OrderedDict

import numpy as np

from tierstore.analysis.belady import belady_hits
from tierstore.cache import CacheIndex, policy_names
from tierstore.analysis.simulate import batch_bounds, load_trace, replay, simulate

from .common import json_line

SPEED_POLICIES = tuple(policy_names())


def ordered_dict_lru(trace: list[int], capacity: int) -> int:
    """The baseline: textbook LRU, one Python step per lookup."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for r in trace:
        if r in cache:
            cache.move_to_end(r)
            hits += 1
        else:
            cache[r] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lookups", type=int, default=10_000_000)
    ap.add_argument("--rows", type=int, default=1_000_000, help="table rows of the Zipf trace")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the synthetic trace")
    ap.add_argument("--capacity", type=float, default=0.01, help="cache size, fraction of table rows")
    ap.add_argument("--batch", type=int, default=1,
                    help="merge steps into batches of >= this many lookups (approximate; 1: exact)")
    ap.add_argument("--trace", default=None,
                    help="a real trace file instead (first table; its first half makes the profile)")
    ap.add_argument("--quick", action="store_true", help="tiny run (200K lookups) for tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.lookups, args.rows = 200_000, 20_000

    rng = np.random.default_rng(0)
    offsets = None
    if args.trace:
        t = next(iter(load_trace(args.trace).tables.values()))
        trace, offsets = t.rows[: args.lookups], t.offsets
        n_rows = int(t.n_rows or trace.max() + 1)
        source = f"trace {args.trace}"
        if offsets is not None:
            offsets = offsets[offsets < trace.size]
    else:
        # Zipf(a) over ranks, randomly permuted onto rows (hot rows are not the low ids)
        p = 1.0 / np.arange(1, args.rows + 1) ** args.zipf
        ranks = rng.choice(args.rows, size=2 * args.lookups, p=p / p.sum())  # half 1: profile
        trace = rng.permutation(args.rows)[ranks].astype(np.int64)
        n_rows = args.rows
        source = f"Zipf({args.zipf}) over {n_rows} rows"
    cap = max(1, int(args.capacity * n_rows))
    half = trace.size // 2
    profile = np.bincount(trace[:half], minlength=n_rows)  # static/default: profile of half 1,
    test = trace[half:]  # replayed on half 2 (no peeking)
    if offsets is not None:
        offsets = offsets[offsets >= half] - half
        if offsets.size == 0 or offsets[0] != 0:
            offsets = np.r_[0, offsets]
    print(f"# bench_policies: {source}; replay {test.size:,} lookups, capacity {cap:,} rows "
          f"({args.capacity:.2%}), {'exact' if args.batch == 1 else f'approximate: batches >= {args.batch}'}; numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}")

    # baseline: OrderedDict LRU on a prefix, and exactness of our LRU one access at a time
    n_base = min(test.size, 1_000_000 if not args.quick else 50_000)
    t0 = time.perf_counter()
    base_hits = ordered_dict_lru(test[:n_base].tolist(), cap)
    base_rate = n_base / (time.perf_counter() - t0)
    n_exact = min(n_base, 20_000)
    ours_exact = simulate(test[:n_exact], [cap], ["lru"], n_rows=n_rows, min_batch=1)[0].hits
    ref_exact = ordered_dict_lru(test[:n_exact].tolist(), cap)
    # the many-capacity path (stack distances, taken for more than two capacities) against it too
    curve_exact = simulate(test[:n_exact], [max(1, cap // 4), cap, 4 * cap], ["lru"], n_rows=n_rows, min_batch=1)
    curve_diff = max(abs(r.hits - ordered_dict_lru(test[:n_exact].tolist(), r.capacity_rows)) for r in curve_exact)
    print(f"baseline OrderedDict LRU: {base_rate / 1e6:.2f}M lookups/s (one lookup at a time; hit "
          f"ratio {base_hits / n_base:.3f} on the first {n_base:,}, the rows below replay all)")
    print(f"exactness: our LRU one lookup at a time {ours_exact} hits, OrderedDict {ref_exact} "
          f"(difference {ours_exact - ref_exact}); stack-distance LRU at 3 capacities: largest difference {curve_diff}")

    res = {"source": source, "lookups": int(test.size), "capacity_rows": cap,
           "baseline_lru_lookups_s": base_rate, "lru_exact_diff": int(ours_exact - ref_exact),
           "lru_curve_exact_diff": int(curve_diff),
           "policies": {}}
    print(f"{'policy':10s} {'hit ratio':>9s} {'lookups/s':>11s} {'x baseline':>10s}")
    for name in SPEED_POLICIES:
        r = simulate(test, [cap], [name], n_rows=n_rows, offsets=offsets, min_batch=args.batch,
                     profile=profile)[0]
        rate = test.size / r.seconds
        res["policies"][name] = {"hit_ratio": r.hit_ratio, "lookups_s": rate,
                                 "vs_baseline": rate / base_rate, "seconds": r.seconds}
        print(f"{name:10s} {r.hit_ratio:9.4f} {rate / 1e6:10.2f}M {rate / base_rate:10.1f}")
    # LRU through the walk itself (simulate answers LRU from stack distances)
    t0 = time.perf_counter()
    idx = CacheIndex(n_rows, cap, "lru")
    replay(idx, test, batch_bounds(test.size, offsets, args.batch))
    walk_s = time.perf_counter() - t0
    res["lru_walk"] = {"hit_ratio": idx.hit_ratio, "lookups_s": test.size / walk_s, "seconds": walk_s}
    print(f"{'lru walk':10s} {idx.hit_ratio:9.4f} {test.size / walk_s / 1e6:10.2f}M {test.size / walk_s / base_rate:10.1f}")
    # exact per-access LRU (stack distances): one capacity, and 50 capacities from one pass
    caps50 = np.unique(np.geomspace(max(1, cap // 100), min(n_rows, 100 * cap), 50).astype(int)).tolist()
    t0 = time.perf_counter()
    one = simulate(test, [cap], ["lru"], n_rows=n_rows, min_batch=1)[0]
    one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    many = simulate(test, caps50, ["lru"], n_rows=n_rows, min_batch=1)
    many_s = time.perf_counter() - t0
    res["lru_exact"] = {"hit_ratio": one.hit_ratio, "seconds": one_s, "lookups_s": test.size / one_s,
                        "capacities": len(caps50), "seconds_all_capacities": many_s,
                        "x_single": many_s / one_s,
                        "curve": [[r.capacity_rows, round(r.hit_ratio, 5)] for r in many]}
    print(f"{'lru exact':10s} {one.hit_ratio:9.4f} {test.size / one_s / 1e6:10.2f}M (one access at a time: one capacity "
          f"through the walk; {len(caps50)} capacities from one stack-distance pass in {many_s:.2f} s = "
          f"{many_s / one_s:.2f}x one)")
    t0 = time.perf_counter()
    opt = belady_hits(test, cap, warm=True)
    opt_s = time.perf_counter() - t0
    res["opt"] = {"hit_ratio": opt / test.size, "seconds": opt_s, "lookups_s": test.size / opt_s}
    print(f"{'opt':10s} {opt / test.size:9.4f} {test.size / opt_s / 1e6:10.2f}M "
          f"(exact MIN, {opt_s:.1f} s for {test.size:,} lookups)")
    others = [p for p in res["policies"] if p != "lru"]
    slowest = min(res["policies"][p]["lookups_s"] for p in others)
    res["min_other_lookups_s"] = slowest
    lru_best = max(res["policies"]["lru"]["lookups_s"], res["lru_walk"]["lookups_s"])
    print(f"targets: lru >= 20M lookups/s: {lru_best / 1e6:.2f}M; every other policy >= 5M: slowest "
          f"{min(others, key=lambda p: res['policies'][p]['lookups_s'])} {slowest / 1e6:.2f}M; 50 LRU "
          f"capacities <= 2 single replays: {many_s / one_s:.2f}; opt over {test.size:,}: {opt_s:.1f} s")
    json_line(res)
    return res


if __name__ == "__main__":
    main()
