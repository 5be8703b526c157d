"""`tierstore profile` and `tierstore size`: hit ratios of cache policies on a real trace.

    tierstore profile --trace test.trace.zst --profile-trace train.trace.zst \\
        --capacity 0.001,0.01,0.1 --policy lru,lfu,static,default,opt --plot hit.png
    tierstore profile --trace train.trace.zst --store STORE --save-profile
    tierstore profile --trace test.trace.zst --store STORE --capacity 0.01 --live
    tierstore size --trace test.trace.zst --store STORE --device-hit 0.9 --total-hit 0.99

``--capacity``: comma-separated; a whole number is rows, a value below 1 a fraction of the
table's rows (known from ``--store`` or from a trace written by ``tierstore trace``; a
plain .npy trace uses its distinct ids), and a size with a unit ("64MiB") bytes of rows
(needs the row size: ``--store`` or ``--row-bytes``). ``static`` and ``default`` rank rows
by a profile taken from *other* text: ``--profile-trace`` or the store's saved profile.
``opt`` is Belady's exact optimum (with bypass; it may start full, as the store preloads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from tierstore.errors import TierStoreError
from tierstore.cache import POLICIES
from tierstore.format.profile import count_rows, load_profile, save_profile, zipf_fit
from tierstore.analysis.simulate import TableTrace, batch_bounds, load_trace, simulate, simulate_tiers
from tierstore.sizes import format_size, parse_size

__all__ = ["add_parser", "run_profile", "run_size", "parse_capacities"]

DEFAULT_POLICIES = "lru,lfu,static,default,opt"


@dataclass
class TableContext:
    """What a command knows about one traced table."""

    name: str
    trace: TableTrace
    n_rows: int  # table rows (or distinct ids when unknown)
    base: str  # what a fractional capacity is a fraction of
    row_bytes: int | None
    profile: np.ndarray | None
    store_table: str | None = None  # the store's table this trace is of (a .npy trace is named "trace")


def parse_capacities(spec: str, n_rows: int, row_bytes: int | None) -> list[int]:
    """'0.01,5000,64MiB' -> rows. Fractions are of ``n_rows``; sizes need ``row_bytes``."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            v = float(item)
        except ValueError:
            if row_bytes is None:
                raise TierStoreError(
                    f"capacity {item!r} is a size in bytes: give --store or --row-bytes to turn it into rows") from None
            out.append(parse_size(item, what="capacity") // row_bytes)
            continue
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


def _contexts(args: argparse.Namespace) -> list[TableContext]:
    trace = load_trace(args.trace)
    names = list(trace.tables)
    if args.table:
        if args.table not in trace.tables:
            raise TierStoreError(f"trace has no table {args.table!r}; it has {names}")
        names = [args.table]
    store_info = {}
    if args.store:
        import tierstore

        with tierstore.open(args.store, device="cpu") as st:
            store_info = {n: (i.rows, i.row_bytes) for n, i in st.tables.items()}
    prof_trace = load_trace(args.profile_trace) if getattr(args, "profile_trace", None) else None
    out = []
    for name in names:
        t = trace.tables[name]
        row_bytes = args.row_bytes
        store_table = None
        if name in store_info:
            store_table = name
            n_rows, row_bytes = store_info[name][0], row_bytes or store_info[name][1]
            base = "table rows"
        elif args.store and len(store_info) == 1 and len(names) == 1:
            (store_table, (n_rows, rb)), = store_info.items()  # a .npy trace ("trace") of a one-table store
            row_bytes = row_bytes or rb
            base = "table rows"
        elif args.store:
            raise TierStoreError(f"store {args.store!r} has no table {name!r}; it has {list(store_info)}")
        elif t.n_rows:
            n_rows, base = int(t.n_rows), "table rows"
        else:
            n_rows, base = _distinct(t.rows), "distinct ids"
        if t.rows.size and t.rows.max() >= max(n_rows, 1) and base != "distinct ids":
            raise TierStoreError(f"trace of {name!r} holds row {int(t.rows.max())} but the table has {n_rows} rows")
        if base == "distinct ids":
            sim_rows = int(t.rows.max()) + 1 if t.rows.size else 0
        else:
            sim_rows = n_rows
        profile = None
        if prof_trace is not None:
            pt = prof_trace.tables.get(name) or (next(iter(prof_trace.tables.values()))
                                                   if len(prof_trace.tables) == 1 else None)
            if pt is None:
                raise TierStoreError(f"--profile-trace has no table {name!r}")
            pt_rows = pt.rows[pt.rows < sim_rows]
            profile = count_rows(pt_rows, sim_rows)
        elif args.store:
            profile = load_profile(args.store, store_table, n_rows=sim_rows)
        ctx = TableContext(name, t, n_rows, base, row_bytes, profile, store_table)
        ctx.sim_rows = sim_rows  # type: ignore[attr-defined]
        out.append(ctx)
    return out


# ----------------------------------------------------------------------------------------
# profile
# ----------------------------------------------------------------------------------------
def run_profile(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    ctxs = _contexts(args)
    if args.save_profile:
        if not args.store:
            raise TierStoreError("--save-profile records into a store: give --store STORE")
        for c in ctxs:
            counts = count_rows(c.trace.rows, c.sim_rows)  # type: ignore[attr-defined]
            # under the store's name of the table: a .npy trace's "trace" would never be loaded
            path = save_profile(args.store, c.store_table, counts, meta={"source": str(args.trace),
                                                                   "lookups": int(c.trace.rows.size)})
            print(f"saved profile of {c.store_table}: {int(counts.sum()):,} accesses, "
                  f"{int(np.count_nonzero(counts)):,} rows seen -> {path}", file=sys.stderr)
        if args.capacity is None and not args.plot and not args.rank_plot:
            return 0
    policies = _policies(args.policy)
    results = []
    for c in ctxs:
        caps = parse_capacities(args.capacity or "0.001,0.01,0.1", c.n_rows, c.row_bytes)
        if c.profile is None and ({"static", "default"} & set(policies)):
            print(f"note: no profile for {c.name} (--profile-trace or a store profile): static holds "
                  "nothing and default has no static core", file=sys.stderr)
        res = []
        kw = dict(n_rows=c.sim_rows, offsets=c.trace.offsets, profile=c.profile,  # type: ignore[attr-defined]
                  min_batch=args.batch, lookahead=args.lookahead, table=c.name)
        n = c.trace.rows.size
        merged = args.batch > 1 and not np.array_equal(batch_bounds(n, c.trace.offsets, args.batch),
                                                       batch_bounds(n, c.trace.offsets, 1))
        semantics = (f"approximate: trace steps merged into batches of >= {args.batch} lookups" if merged else
                     "exact: one access at a time" if c.trace.offsets is None else "exact: the recorded batches")
        with tqdm(total=len(caps) * len(policies), desc=f"simulating {c.name}", unit="run",
                  disable=args.json or not sys.stderr.isatty(), file=sys.stderr) as bar:
            lru_at_once = "lru" in policies
            if lru_at_once:  # every capacity at once: simulate takes them from one stack-distance pass
                res += simulate(c.trace.rows, caps, ["lru"], **kw)  # where that is exact, else replays
                bar.update(len(caps))
            for cap in caps:  # one run at a time, so the bar moves (opt over 10M takes ~10 s)
                for p in policies:
                    if p == "lru" and lru_at_once:
                        continue
                    res += simulate(c.trace.rows, [cap], [p], **kw)
                    bar.update()
        res.sort(key=lambda r: (r.capacity_rows, policies.index(r.policy)))
        opt = {r.capacity_rows: r.hit_ratio for r in res if r.policy == "opt"}
        for r in res:
            d = r.to_dict()
            d["capacity_fraction"] = r.capacity_rows / max(1, c.n_rows)
            d["capacity_base"] = c.base
            d["lookahead"] = args.lookahead
            d["semantics"] = semantics
            if c.row_bytes:
                d["capacity_bytes"] = r.capacity_rows * c.row_bytes
                d["bytes_moved"] = r.misses * c.row_bytes  # rows fetched from the tier below
            if r.capacity_rows in opt:
                d["gap_to_opt"] = opt[r.capacity_rows] - r.hit_ratio
            results.append(d)
        if args.live:
            results += _live(args, c, caps, [p for p in policies if p != "opt"])
    tiers = []
    if args.tiers:
        for c in ctxs:
            tiers.append(_tiers(args, c, policies))
    if args.plot:
        _plot_hits(results, args.plot)
    if args.rank_plot:
        _plot_rank(ctxs, args.rank_plot)
    out = {"results": results}
    if tiers:
        out["tiers"] = tiers
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(results, tiers)
        print(f"({time.perf_counter() - t_start:.1f} s)", file=sys.stderr)
    return 0


def _distinct(rows: np.ndarray) -> int:
    """Distinct ids of a trace: one counting pass when the ids are dense enough (a sort of a
    10M-id trace takes ~1 s), a sort otherwise."""
    if rows.size and 0 <= rows.min() and rows.max() < 8 * rows.size:
        return int(np.count_nonzero(np.bincount(rows)))
    return int(np.unique(rows).size)


def _live(args: argparse.Namespace, c: TableContext, caps: list[int], policies: list[str]) -> list[dict]:
    """Replay through a real opened store (device tier = each capacity, no host tier) and
    put its counters next to the simulation of the same flow."""
    import tierstore

    if not args.store:
        raise TierStoreError("--live replays through a real store: give --store STORE")
    out = []
    bounds = batch_bounds(c.trace.rows.size, c.trace.offsets, args.batch)
    rows = c.trace.rows
    for cap in caps:
        for p in policies:
            t0 = time.perf_counter()
            with tierstore.open(args.store, device="cpu", device_budget=cap * c.row_bytes,
                                host_budget=0, policy=p) as st:
                tname = c.name if c.name in st.tables else next(iter(st.tables))
                st.reset_stats()
                for a, b in zip(bounds[:-1], bounds[1:]):
                    st.lookup(tname, rows[a:b])
                dev = st.stats()["tables"][tname]["device"]
            live_s = time.perf_counter() - t0
            sim = simulate_tiers(rows, int(dev.get("capacity_rows", cap)), 0, p, n_rows=c.sim_rows,  # type: ignore[attr-defined]
                                 offsets=c.trace.offsets, profile=c.profile, min_batch=args.batch)["device"]
            out.append({"policy": p, "capacity_rows": int(dev.get("capacity_rows", cap)), "table": c.name,
                        "mode": "live", "hit_ratio": dev["hits"] / max(1, dev["hits"] + dev["misses"]),
                        "hits": int(dev["hits"]), "misses": int(dev["misses"]),
                        "sim_hits": int(sim["hits"]), "sim_misses": int(sim["misses"]),
                        "agree": int(dev["hits"]) == int(sim["hits"]) and int(dev["misses"]) == int(sim["misses"]),
                        "seconds": live_s})
    return out


def _tiers(args: argparse.Namespace, c: TableContext, policies: list[str]) -> dict:
    parts = args.tiers.split(",")
    if len(parts) != 2:
        raise TierStoreError("--tiers takes DEVICE,HOST capacities, e.g. --tiers 0.01,0.1")
    dev_rows, host_rows = (parse_capacities(x, c.n_rows, c.row_bytes)[0] for x in parts)
    out = {"table": c.name, "device_rows": dev_rows, "host_rows": host_rows, "policies": {}}
    n = c.trace.rows.size
    for p in (q for q in policies if q != "opt"):
        r = simulate_tiers(c.trace.rows, dev_rows, host_rows, p, n_rows=c.sim_rows,  # type: ignore[attr-defined]
                           offsets=c.trace.offsets, profile=c.profile, min_batch=args.batch,
                           lookahead=args.lookahead)
        disk_rows = r["host"]["misses"] if host_rows > 0 else r["device"]["misses"]
        entry = {"device_hit_ratio": r["device"]["hit_ratio"],
                 "host_hit_ratio_of_device_misses": r["host"]["hit_ratio"],
                 "total_hit_ratio": 1 - disk_rows / max(1, n), "disk_rows": int(disk_rows)}
        if c.row_bytes:
            entry["host_to_device_bytes"] = int(r["host"]["hits"]) * c.row_bytes
            entry["disk_bytes"] = int(disk_rows) * c.row_bytes
        out["policies"][p] = entry
    return out


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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_hits(results: list[dict], path: str) -> None:
    plt = _plt()
    rs = [r for r in results if r.get("mode") != "live"]
    tables = sorted({r["table"] for r in rs})
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.5), squeeze=False)
    for ax, t in zip(axes[0], tables):
        pols = list(dict.fromkeys(r["policy"] for r in rs if r["table"] == t))
        for p in [q for q in pols if q != "opt"] + (["opt"] if "opt" in pols else []):
            pts = sorted((r["capacity_fraction"] * 100, r["hit_ratio"]) for r in rs
                         if r["table"] == t and r["policy"] == p)
            x, y = zip(*pts)
            style = (dict(color="black", linestyle="--", linewidth=2, zorder=5) if p == "opt"
                     else dict(linewidth=2.8, zorder=4) if p == "default" else {})
            ax.plot(x, y, marker="o", label="opt (Belady)" if p == "opt" else p, **style)
        ax.set_xscale("log")
        ax.set_xlabel("cache capacity (% of table rows)")
        ax.set_ylabel("hit ratio")
        ax.set_title(t, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def _plot_rank(ctxs: list[TableContext], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for c in ctxs:
        counts = np.bincount(c.trace.rows)
        s, sorted_counts = zipf_fit(counts)
        r = np.arange(1, sorted_counts.size + 1)
        ax.loglog(r, sorted_counts, label=f"{c.name} (Zipf s = {s:.2f})")
        n = max(3, sorted_counts.size // 2)
        fit_c = np.exp(np.polyfit(np.log(r[:n]), np.log(sorted_counts[:n]), 1)[1])
        ax.loglog(r[:n], fit_c * r[:n] ** -s, "k--", linewidth=1)
    ax.set_xlabel("row rank")
    ax.set_ylabel("accesses")
    ax.set_title("rank-frequency of row accesses (dashed: fitted Zipf)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


# ----------------------------------------------------------------------------------------
# size
# ----------------------------------------------------------------------------------------
def _smallest(fn, lo: int, hi: int, target: float, rel: float = 0.02) -> int | None:
    """Smallest capacity in [lo, hi] with fn(cap) >= target (fn assumed non-decreasing),
    to within ``rel``: a geometric bracket then bisection."""
    if fn(hi) < target:
        return None
    c = max(lo, 1)
    while c < hi and fn(c) < target:
        lo, c = c, min(hi, c * 4)
    hi = c
    while hi - lo > max(1, int(rel * hi)):
        mid = (lo + hi) // 2
        if fn(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def run_size(args: argparse.Namespace) -> int:
    ctxs = _contexts(args)
    out = []
    bar = tqdm(desc="sizing (simulations)", unit="sim", file=sys.stderr,
               disable=args.json or not sys.stderr.isatty())
    for c in ctxs:
        rows, off, n = c.trace.rows, c.trace.offsets, c.sim_rows  # type: ignore[attr-defined]
        cache: dict[tuple[int, int], dict] = {}

        def tiers(d: int, h: int) -> dict:
            if (d, h) not in cache:
                cache[(d, h)] = simulate_tiers(rows, d, h, args.policy, n_rows=n, offsets=off,
                                               profile=c.profile, min_batch=args.batch)
                bar.update()
            return cache[(d, h)]

        def dev_hit(d: int) -> float:
            return tiers(d, 0)["device"]["hit_ratio"]

        d = _smallest(dev_hit, 1, n, args.device_hit)
        if d is None:
            raise TierStoreError(f"{c.name}: no device capacity reaches hit ratio {args.device_hit}")

        def total_hit(h: int) -> float:
            r = tiers(d, h)
            return 1 - r["host"]["misses"] / max(1, rows.size) if h < n else 1.0

        h = _smallest(total_hit, 1, n, args.total_hit)
        entry = {"table": c.name, "policy": args.policy, "device_rows": d,
                 "device_hit_ratio": dev_hit(d), "host_rows": h,
                 "total_hit_ratio": total_hit(h) if h is not None else None}
        if c.row_bytes:
            entry["device_bytes"] = d * c.row_bytes
            entry["host_bytes"] = h * c.row_bytes if h is not None else None
        out.append(entry)
    bar.close()
    if args.json:
        print(json.dumps({"sizes": out}))
    else:
        for e in out:
            db = f" = {format_size(e['device_bytes'])}" if "device_bytes" in e else ""
            hb = f" = {format_size(e['host_bytes'])}" if e.get("host_bytes") else ""
            print(f"{e['table']} ({e['policy']}): device {e['device_rows']:,} rows{db} for hit "
                  f"{e['device_hit_ratio']:.4f}; host {e['host_rows']:,} rows{hb} for total "
                  f"{e['total_hit_ratio']:.4f}")
    return 0


# ----------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="trace file (tierstore trace) or .npy int64 row ids")
    p.add_argument("--store", default=None, help="store: table sizes, row bytes, its saved profile")
    p.add_argument("--table", default=None, help="only this table of the trace")
    p.add_argument("--profile-trace", default=None,
                   help="trace of OTHER text whose counts rank rows for static/default")
    p.add_argument("--row-bytes", type=int, default=None, help="bytes per row (without --store)")
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
    p.add_argument("--live", action="store_true",
                   help="also replay through the real store (device tier = each capacity) and compare")
    p.set_defaults(func=run_profile)

    s = subparsers.add_parser("size", help="smallest device and host budgets for target hit ratios",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(s)
    s.add_argument("--policy", default="default", help="policy of both tiers")
    s.add_argument("--device-hit", type=float, default=0.9, help="target hit ratio of the device tier")
    s.add_argument("--total-hit", type=float, default=0.99, help="target hit ratio of device + host")
    s.set_defaults(func=run_size)
