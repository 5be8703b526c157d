"""`tierstore profile` and `tierstore size`: hit ratios of cache policies on a real trace.

    tierstore profile --trace test.trace.zst --profile-trace train.trace.zst \\
        --capacity 0.001,0.01,0.1 --policy lru,lfu,static,default,opt --plot hit.png
    tierstore profile --trace train.trace.zst --store STORE --save-profile
    tierstore profile --trace test.trace.zst --store STORE --capacity 0.01 --live
    tierstore size --trace test.trace.zst --store STORE --device-hit 0.9 --total-hit 0.99
    tierstore size --trace v41.trace.zst --profile-trace v41-train.trace.zst --device-budget 2GiB --host-budget 32GiB

``--capacity``: comma-separated; a whole number is rows, a value below 1 a fraction of the
table's rows (known from ``--store`` or from a trace written by ``tierstore trace``; a
plain .npy trace uses its distinct ids), and a size with a unit ("64MiB") bytes of rows
(needs the row size: ``--store`` or ``--row-bytes``). ``static`` and ``default`` rank rows
by a profile taken from *other* text: ``--profile-trace`` or the store's saved profile.
``opt`` is Belady's exact optimum (with bypass; it may start full, as the store preloads).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import asdict

from tqdm import tqdm

from tierstore.analysis import plots
from tierstore.analysis.hit_ratios import (TracedTable, live_hit_ratios, policy_hit_ratios, traced_tables,
                                           two_tier_hit_ratios)
from tierstore.analysis.simulate import load_trace, simulate_tiers
from tierstore.analysis.sizing import TierCosts, size_tiers
from tierstore.cache import POLICIES
from tierstore.cache.index import budget_for, rows_within
from tierstore.errors import TierStoreError
from tierstore.format.profile import count_rows, save_profile
from tierstore.sizes import format_size, parse_size

__all__ = ["add_parser", "run_profile", "run_size", "parse_capacities"]

DEFAULT_POLICIES = "lru,lfu,static,default,opt"


def parse_capacities(spec: str, n_rows: int, row_bytes: int | None) -> list[int]:
    """'0.01,5000,64MiB' -> rows. Fractions are of ``n_rows``; sizes need ``row_bytes``."""
    if row_bytes is not None and row_bytes <= 0:
        raise TierStoreError(f"row_bytes={row_bytes} must be a positive number of bytes per row")
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            v = float(item)
        except ValueError:
            if row_bytes is None:
                raise TierStoreError(
                    f"capacity {item!r} is a size in bytes: give --store or --row-bytes to turn it into rows") from None
            rows = parse_size(item, what="capacity") // row_bytes
            if rows >= 2**63:
                raise TierStoreError(f"capacity {item!r} is {rows} rows, past any table (2**63)") from None
            out.append(rows)
            continue
        if not math.isfinite(v) or v >= 2**63:  # larger than the table is fine (it all fits), past int64 is not
            raise TierStoreError(f"capacity {item!r} is not a number of rows; e.g. --capacity 0.01,5000,64MiB")
        if v < 0:
            raise TierStoreError(f"capacity {item!r} is negative")
        if v < 1:
            out.append(max(1, int(round(v * n_rows))))
        elif v != int(v):
            raise TierStoreError(f"capacity {item!r}: use a whole number of rows or a fraction below 1")
        else:
            out.append(int(v))
    if not out:
        raise TierStoreError("--capacity is empty; e.g. --capacity 0.001,0.01,0.1")
    return out


def _policies(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n != "opt" and n not in POLICIES:
            raise TierStoreError(f"unknown policy {n!r}; choose from {', '.join([*POLICIES, 'opt'])}")
    return names


def _tables(args: argparse.Namespace, defer_profile: bool = False) -> list[TracedTable]:
    # --table: only that table's arrays (a V4.1 trace holds both layers)
    trace = load_trace(args.trace, only=args.table)
    profile_trace = load_trace(args.profile_trace, only=args.table) if getattr(args, "profile_trace", None) else None
    return traced_tables(trace, table=args.table, store=args.store, profile_trace=profile_trace,
                         row_bytes=args.row_bytes, defer_profile=defer_profile)


def _progress(args: argparse.Namespace, desc: str, total: int | None = None) -> tqdm:
    return tqdm(total=total, desc=desc, unit="run" if total else "sim", file=sys.stderr,
                disable=args.json or not sys.stderr.isatty())


# ----------------------------------------------------------------------------------------
# profile
# ----------------------------------------------------------------------------------------
def run_profile(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if args.plot or args.rank_plot:  # before the simulations, not after them
        plots.check_available()
        for path in (args.plot, args.rank_plot):
            if path:
                plots.check_writable(path)
    tables = _tables(args, defer_profile=True)  # ranked while the replays that need no ranking run
    if args.save_profile:
        if not args.store:
            raise TierStoreError("--save-profile records into a store: give --store STORE")
        for t in tables:
            seen, counts = count_rows(t.trace.rows, t.sim_rows, sparse=True)  # rows read, not every row
            # under the store's name of the table: a .npy trace's "trace" would never be loaded
            path = save_profile(args.store, t.store_table, (seen, counts), n_rows=t.sim_rows,
                                meta={"source": str(args.trace), "lookups": int(t.trace.rows.size)})
            print(f"saved profile of {t.store_table}: {int(counts.sum()):,} accesses, "
                  f"{seen.size:,} rows seen -> {path}", file=sys.stderr)
        from tierstore.serve.snapshot import save_snapshot  # imports torch: only here

        for name, head in save_snapshot(args.store, [t.store_table for t in tables],
                                        max_bytes=args.snapshot).items():  # 0: removes them
            print(f"saved hot-set snapshot of {name}: {head['n']:,} rows, {head['bytes']:,} bytes "
                  f"-> {head['path']}", file=sys.stderr)
        if args.capacity is None and not args.plot and not args.rank_plot:
            return 0
    policies = _policies(args.policy)
    if args.live and not args.store:
        raise TierStoreError("--live replays through a real store: give --store STORE")
    results = []
    for t in tables:
        caps = parse_capacities(args.capacity or "0.001,0.01,0.1", t.n_rows, t.row_bytes)
        if not t.has_profile and ({"static", "default"} & set(policies)):
            print(f"note: no profile for {t.name} (--profile-trace or a store profile): static holds "
                  "nothing and default has no static core", file=sys.stderr)
        with _progress(args, f"simulating {t.name}", len(caps) * len(policies)) as bar:
            results += policy_hit_ratios(t, caps, policies, min_batch=args.batch, lookahead=args.lookahead,
                                         progress=bar.update)
        if args.live:
            results += live_hit_ratios(functools.partial(_open_store, args.store), t, caps,
                                       [p for p in policies if p != "opt"], min_batch=args.batch)
    tiers = []
    if args.tiers:
        parts = args.tiers.split(",")
        if len(parts) != 2:
            raise TierStoreError("--tiers takes DEVICE,HOST capacities, e.g. --tiers 0.01,0.1")
        for t in tables:
            dev_rows, host_rows = (parse_capacities(x, t.n_rows, t.row_bytes)[0] for x in parts)
            tiers.append(two_tier_hit_ratios(t, dev_rows, host_rows, policies, min_batch=args.batch,
                                             lookahead=args.lookahead))
    if args.plot:
        print(f"wrote {plots.plot_hit_ratios(results, args.plot)}", file=sys.stderr)
    if args.rank_plot:
        print(f"wrote {plots.plot_rank_frequency({t.name: t.trace.rows for t in tables}, args.rank_plot)}",
              file=sys.stderr)
    out = {"results": results}
    if tiers:
        out["tiers"] = tiers
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(results, tiers)
        print(f"({time.perf_counter() - t_start:.1f} s)", file=sys.stderr)
    return 0


def _open_store(path: str, device_budget: int, policy: str):
    """A store with a device tier of ``device_budget`` bytes and no host tier, for --live."""
    import tierstore

    return tierstore.open(path, device="cpu", device_budget=device_budget, host_budget=0, policy=policy)


def _print_table(results: list[dict], tiers: list[dict]) -> None:
    tables = sorted({r["table"] for r in results})
    for t in tables:
        rs = [r for r in results if r["table"] == t and r.get("mode") != "live"]
        caps = sorted({r["capacity_rows"] for r in rs})
        pols = list(dict.fromkeys(r["policy"] for r in rs))
        print(f"{t}: hit ratio by capacity ({rs[0]['capacity_base'] if rs else ''})")
        head = f"{'rows':>10s} {'frac':>7s} " + " ".join(f"{p:>8s}" for p in pols)
        print(head)
        for cap in caps:
            by = {r["policy"]: r for r in rs if r["capacity_rows"] == cap}
            frac = next(iter(by.values()))["capacity_fraction"]
            print(f"{cap:10d} {frac:7.3%} " + " ".join(f"{by[p]['hit_ratio']:8.4f}" for p in pols))
        if rs and rs[0]["semantics"].startswith("approximate"):
            print(f"({rs[0]['semantics']}: the hit ratios differ from the exact replay; --batch 1 is exact)")
        live = [r for r in results if r["table"] == t and r.get("mode") == "live"]
        for r in live:
            print(f"live {r['policy']:>8s} @ {r['capacity_rows']} rows: store {r['hits']}/{r['misses']} "
                  f"hits/misses, simulation {r['sim_hits']}/{r['sim_misses']}: "
                  f"{'agree' if r['agree'] else 'DIFFER'}")
    for tr in tiers:
        print(f"{tr['table']}: device {tr['device_rows']} rows over host {tr['host_rows']} rows")
        for p, e in tr["policies"].items():
            extra = (f", disk {format_size(e['disk_bytes'])}, host->device {format_size(e['host_to_device_bytes'])}"
                     if "disk_bytes" in e else "")
            print(f"  {p:>8s}: device {e['device_hit_ratio']:.4f}, host (of device misses) "
                  f"{e['host_hit_ratio_of_device_misses']:.4f}, total {e['total_hit_ratio']:.4f}{extra}")


# ----------------------------------------------------------------------------------------
# size
# ----------------------------------------------------------------------------------------
def run_size(args: argparse.Namespace) -> int:
    tables = _tables(args)
    costs = TierCosts.parse(args.tier_costs) if args.tier_costs else TierCosts()
    if args.device_budget is not None or args.host_budget is not None:
        return _run_budgets(args, tables, costs)
    out = []
    with _progress(args, "sizing (simulations)") as bar:
        for t in tables:
            out.append(size_tiers(t.trace.rows, n_rows=t.sim_rows, policy=args.policy, device_hit=args.device_hit,
                                  total_hit=args.total_hit, offsets=t.trace.offsets, profile=t.profile,
                                  min_batch=args.batch, table=t.name, on_simulation=bar.update).to_dict())
            if t.row_bytes:  # the budgets that hold these rows: their bytes and the index's state
                out[-1]["device_bytes"] = _budget_of(out[-1]["device_rows"], t, args.policy)
                out[-1]["host_bytes"] = _budget_of(out[-1]["host_rows"], t, args.policy)
            e = out[-1]
            _add_cost(e, costs, e["device_hit_ratio"], max(0.0, e["total_hit_ratio"] - e["device_hit_ratio"]))
    if args.json:
        print(json.dumps({"sizes": out}))
    else:
        for e in out:
            db = f" = {format_size(e['device_bytes'])}" if "device_bytes" in e else ""
            hb = f" = {format_size(e['host_bytes'])}" if e.get("host_bytes") else ""
            print(f"{e['table']} ({e['policy']}): device {e['device_rows']:,} rows{db} for hit "
                  f"{e['device_hit_ratio']:.4f}; host {e['host_rows']:,} rows{hb} for total "
                  f"{e['total_hit_ratio']:.4f}; {_cost_text(e)}")
    return 0


def _budget_of(rows: int, t: TracedTable, policy: str) -> int:
    """The budget a store needs for ``rows`` of this table (the inverse of ``rows_within``)."""
    if rows >= t.n_rows:
        return t.n_rows * t.row_bytes
    return budget_for(rows, t.row_bytes, policy)


def _add_cost(e: dict, costs: TierCosts, device_hit: float, host_hit: float) -> None:
    """The expected lookup time of these hit ratios (``TierCosts``' linear model), in place."""
    e["lookup_us"] = costs.lookup_us(device_hit=device_hit, host_hit=host_hit)
    e["slowdown_vs_resident"] = costs.slowdown(device_hit=device_hit, host_hit=host_hit)
    e["tier_costs_us"] = asdict(costs)


def _cost_text(e: dict) -> str:
    return (f"expected {e['lookup_us']:.2f} us per lookup = {e['slowdown_vs_resident']:.1f}x all rows resident "
            f"({e['tier_costs_us']['resident_us']} us)")


def _run_budgets(args: argparse.Namespace, tables: list[TracedTable], costs: TierCosts) -> int:
    """The other question: what given budgets buy. One replay per table through both tiers."""
    out = []
    for t in tables:
        if not t.row_bytes:
            raise TierStoreError(f"budgets are bytes and the row size of {t.name} is unknown: give --store, "
                                 "--row-bytes, or a trace written by `tierstore trace` of a model")
        dev = rows_within(parse_size(args.device_budget or "0", what="--device-budget"), t.n_rows, t.row_bytes,
                          args.policy)
        host = rows_within(parse_size(args.host_budget or "0", what="--host-budget"), t.n_rows, t.row_bytes,
                           args.policy)
        r = simulate_tiers(t.trace.rows, dev, host, args.policy, n_rows=t.sim_rows, offsets=t.trace.offsets,
                           profile=t.profile, min_batch=args.batch)
        n = max(1, t.trace.rows.size)
        disk = r["host"]["misses"] if 0 < host < t.sim_rows else (0 if host >= t.sim_rows else r["device"]["misses"])
        out.append({"table": t.name, "policy": args.policy, "device_rows": int(min(dev, t.n_rows)),
                    "host_rows": int(min(host, t.n_rows)), "device_hit_ratio": r["device"]["hit_ratio"],
                    "total_hit_ratio": 1 - disk / n, "disk_rows": int(disk),
                    "disk_bytes": int(disk) * t.row_bytes, "lookups": int(t.trace.rows.size)})
        dev_hits = r["device"]["hit_ratio"]
        _add_cost(out[-1], costs, dev_hits, max(0.0, 1 - disk / n - dev_hits))
    if args.json:
        print(json.dumps({"budgets": out}))
    else:
        for e in out:
            print(f"{e['table']} ({e['policy']}): device {e['device_rows']:,} rows: hit {e['device_hit_ratio']:.4f}; "
                  f"+ host {e['host_rows']:,} rows: total {e['total_hit_ratio']:.4f}; "
                  f"{e['disk_rows']:,} of {e['lookups']:,} lookups read from disk ({format_size(e['disk_bytes'])}); "
                  f"{_cost_text(e)}")
    return 0


# ----------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="trace file (tierstore trace) or .npy int64 row ids")
    p.add_argument("--store", default=None, help="store: table sizes, row bytes, its saved profile")
    p.add_argument("--table", default=None, help="only this table of the trace")
    p.add_argument("--profile-trace", default=None,
                   help="trace of OTHER text whose counts rank rows for static/default")
    p.add_argument("--row-bytes", type=_positive_int, default=None, help="bytes per row (without --store)")
    p.add_argument("--batch", type=int, default=1,
                   help="merge trace steps into batches of at least this many lookups: faster, approximate "
                        "(the output says so); 1, the default, replays exactly")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="hit ratios of cache policies on a trace (+ plots)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--capacity", default=None,
                   help="comma-separated rows, fractions (<1) or sizes ('64MiB'); default 0.001,0.01,0.1")
    p.add_argument("--policy", default=DEFAULT_POLICIES,
                   help=f"comma-separated: {', '.join(POLICIES)}, opt (default {DEFAULT_POLICIES})")
    p.add_argument("--lookahead", type=int, default=0,
                   help="hint the ids of batch i+L before batch i (prefetches issued L steps ahead)")
    p.add_argument("--tiers", default=None, help="DEVICE,HOST capacities: two-tier hit ratios and bytes")
    p.add_argument("--plot", default=None, help="PNG: hit ratio vs capacity, one curve per policy")
    p.add_argument("--rank-plot", default=None, help="PNG: log-log rank-frequency with fitted Zipf exponent")
    p.add_argument("--save-profile", action="store_true",
                   help="record this trace's row counts as the store's profile (use a training slice)")
    p.add_argument("--snapshot", default="16GiB", metavar="SIZE",
                   help="with --save-profile: also write each table's hot-set snapshot, its hottest profiled "
                        "rows up to SIZE of rows, which open loads sequentially (default 16GiB; 0: none)")
    p.add_argument("--live", action="store_true",
                   help="also replay through the real store (device tier = each capacity) and compare")
    p.set_defaults(func=run_profile)

    s = subparsers.add_parser("size", help="smallest device and host budgets for target hit ratios",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(s)
    s.add_argument("--policy", default="default", help="policy of both tiers")
    s.add_argument("--device-hit", type=float, default=0.9, help="target hit ratio of the device tier")
    s.add_argument("--total-hit", type=float, default=0.99, help="target hit ratio of device + host")
    s.add_argument("--device-budget", default=None, metavar="SIZE",
                   help="instead of targets: the hit ratios these budgets buy (e.g. 2GiB; with --host-budget)")
    s.add_argument("--host-budget", default=None, metavar="SIZE", help="host budget for --device-budget (e.g. 32GiB)")
    s.add_argument("--tier-costs", default=None, metavar="D,H,DISK,RES",
                   help="microseconds per row served from device, host, disk and a resident table, for the "
                        "expected slowdown (default: this repository's measured CPU figures, "
                        "tierstore.analysis.sizing.TierCosts)")
    s.set_defaults(func=run_size)
