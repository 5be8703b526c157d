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

``--phases``: where the time of a ``warm="background"`` open goes, per host budget
(``--budgets``; device budget = a quarter; the saved profile's scattered hot set = the host
budget's rows, with its snapshot) and policy (``--policies``): each phase's thread CPU
seconds and wall seconds (````open_phases````), the open's total, and the growth of
anonymous memory across it (``rss_anon``). Each open runs in a fresh process (a budget's
memory is measured alone), policies alternating round by round; medians over ``--rounds``,
then a linear fit of each phase's CPU seconds per slot across the budgets and its projection
to ``--project`` host slots (60M: a 16 GiB host budget of 264-byte rows).

    python -m benchmarks.bench_warm --phases [--size 3GiB] [--budgets 128MiB,512MiB,2GiB]
                                    [--policies default,static] [--rounds 3] [--baseline /tmp/main-checkout]

``--vs-dd``: the rate at which a ``warm="open"`` open loads the hot-set snapshot into the host
tier (its bytes / its seconds, ``stats()["open"]["host"]``), and the whole open's (bytes read /
open seconds), against ``dd if=SNAPSHOT of=/dev/null iflag=direct bs=16M`` in the same rounds
(alternating order; every open in a fresh process; page cache evicted before each open and
each dd). Medians and ratios to dd; with ``--baseline``, the other tree's opens in the same rounds.

    python -m benchmarks.bench_warm --vs-dd [--size 3GiB] [--hot 1GiB] [--rounds 5] [--baseline /tmp/main-checkout]

``--timeline`` (with ``--vs-dd``): each open's phases (the ranking, each tier's index build,
the slab prefaults, the early snapshot read, the device tier's copy, the preloads), with the
thread each ran on and its start and end from the open call (``benchmarks/open_timeline.py``).

``--baseline DIR``: the same opens with the code of the checkout DIR (``git worktree add DIR
main``), interleaved round by round with this tree's, and the ratios base/new.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import tierstore
from benchmarks.bench_open import ROW_BYTES, TABLE, ensure_store, save_scattered_profile
from benchmarks.common import evict, json_line, machine_info, print_header, rss_anon
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


# -- --phases: where a warm="background" open's time goes ---------------------------------------------

# (phase, module, attribute): each is wrapped while one open runs; a phase's time includes the
# phases it calls (the report subtracts the index's parts from "index" as "index: other")
PHASES = (
    ("ranking", "tierstore.serve.store", "Store._ranking"),  # snapshot header + ids prefix (or the profile)
    ("disk tier", "tierstore.serve.table", "DiskTier"),
    ("slab", "tierstore.tiers.cache", "_aligned_slab"),
    ("index", "tierstore.tiers.cache", "CacheIndex"),
    ("index: hot rows", "tierstore.cache.index", "as_profile"),
    ("index: hot rows", "tierstore.cache.default", "Default.prepare"),
    ("index: hot rows", "tierstore.cache.static", "Static.prepare"),
    ("index: ranking sort", "tierstore.cache.default", "Default.ranking"),
    ("index: rank map", "tierstore.cache.index", "ranked_map"),  # cache/mapbuild.py: threads
    ("index: row map", "tierstore.cache.index", "empty_map"),
    ("index: row map", "tierstore.cache.index", "build_map"),
    ("index: queues", "tierstore.cache.index", "q_init"),
    ("index: queues", "tierstore.cache.index", "g_init"),
    ("index: prefill", "tierstore.cache.walk", "prefill"),  # (only when a prefill row repeats a pinned one)
    ("index: prefill", "tierstore.cache.walk", "prefill_placed"),  # the hooks; rows mapped in "row map"
    ("index: heap", "tierstore.cache.default", "Default.after_prefill"),
    ("warmth", "tierstore.serve.table", "TierWarmth"),
    ("walker", "tierstore.serve.table", "Walker"),
)


@contextmanager
def _phase_timers(acc: dict[str, list[float]]):
    """Wrap every ``PHASES`` entry: ``acc[phase]`` += [thread CPU s, wall s] per call, on the
    thread that ran it (open builds the host tier's index on a second thread: its phases
    count there; ``open``'s CPU is this thread's alone, its wall is the whole; the threads
    inside the map builds and the loader thread are not counted)."""
    import importlib
    undo = []
    for phase, mod_name, attr in PHASES:
        mod = importlib.import_module(mod_name)
        owner, _, name = attr.rpartition(".")
        holder = getattr(mod, owner) if owner else mod
        orig = holder.__dict__[name] if owner else getattr(mod, name)

        def wrapped(*a, _f=orig, _p=phase, **k):
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                t = acc.setdefault(_p, [0.0, 0.0])
                t[0] += time.thread_time() - c0
                t[1] += time.perf_counter() - w0
        setattr(holder, name, wrapped)
        undo.append((holder, name, orig))
    try:
        yield
    finally:
        for holder, name, orig in reversed(undo):
            setattr(holder, name, orig)


def phase_one(store: Path, *, policy: str, host: int, device: int, profile: bool = False) -> dict[str, Any]:
    """One warm="background" open of ``store`` in this process, timed by phase."""
    info = tierstore.open(store, device="cpu").tables[TABLE]
    evict(store / info.file, store / info.checksum_file, snapshot_path(store, TABLE))
    acc: dict[str, list[float]] = {}
    prof = cProfile.Profile(time.thread_time) if profile else None
    a0 = rss_anon()
    with _phase_timers(acc):
        c0, w0, p0 = time.thread_time(), time.perf_counter(), time.process_time()
        if prof is not None:
            prof.enable()
        s = tierstore.open(store, device="cpu", device_budget=device, host_budget=host, policy=policy,
                           warm="background")
        if prof is not None:
            prof.disable()
        acc["open"] = [time.thread_time() - c0, time.perf_counter() - w0]
        # every thread's CPU (open builds on several; the loader has only just started)
        acc["open: all threads"] = [time.process_time() - p0, time.perf_counter() - w0]
    acc["rss_anon_growth"] = [float(rss_anon() - a0), 0.0]
    t = s._tables[TABLE]
    acc["slots"] = [float(t.host.capacity), float(t.dev.capacity)]
    s.close()
    out: dict[str, Any] = {"phases": acc}
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        out["cprofile"] = buf.getvalue()
    return out


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ys = a + b xs: (a, b)."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1) if len(xs) > 1 else (0.0, ys[0])
    return float(a), float(b)


def phases_main(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    budgets = [parse_size(b) for b in args.budgets.split(",")]
    policies = args.policies.split(",")
    # the trees whose code opens the store: this one, and with --baseline another checkout
    # (e.g. main's), run round by round in alternating order
    trees = {"new": Path(__file__).resolve().parent.parent}
    if args.baseline:
        trees["base"] = Path(args.baseline).resolve()
    print_header("warm='background' open: phases", machine_info(cache),
                 [f"table {args.size} of {ROW_BYTES}-byte rows; host budgets {args.budgets} (device 1/4), a "
                  f"scattered profile of the host budget's rows + its snapshot; policies {args.policies}; thread "
                  f"CPU s (wall s), medians of {args.rounds}; one open per process; trees {dict(trees)}"])
    store = ensure_store(cache, parse_size(args.size))
    for policy in policies:  # compile the kernels before any timing
        with tierstore.open(store, device="cpu", device_budget=4096 * ROW_BYTES, host_budget=4096 * ROW_BYTES,
                            policy=policy, use_profile=False) as s:
            s.lookup(TABLE, np.arange(8192))
    result: dict[str, Any] = {"size": args.size, "budgets": {}, "loadavg": [], "trees": {t: str(d) for t, d in
                                                                                          trees.items()}}
    runs_of = [(t, p) for p in policies for t in trees]

    def one(tree: str, policy: str, host: int, *, cprofile: bool = False) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "benchmarks.bench_warm", "--phase-one", str(store), "--policies", policy,
               "--budgets", str(host)] + (["--cprofile"] if cprofile else [])
        got = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=trees[tree])
        return json.loads(got.stdout.strip().splitlines()[-1])

    for host in budgets:
        save_scattered_profile(store, host // ROW_BYTES)
        tierstore.save_snapshot(store)
        per: dict[tuple[str, str], list[dict[str, Any]]] = {tp: [] for tp in runs_of}
        if host == budgets[0]:  # compile what an open with a profile runs (prefill, rank map), untimed
            for tree, policy in runs_of:
                one(tree, policy, host)
        for k in range(args.rounds):
            for tree, policy in (runs_of if k % 2 == 0 else runs_of[::-1]):
                result["loadavg"].append(os.getloadavg()[0])
                r = one(tree, policy, host, cprofile=args.cprofile and k == 0)
                if "cprofile" in r:
                    print(r.pop("cprofile"))
                per[(tree, policy)].append(r["phases"])
        result["budgets"][str(host)] = {}
        for tree, policy in runs_of:
            runs = per[(tree, policy)]
            names = sorted({n for r in runs for n in r}, key=lambda n: [p[0] for p in PHASES].index(n)
                           if n in [p[0] for p in PHASES] else 99)
            med = {n: [statistics.median(r.get(n, [0.0, 0.0])[i] for r in runs) for i in (0, 1)] for n in names}
            parts = sum(v[0] for n, v in med.items() if n.startswith("index: "))
            med["index: other"] = [med.get("index", [0.0, 0.0])[0] - parts, 0.0]
            result["budgets"][str(host)][f"{tree}/{policy}"] = med
            slots = med["slots"]
            every = med.get("open: all threads", [float("nan")])[0]
            print(f"host {format_size(host)} ({int(slots[0]):,} + {int(slots[1]):,} slots) {tree}/{policy}: open "
                  f"{med['open'][0]:.3f} CPU s ({every:.3f} all threads; {med['open'][1]:.3f} wall), RssAnon "
                  f"+{format_size(int(med['rss_anon_growth'][0]))}")
            for n, (c, w) in med.items():
                if n not in ("open", "slots", "rss_anon_growth", "open: all threads"):
                    print(f"    {n:<22} {c * 1e3:9.1f} ms CPU {w * 1e3:9.1f} ms wall")
        if "base" in trees:
            for policy in policies:
                b, n = (result["budgets"][str(host)][f"{t}/{policy}"]["open"] for t in ("base", "new"))
                print(f"host {format_size(host)} {policy}: open base/new {b[0] / n[0]:.2f}x CPU, {b[1] / n[1]:.2f}x wall")
    # per-slot fit (host + device slots) of each phase's CPU seconds, projected
    fits: dict[str, dict[str, Any]] = {}
    for tree, policy in runs_of:
        key = f"{tree}/{policy}"
        xs = [sum(result["budgets"][str(h)][key]["slots"]) for h in budgets]
        fits[key] = {}
        for n in result["budgets"][str(budgets[0])][key]:
            if n == "slots":
                continue
            a, b = _fit(xs, [result["budgets"][str(h)][key].get(n, [0.0])[0] for h in budgets])
            proj = a + b * args.project * 1.25  # host slots + device slots (a quarter)
            fits[key][n] = {"fixed": a, "per_slot": b, "projected": proj}  # seconds (bytes for RssAnon)
        print(f"{key}: fit per slot (host + device) and projection to {args.project:,} host slots:")
        for n, f in fits[key].items():
            if n == "rss_anon_growth":
                print(f"    {n:<22} {f['per_slot']:9.1f} B/slot + {format_size(int(f['fixed'])):>10}  -> "
                      f"{format_size(int(f['projected']))}")
            else:
                print(f"    {n:<22} {f['per_slot'] * 1e9:9.1f} ns/slot + {f['fixed']:8.3f} s  -> {f['projected']:8.3f} s")
    result["fits"] = fits
    print(f"loadavg median {statistics.median(result['loadavg']):.1f}")
    json_line(result)
    return result


# -- --vs-dd: open's snapshot load rate against a direct sequential read of the snapshot ----------------

def _timeline() -> Any:
    """``open_timeline.Timeline`` from this script's own folder: a baseline checkout (on
    ``PYTHONPATH``) may predate that module, and its opens are timed by this script too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("open_timeline", Path(__file__).with_name("open_timeline.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_one(store: Path, *, policy: str, host: int, device: int, timeline: bool = False) -> dict[str, Any]:
    """One warm="open" open of ``store`` in this process, the store's files evicted: its
    seconds, the host tier's snapshot load (rows, bytes, seconds), the device tier's fill;
    ``timeline``: each phase's thread, start and end (``open_timeline``)."""
    info = tierstore.open(store, device="cpu").tables[TABLE]
    evict(store / info.file, store / info.checksum_file, snapshot_path(store, TABLE))
    tl = _timeline().Timeline().record() if timeline else None
    vm0 = _vmstat()
    if tl is not None:
        tl.start()
    t0, c0 = time.perf_counter(), time.process_time()
    with tierstore.open(store, device="cpu", device_budget=device, host_budget=host, policy=policy,
                        warm="open") as s:
        r: dict[str, Any] = {"open_s": time.perf_counter() - t0, "open_cpu_s": time.process_time() - c0}
        s.lookup(TABLE, np.zeros(1, np.int64))  # the first row (a lookup's kernels are loaded on first use)
        r["first_row_s"] = time.perf_counter() - t0
        o = s.stats()["open"]
    vm1 = _vmstat()
    r["vmstat"] = {k: vm1[k] - vm0[k] for k in vm0}  # system-wide: other processes' too
    r.update(host_bytes=o["host"]["bytes_read"], host_s=o["host"]["seconds"], device_s=o["device"]["seconds"],
             host_source=o["host"]["source"], bytes_read=o["bytes_read"])
    if tl is not None:
        r["timeline"] = tl.phases()
    return r


def _vmstat() -> dict[str, int]:
    """The kernel's huge-page fault and compaction counters (/proc/vmstat; empty elsewhere)."""
    want = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "pgfault")
    try:
        lines = Path("/proc/vmstat").read_text().split("\n")
    except OSError:
        return {}
    return {k: int(v) for k, v in (ln.split() for ln in lines if ln) if k in want}


def dd_direct(path: Path) -> float:
    """Seconds for ``dd if=path of=/dev/null iflag=direct bs=16M``, its page cache evicted."""
    evict(path)
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "iflag=direct", "bs=16M"], check=True, capture_output=True)
    return time.perf_counter() - t0


def vs_dd_main(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    trees = {"new": Path(__file__).resolve().parent.parent}
    if args.baseline:
        trees["base"] = Path(args.baseline).resolve()
    size, hot_rows = parse_size(args.size), parse_size(args.hot) // ROW_BYTES
    host = hot_rows * ROW_BYTES
    print_header("warm='open': the snapshot load vs dd iflag=direct", machine_info(cache),
                 [f"table {format_size(size)} of {ROW_BYTES}-byte rows; hot set {args.hot} scattered, with its "
                  f"snapshot; host budget = the hot set, device 1/4; policy {args.policy}; every open in a fresh "
                  f"process, page cache evicted before it and before each dd; trees {dict(trees)}"])
    store = ensure_store(cache, size)
    save_scattered_profile(store, hot_rows)
    snap = snapshot_path(store, TABLE)
    tierstore.save_snapshot(store)
    snap_bytes = snap.stat().st_size

    def one(tree: str) -> dict[str, Any]:
        # this script, importing tierstore from the tree (a baseline tree may predate --load-one)
        cmd = [sys.executable, __file__, "--load-one", str(store), "--policy", args.policy, "--budgets", str(host),
               *(["--timeline"] if args.timeline else [])]
        got = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=trees[tree],
                             env={**os.environ, "PYTHONPATH": str(trees[tree])})
        return json.loads(got.stdout.strip().splitlines()[-1])

    for tree in trees:  # compile (or load) the kernels an open with a profile runs, untimed
        one(tree)
    runs: dict[str, list[dict[str, Any]]] = {"dd": [], **{t: [] for t in trees}}
    loads = []
    for k in range(args.rounds):
        order = ["dd", *trees] if k % 2 == 0 else [*trees, "dd"][::-1]
        for what in order:
            loads.append(os.getloadavg()[0])
            if what == "dd":
                sec = dd_direct(snap)
                runs["dd"].append({"s": sec, "mb_s": snap_bytes / sec / 1e6})
                print(f"round {k} dd: {snap_bytes / 1e6:,.0f} MB in {sec:.2f} s = {snap_bytes / sec / 1e6:,.0f} MB/s"
                      f" (load {loads[-1]:.1f})")
            else:
                r = one(what)
                r["load_mb_s"] = r["host_bytes"] / r["host_s"] / 1e6
                r["open_mb_s"] = r["bytes_read"] / r["open_s"] / 1e6
                runs[what].append(r)
                print(f"round {k} {what}: open {r['open_s']:.2f} s, first row {r['first_row_s']:.2f} s, host tier {r['host_bytes'] / 1e6:,.0f} MB from "
                      f"{r['host_source']} in {r['host_s']:.2f} s = {r['load_mb_s']:,.0f} MB/s, device fill "
                      f"{r['device_s']:.2f} s; open CPU {r['open_cpu_s']:.2f} s, {r['vmstat']} (load {loads[-1]:.1f})")
                if "timeline" in r:
                    print(_timeline().format_phases(r["timeline"]))
    dd_rate = statistics.median(r["mb_s"] for r in runs["dd"])
    med: dict[str, Any] = {"dd_mb_s": dd_rate}
    for tree in trees:
        load_rate = statistics.median(r["load_mb_s"] for r in runs[tree])
        open_rate = statistics.median(r["open_mb_s"] for r in runs[tree])
        med[tree] = {"open_s": statistics.median(r["open_s"] for r in runs[tree]),
                     "first_row_s": statistics.median(r["first_row_s"] for r in runs[tree]), "load_mb_s": load_rate,
                     "load_over_dd": load_rate / dd_rate, "open_mb_s": open_rate, "open_over_dd": open_rate / dd_rate}
        print(f"{tree}: median open {med[tree]['open_s']:.2f} s, first row {med[tree]['first_row_s']:.2f} s; snapshot load {load_rate:,.0f} MB/s = "
              f"{load_rate / dd_rate:.2f}x dd ({dd_rate:,.0f} MB/s); whole open {open_rate:,.0f} MB/s of bytes read "
              f"= {open_rate / dd_rate:.2f}x dd")
    if "base" in med:
        for key in ("open_s", "first_row_s"):
            med[f"{key}_base_over_new"] = med["base"][key] / med["new"][key]
        print(f"base / new: open {med['open_s_base_over_new']:.2f}x, first row {med['first_row_s_base_over_new']:.2f}x")
    print(f"loadavg median {statistics.median(loads):.1f} (min {min(loads):.1f}, max {max(loads):.1f})")
    result = {"size": size, "hot_bytes": host, "snapshot_bytes": snap_bytes, "policy": args.policy, "runs": runs,
              "median": med, "loadavg": loads}
    json_line(result)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", action="store_true", help="the phase breakdown of a background open (docstring)")
    p.add_argument("--budgets", default="128MiB,512MiB,2GiB", help="--phases: host budgets")
    p.add_argument("--policies", default="default,static", help="--phases: policies")
    p.add_argument("--project", type=int, default=60_000_000, help="--phases: host slots to project to")
    p.add_argument("--cprofile", action="store_true", help="--phases: print a cProfile of each first open")
    p.add_argument("--baseline", default=None, help="--phases, --vs-dd: another checkout (e.g. main's) timed in the same rounds")
    p.add_argument("--phase-one", default=None, help=argparse.SUPPRESS)  # one open in this process: a JSON line
    p.add_argument("--vs-dd", action="store_true", help="warm='open': the snapshot load rate vs dd (docstring)")
    p.add_argument("--load-one", default=None, help=argparse.SUPPRESS)  # --vs-dd's one open: a JSON line
    p.add_argument("--timeline", action="store_true", help="--vs-dd: print each open's phases: thread, start, end")
    p.add_argument("--size", default="1536MiB", help="table size")
    p.add_argument("--hot", default="768MiB", help="bytes of scattered profiled rows; the host budget holds them")
    p.add_argument("--policy", default="default")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096, help="ids per lookup of the workload")
    p.add_argument("--batches", type=int, default=50, help="lookups in the workload")
    p.add_argument("--quick", action="store_true", help="a 16 MiB table, 4 MiB hot: for the test")
    p.add_argument("--cache-dir", default=os.environ.get("TIERSTORE_BENCH_CACHE", "/tmp/tierstore_bench_cache"))
    args = p.parse_args(argv)
    if args.phase_one is not None:
        host = int(args.budgets)
        r = phase_one(Path(args.phase_one), policy=args.policies, host=host, device=host // 4, profile=args.cprofile)
        print(json.dumps(r))
        return r
    if args.load_one is not None:
        host = int(args.budgets)
        r = load_one(Path(args.load_one), policy=args.policy, host=host, device=host // 4, timeline=args.timeline)
        print(json.dumps(r))
        return r
    if args.vs_dd:
        if args.quick:
            args.size, args.hot, args.rounds = "16MiB", "4MiB", 1
        return vs_dd_main(args)
    if args.phases:
        if args.quick:
            args.size, args.budgets, args.rounds = "16MiB", "1MiB,4MiB", 1
        return phases_main(args)
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
