"""Per-call cost of a synchronous lookup whose ids all hit a budgeted device tier, against
the same lookup on a resident table (no cache bookkeeping at all), same process.

This is the cost a decode step pays: an Engram step looks up a few dozen ids, and the
cache layer's bookkeeping (the compiled walk: slots, leases, the policy per access) is
paid per call. Cases: ids per lookup in ``--sizes``, every policy in ``--policies``; the
device tier holds a tenth of the table and is warmed so every id hits. Systems are
interleaved round by round; the fastest ~1 ms burst of calls is reported (CPU-bound, warm;
on a shared machine a long run is always preempted somewhere).

Also, same run: ``index_select(out=)`` of the same rows straight from the tier's slab
(the floor: the copy without any bookkeeping), the per-call breakdown of one lookup
(validation, the walk, the copy, the end of the lookup), and the hand-off of
``prefetch().result()`` against a bare ``ThreadPoolExecutor`` submit + result, with a
compute loop's rate while prefetches run on the worker vs alone.

Targets: 64 and 1,024 ids <= 2x resident for every policy (issue 19); 16,384 ids >= 0.8x of the slab's
``index_select``; bookkeeping <= 30% of a lookup at 64..64K ids; hand-off <= 1.5x bare.

    python -m benchmarks.bench_lookup [--quick] [--rows 1048576] [--dim 64]
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
from tierstore.cache.registry import POLICIES
from tierstore.cache.index import budget_for
from tierstore.format.profile import hot_rows
from tierstore.format.profile import save_profile

from .common import json_line, machine_info, print_header
from .workloads import table_store

NAME = "bench.engram.memory.weight"


def _per_call_us(fn, calls: int, rounds: int) -> float:
    """Microseconds per call: ``rounds`` runs of ``calls`` calls (after one), each timed in
    bursts of ~1 ms; the fastest burst. On a loaded machine a run of many calls is always
    preempted somewhere, so its total measures the machine; a burst that ran uninterrupted
    measures the call."""
    fn()
    t0 = time.perf_counter()
    fn()
    burst = max(1, min(calls, int(1e-3 / max(time.perf_counter() - t0, 1e-7))))

    def run() -> float:
        best = float("inf")
        for _ in range(max(1, calls // burst)):
            t = time.perf_counter()
            for _ in range(burst):
                fn()
            best = min(best, (time.perf_counter() - t) / burst)
        return best

    return min(run() for _ in range(rounds)) * 1e6


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for the test)")
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--dim", type=int, default=64, help="float16 values per row")
    ap.add_argument("--sizes", default="64,1024,16384,65536", help="ids per lookup")
    ap.add_argument("--policies", default=",".join(policy_names()))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hints", action="store_true",
                    help="also time each hint-using policy with live hints: hint(ids) then lookup(ids) per call "
                         "(POLICY+hints), and hint(ids) alone (POLICY_hint_us)")
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
        path, _ = table_store(args.rows, args.dim, name=NAME, cache=Path(tmp))
        counts = np.bincount(rng.zipf(1.1, 20 * args.rows) % args.rows, minlength=args.rows)
        save_profile(path, NAME, counts)  # static and default place by it
        resident = tierstore.open(path, device="cpu", device_budget=args.rows * row_bytes)
        # a device tier of 10% of the rows for every policy: its budget pays for the rows and
        # the policy's bookkeeping (budget_for), as a store counts it
        cached = {p: tierstore.open(path, device="cpu", device_budget=budget_for(args.rows // 10, row_bytes, p),
                                    policy=p) for p in policies}
        hinted = [p for p in policies if args.hints and POLICIES[p].uses_hints]
        for p in hinted:  # a store of its own: hints change what a store keeps
            cached[f"{p}+hints"] = tierstore.open(path, device="cpu", policy=p,
                                                  device_budget=budget_for(args.rows // 10, row_bytes, p))
        labels = list(cached)
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
                def call(p, s):
                    if p.endswith("+hints"):  # the step announced (live hints), then looked up
                        return lambda: (s.hint(NAME, ids), s.lookup(NAME, ids, out=out))
                    return lambda: s.lookup(NAME, ids, out=out)

                for _ in range(args.rounds):  # interleave: noise hits every system alike
                    r = _per_call_us(lambda: resident.lookup(NAME, ids, out=out), calls, 1)
                    row["resident_us"] = min(row["resident_us"] or r, r)
                    for p, s in cached.items():
                        c = _per_call_us(call(p, s), calls, 1)
                        row[f"{p}_us"] = min(row.get(f"{p}_us", c), c)
                    for p in hinted:
                        s = cached[f"{p}+hints"]
                        c = _per_call_us(lambda s=s: s.hint(NAME, ids), calls, 1)
                        row[f"{p}_hint_us"] = min(row.get(f"{p}_hint_us", c), c)
                for p, s in cached.items():  # what was timed: lookups that hit on every id
                    row[f"{p}_hit_ratio"] = round(s.stats()["device"]["hit_ratio"], 4)
                # the floor: the same rows copied straight out of the tier's slab
                for p in hinted:
                    row[f"{p}_hint_us"] = round(row[f"{p}_hint_us"], 1)
                tier = cached[policies[-1]]._tables[NAME].dev
                slots = torch.from_numpy(tier.index.slots_of(ids).astype(np.int64))
                row["slab_index_select_us"] = _per_call_us(
                    lambda: torch.index_select(tier.slab, 0, slots, out=out.view(tier.slab.dtype)), calls, args.rounds)
                for p, s in cached.items():
                    hr = s.stats()["device"]["hit_ratio"]
                    assert hr == 1.0, f"{p}: hit ratio {hr}, the benchmark needs all hits"
                    row[f"{p}_x_resident"] = round(row[f"{p}_us"] / row["resident_us"], 2)
                    row[f"{p}_x_index_select"] = round(row["slab_index_select_us"] / row[f"{p}_us"], 2)
                    row[f"{p}_bookkeeping"] = round(max(0.0, 1 - row["slab_index_select_us"] / row[f"{p}_us"]), 2)
                    row[f"{p}_us"] = round(row[f"{p}_us"], 1)
                row["resident_us"] = round(row["resident_us"], 1)
                row["slab_index_select_us"] = round(row["slab_index_select_us"], 1)
                results.append(row)
                print(f"{n:>6} ids  resident {row['resident_us']:8.1f} us  slab index_select "
                      f"{row['slab_index_select_us']:8.1f} us")
                for p in labels:
                    print(f"   {p:>15s} {row[f'{p}_us']:8.1f} us  {row[f'{p}_x_resident']:5.2f}x resident  "
                          f"{row[f'{p}_x_index_select']:5.2f}x index_select  bookkeeping "
                          f"{row[f'{p}_bookkeeping']:.0%}")
            breakdown = _breakdown(cached[policies[-1]], rng, counts, args)
            handoff = _handoff(cached[policies[-1]], counts, args)
        finally:
            resident.close()
            for s in cached.values():
                s.close()
    res = {"benchmark": "lookup", "rows": args.rows, "row_bytes": row_bytes, "results": results,
           "breakdown_64": breakdown, "handoff": handoff, "machine": info.get("cpu", "")}
    json_line(res)
    return res


def _breakdown(store, rng, counts, args) -> dict:
    """One 64-id all-hit lookup taken apart: each step timed alone, as Table.gather runs it."""
    from tierstore.cache.lookup import Lookup
    from tierstore.ids import as_row_ids

    t = store._tables[NAME]
    ids = rng.permutation(hot_rows(counts, 64))
    out = torch.empty(64, args.dim, dtype=torch.float16)
    store.lookup(NAME, ids, out=out)
    calls = 20000
    n = 64
    w = t._walker  # single-threaded here: no tier locks needed around it
    lk = w.begin(ids)
    d_slot = lk.d_slot
    w.end(lk)
    parts = {
        "total_us": _per_call_us(lambda: store.lookup(NAME, ids, out=out), calls, args.rounds),
        "validate_and_prepare_us": _per_call_us(lambda: store._prepare(NAME, ids, out, copy=False), calls, args.rounds),
        "as_row_ids_us": _per_call_us(lambda: as_row_ids(ids, t.info.rows, where="t", copy=False), calls, args.rounds),
        "walk_begin_and_end_us": _per_call_us(lambda: w.end(w.begin(ids)), calls, args.rounds),
        # the one compiled call an all-hit lookup is on the CPU: accesses, copy, end (Table.begin)
        "all_hit_call_us": _per_call_us(lambda: w.begin(ids, t._dev_bytes, out.view(torch.uint8).numpy()),
                                        calls, args.rounds),
        "index_select_us": _per_call_us(
            lambda: torch.index_select(t.dev.slab, 0, torch.from_numpy(d_slot), out=out.view(t.dev.slab.dtype)),
            calls, args.rounds),
        "of_which_lookup_arrays_us": _per_call_us(lambda: Lookup(n), calls, args.rounds),
    }
    parts = {k: round(v, 2) for k, v in parts.items()}
    print("breakdown of one 64-id all-hit lookup (each step alone): " + ", ".join(f"{k} {v}" for k, v in parts.items()))
    return parts


def _handoff(store, counts, args) -> dict:
    """Hand-off costs against a bare ThreadPoolExecutor submit + result, same run:
    prefetch(64 ids).result() with every row on the device (finished in the caller's thread),
    and prefetch of 2,048 ids (more than INLINE_BELOW: always a worker) against the
    synchronous lookup of the same ids. Then a compute loop's rate alone, while another
    thread keeps 2,048-id prefetches going, and while it keeps bare no-op hand-offs going."""
    import concurrent.futures as cf
    import threading

    ids = hot_rows(counts, 64)
    out = torch.empty(64, args.dim, dtype=torch.float16)
    big = np.resize(hot_rows(counts, 2048), 2048)
    out_big = torch.empty(len(big), args.dim, dtype=torch.float16)
    store.lookup(NAME, big, out=out_big)
    pool = cf.ThreadPoolExecutor(1)
    calls = 5000
    res = {}
    for _ in range(args.rounds):  # interleaved rounds, the fastest of each
        for k, fn, c in (("bare_submit_result_us", lambda: pool.submit(int).result(), calls),
                         ("prefetch_64_on_device_us", lambda: store.prefetch(NAME, ids, out=out).result(), calls),
                         ("prefetch_2048_us", lambda: store.prefetch(NAME, big, out=out_big).result(), calls // 5),
                         ("lookup_2048_us", lambda: store.lookup(NAME, big, out=out_big), calls // 5)):
            v = _per_call_us(fn, c, 1)
            res[k] = min(res.get(k, v), v)
    a = torch.randn(128, 128)

    def compute(seconds: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(50):
                a.mul_(1.0000001).add_(1e-9)  # model-thread work: short torch ops, the GIL in between
            n += 50
        return n / (time.perf_counter() - t0)

    def alongside(work) -> float:
        stop = threading.Event()

        def feeder() -> None:
            while not stop.is_set():
                work()

        th = threading.Thread(target=feeder)
        th.start()
        try:
            return compute(1.0)
        finally:
            stop.set()
            th.join()

    alone = compute(1.0)
    with_prefetch = alongside(lambda: store.prefetch(NAME, big, out=torch.empty_like(out_big)).result())
    with_bare = alongside(lambda: pool.submit(int).result())
    pool.shutdown()
    res = {k: round(v, 1) for k, v in res.items()}
    res.update(x_bare_64=round(res["prefetch_64_on_device_us"] / res["bare_submit_result_us"], 2),
               handoff_2048_us=round(res["prefetch_2048_us"] - res["lookup_2048_us"], 1),
               handoff_2048_x_bare=round((res["prefetch_2048_us"] - res["lookup_2048_us"]) / res["bare_submit_result_us"], 2),
               compute_kept_with_prefetches=round(with_prefetch / alone, 2),
               compute_kept_with_bare_handoffs=round(with_bare / alone, 2))
    print(f"hand-off: prefetch(64 ids on the device).result() {res['prefetch_64_on_device_us']} us = "
          f"{res['x_bare_64']}x a bare submit+result ({res['bare_submit_result_us']} us); 2,048 ids through a worker "
          f"{res['prefetch_2048_us']} us vs {res['lookup_2048_us']} us synchronous: hand-off {res['handoff_2048_us']} us "
          f"= {res['handoff_2048_x_bare']}x bare")
    print(f"a compute loop keeps {res['compute_kept_with_prefetches']:.0%} of its rate while another thread prefetches "
          f"2,048 ids non-stop, {res['compute_kept_with_bare_handoffs']:.0%} while it does bare no-op hand-offs")
    return res


if __name__ == "__main__":
    main()
