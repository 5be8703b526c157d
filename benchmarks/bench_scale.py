"""Which of the store's costs grow with the table: open, first row, bytes read at open,
anonymous memory, lookup cost and build, at several V4.1-layout table sizes with FIXED budgets.

Per size (``--sizes``, GiB of the two tables' rows; default 1, 8, 30):

1. **Checkpoint.** ``benchmarks.v41_checkpoint`` writes the released layout (two fp8 tables
   with ue8m0 scales in shards of their own) in bounded memory. Kept in ``--workdir`` and
   reused by the next run (the config's ``engram_vocab_size`` must match).
2. **Build vs dd.** ``--build-rounds`` rounds of a direct-I/O copy of the shards
   (``dd iflag=direct oflag=direct bs=16M conv=fsync``) then ``tierstore build``, both from a
   cold page cache, in child processes (``benchmarks.bench_build``'s ``dd_copy`` and
   ``build``: one copy of each); the ratio is against the same round's dd.
3. **Profile.** Each table gets a saved sparse profile of ``--hot-factor`` x its share of
   the budgets' rows, scattered uniformly, Zipf counts (a profile larger than the cache: the
   V4.1 case), and its hot-set snapshot (``tierstore.save_snapshot``, what
   ``tierstore profile --save-profile`` writes).
4. **Per policy, one fresh process each** (anonymous memory never shrinks back): compile the
   policy's kernels on the same store with tiny budgets and no profile, close, evict every
   store file from the page cache (fadvise per file), then ``tierstore.open`` with the fixed
   budgets: open seconds, time to the first row (open + one lookup of a hot row), bytes read
   at open (``/proc/self/io`` read_bytes across open and the store's own
   ``stats()["open"]["bytes_read"]``), ``RssAnon`` growth over the process before open
   after open and after warm lookups (``stats()["memory"]["total"]`` beside it); then the
   per-id cost of one lookup of 1K..128K ids (``benchmarks.bench_lookup_size.per_id_us``:
   fastest of ``--repeats`` after one untimed), ``hit``: ids drawn from the hottest profiled
   rows, half as many as the tiers hold (placed at open, or admitted by the warm lookups,
   which end with one lookup of each, for a policy that places nothing), ``miss``: fresh uniform ids (the store reads them with O_DIRECT
   where the filesystem allows it, so the page cache does not turn them into hits); the disk
   rows read per id of each series are reported, so a "hit" series that missed shows it.
5. **Resident baseline** (tables <= ``--resident-max``): the same lookups on a store whose
   device budget holds the whole table (slot == row: no index, no policy).

Then a line ``a + b * GiB`` is fitted per metric over the sizes, each called flat when the
fit moves less than ``--flat-tol`` of its mean over the measured range, and projected to the
released 189 GiB at a 16 GiB host budget (a fit that is flat or falls projects its measured
mean). Budget-proportional metrics (bytes read at open,
open and first-row seconds, anonymous memory) have their budget part (the fit's intercept,
or the mean) scaled by 16 GiB / the host budget, and their growth per GiB added unscaled: a
linear extrapolation in the budget that this run does not measure, and an upper bound for
memory, whose fixed part (interpreter, output pool) is scaled too. Results go to
``WORKDIR/result-SIZE.json`` per size (a rerun skips sizes already measured: ``--redo``
measures again; so do other budgets) and one JSON line at the end.

    python -m benchmarks.bench_scale --sizes 1,8,30 --workdir /tmp/bigtable-scale [--drop-checkpoints]
    python -m benchmarks.bench_scale --quick        # 16/32/64 MiB tables, tiny budgets (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import v41_checkpoint as v41
from benchmarks.bench_build import build, dd_copy
from benchmarks.common import evict, json_line, machine_info, print_header, rss_anon
from benchmarks.isolation import io_counters, run_measured
from engram_model.deepseek_v41 import V41_TABLE
from tierstore.sizes import format_size, parse_size

GIB = 1 << 30
V41_GIB = 189.0  # DeepSeek-V4.1-Flash: 384,006,168 + 384,016,682 rows x 264 B
V41_HOST = 16 * GIB  # the projection's host budget
BUDGET_SCALED = ("open_s", "first_row_s", "open_read_bytes", "open_store_bytes", "anon_open", "anon_warm",
                 "store_memory")


# ============================================================================ one policy (a child process)
def _store_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file()]


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Open ``spec["store"]`` cold with one policy's budgets; open, first row, memory, lookup cost."""
    import torch

    import tierstore
    from benchmarks.bench_lookup_size import per_id_us

    torch.set_num_threads(1)
    store, policy, t0name = Path(spec["store"]), spec["policy"], spec["tables"][0]
    resident = policy == "resident"
    kw: dict[str, Any] = dict(device="cpu", policy="default" if resident else policy)
    with tierstore.open(store, device_budget=4096 * v41.ROW_BYTES, host_budget=16384 * v41.ROW_BYTES,
                        use_profile=False, **kw) as s:  # compile (or load) this policy's kernels first
        for name in spec["tables"]:
            s.lookup(name, torch.arange(4096) * 7 % s.tables[name].rows)
        whole = sum(info.nbytes for info in s.tables.values())  # a device budget that holds every table
    evict(*_store_files(store))
    anon0, io0 = rss_anon(), io_counters()["read_bytes"]
    t0 = time.perf_counter()
    if resident:
        s = tierstore.open(store, device_budget=whole, host_budget=0, use_profile=False, **kw)
    else:
        s = tierstore.open(store, device_budget=spec["device_budget"], host_budget=spec["host_budget"], **kw)
    open_s = time.perf_counter() - t0
    s.lookup(t0name, torch.tensor([spec["first_id"]]))
    first_s = time.perf_counter() - t0
    st = s.stats()
    res: dict[str, Any] = {"policy": policy, "open_s": open_s, "first_row_s": first_s,
                           "open_read_bytes": io_counters()["read_bytes"] - io0,
                           "open_store_bytes": st["open"]["bytes_read"], "open_source": st["open"]["source"],
                           "snapshot": st["open"]["snapshot"], "rows_loaded": st["open"]["rows_loaded"],
                           "anon_open": rss_anon() - anon0}
    t0st = st["tables"][t0name]
    cap = t0st["device"]["capacity_rows"] + t0st["host"]["capacity_rows"]  # rows table 0's tiers hold
    hot = np.load(spec["hot"])  # table 0's profiled rows, hottest first
    rng = np.random.default_rng(0)
    rows = s.tables[t0name].rows
    held = hot[: max(1, cap // 2)] if not resident else np.arange(rows)  # the hottest half of what fits
    cold = max(1, cap // 320)  # uniform ids per warm lookup: 10% of the tiers' rows over the 32
    for _ in range(32):  # warm: mostly hot ids, some uniform ones (misses), every table
        for name in spec["tables"]:
            n = s.tables[name].rows
            s.lookup(name, torch.from_numpy(np.concatenate([rng.choice(held, 2048) % n, rng.integers(0, n, cold)])))
    for part in np.array_split(held, -(-len(held) // 65536)):  # every "hit" row in the tiers (lru places none)
        s.lookup(t0name, torch.from_numpy(part))
    res.update(anon_warm=rss_anon() - anon0, store_memory=s.stats()["memory"]["total"])
    for kind in ("hit", "miss"):
        draw = np.random.default_rng(1 if kind == "hit" else 2)
        ids_of = (lambda n: draw.choice(held, n)) if kind == "hit" else (lambda n: draw.integers(0, rows, n))
        before = s.stats()
        us = {}
        for n in spec["lookup_sizes"]:
            us[str(n)] = per_id_us(s, ids_of, n, spec["repeats"], spec["max_seconds"], table=t0name)
            if us[str(n)] is None:  # a stall: the larger sizes would take longer still
                break
        after = s.stats()
        ids = after["device"]["hits"] + after["device"]["misses"] - before["device"]["hits"] - before["device"]["misses"]
        res[f"{kind}_us_per_id"] = us
        res[f"{kind}_disk_rows_per_id"] = (after["disk"]["rows_read"] - before["disk"]["rows_read"]) / max(1, ids)
    s.close()
    Path(spec["out"]).write_text(json.dumps(res))
    return res


# ============================================================================ one size (the parent)
def _ensure_checkpoint(ckpt: Path, vocab: int) -> bool:
    """Write the V4.1-layout checkpoint unless one of this size is there; True if written."""
    cfg = ckpt / "config.json"
    if cfg.exists() and (ckpt / "model.safetensors.index.json").exists() and \
            json.loads(cfg.read_text())["text_config"]["engram_vocab_size"] == vocab:
        return False
    shutil.rmtree(ckpt, ignore_errors=True)
    # config.json is written last: its presence marks a complete checkpoint
    v41.write_checkpoint(ckpt, engram_vocab_size=vocab, compressed_vocab_size=16, pad_id=1, dense={})
    return True


def _save_profiles(store: Path, tables: dict[str, int], hot_rows: int, seed: int) -> dict[str, np.ndarray]:
    """A sparse profile per table: ``hot_rows`` scattered rows with Zipf counts, and the snapshots."""
    import tierstore
    from tierstore.format.profile import save_profile

    rng = np.random.default_rng(seed)
    hot = {}
    for name, n in tables.items():
        k = min(hot_rows, n)
        draw = np.unique(rng.integers(0, n, k + k // 8 + 64))  # O(k): no permutation of the table
        rows = rng.permutation(draw)[:k] if draw.size >= k else rng.permutation(n)[:k]
        counts = np.maximum(1, 1e9 / np.arange(1, k + 1)).astype(np.int64)  # rank 1 is rows[0]
        save_profile(store, name, (rows.astype(np.int64), counts), n_rows=n)
        hot[name] = rows
    tierstore.save_snapshot(store)
    return hot


def measure_size(gib: float, args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    label = f"{gib:g}GiB"
    target = int(gib * GIB)
    vocab = v41.vocab_for_table_bytes(target)
    rows = v41.table_rows(vocab)
    tables = {V41_TABLE.format(layer=L): rows[L] for L in v41.LAYER_IDS}
    table_bytes = sum(rows.values()) * v41.ROW_BYTES
    ckpt, store = work / f"ckpt-{label}", work / f"store-{label}"
    res: dict[str, Any] = {"gib": gib, "table_bytes": table_bytes, "table_rows": list(tables.values()),
                           "loadavg_start": os.getloadavg()}
    t = time.perf_counter()
    written = _ensure_checkpoint(ckpt, vocab)
    res["checkpoint"] = {"written": written, "seconds": time.perf_counter() - t if written else None}
    shards = sorted(ckpt.glob("*.safetensors"))

    rounds = []
    python, cwd = sys.executable, str(Path(__file__).resolve().parents[1])
    for _ in range(args.build_rounds):
        dd_s, nbytes = dd_copy(shards, work)
        b = build(python, cwd, ckpt, store, work)
        b.update(dd_seconds=dd_s, dd_bytes=nbytes, vs_dd=dd_s / b["build_seconds"])
        rounds.append(b)
        print(f"{label:>8} build {b['build_seconds']:7.1f} s vs dd {dd_s:7.1f} s ({b['vs_dd']:.2f}x dd), "
              f"peak RSS {format_size(b['peak_rss_bytes'])}", flush=True)
    res["build"] = {"rounds": rounds, "build_s": float(np.median([r["build_seconds"] for r in rounds])),
                    "dd_s": float(np.median([r["dd_seconds"] for r in rounds])),
                    "vs_dd": float(np.median([r["vs_dd"] for r in rounds])),
                    "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rounds)}

    hot_rows = int(args.hot_factor * (args.device_budget + args.host_budget) / v41.ROW_BYTES / len(tables))
    t = time.perf_counter()
    hot = _save_profiles(store, tables, hot_rows, args.seed)
    res["profile"] = {"hot_rows_per_table": hot_rows, "seconds": time.perf_counter() - t}
    first = next(iter(tables))
    np.save(work / "hot.npy", hot[first])

    res["policies"] = {}
    systems = args.policies + (["resident"] if table_bytes <= args.resident_max else [])
    for policy in systems:
        spec = {"store": str(store), "policy": policy, "tables": list(tables), "table_bytes": table_bytes,
                "device_budget": args.device_budget, "host_budget": args.host_budget,
                "first_id": int(hot[first][0]), "hot": str(work / "hot.npy"), "lookup_sizes": args.lookup_sizes,
                "repeats": args.repeats, "max_seconds": args.max_seconds, "out": str(work / f"child-{policy}.json")}
        (work / "child.spec.json").write_text(json.dumps(spec))
        Path(spec["out"]).unlink(missing_ok=True)
        r = run_measured([sys.executable, "-m", "benchmarks.bench_scale", "--child", str(work / "child.spec.json")],
                         log=work / f"child-{policy}.log", env=env, cwd=cwd)
        if r.returncode or not Path(spec["out"]).exists():
            res["policies"][policy] = {"failed": f"rc {r.returncode}: {r.log.read_text()[-400:]}"}
            print(f"{label:>8} {policy:>9}: FAILED rc {r.returncode}; log {r.log}", flush=True)
            continue
        c = json.loads(Path(spec["out"]).read_text())
        c["peak_rss_bytes"] = r.max_rss_bytes
        res["policies"][policy] = c
        fmt = lambda d: " ".join("stall" if v is None else f"{v:.2f}" for v in d.values())  # noqa: E731
        print(f"{label:>8} {policy:>9}: open {c['open_s']:6.2f} s, first row {c['first_row_s']:6.2f} s, read "
              f"{format_size(c['open_read_bytes']):>9} (store {format_size(c['open_store_bytes'])}, "
              f"{c['open_source']}), RssAnon {format_size(c['anon_warm']):>9}; us/id hit {fmt(c['hit_us_per_id'])} "
              f"(disk {c['hit_disk_rows_per_id']:.2f}/id), miss {fmt(c['miss_us_per_id'])} "
              f"(disk {c['miss_disk_rows_per_id']:.2f}/id)", flush=True)
    res["loadavg_end"] = os.getloadavg()
    return res


# ============================================================================ fits and the projection
def metrics(per_size: list[dict[str, Any]], largest: int) -> dict[str, list[float | None]]:
    """name -> value per size, for every scalar worth a line."""
    out: dict[str, list[float | None]] = {}

    def put(name: str, vals: list[Any]) -> None:
        out[name] = [None if v is None else float(v) for v in vals]

    put("build_s", [r["build"]["build_s"] for r in per_size])
    put("dd_s", [r["build"]["dd_s"] for r in per_size])
    put("build_vs_dd", [r["build"]["vs_dd"] for r in per_size])
    put("build_peak_rss", [r["build"]["peak_rss_bytes"] for r in per_size])
    policies = sorted({p for r in per_size for p in r["policies"]}, key=lambda p: (p == "resident", p))
    for p in policies:
        got = [r["policies"].get(p, {}) for r in per_size]
        if p == "resident" and len([g for g in got if g]) < 2:
            continue  # one point is no line
        keys = ("hit", "miss") if p == "resident" else \
            ("open_s", "first_row_s", "open_read_bytes", "open_store_bytes", "anon_open", "anon_warm", "store_memory",
             "hit", "miss")
        for k in keys:
            if k in ("hit", "miss"):
                for n in (4096, largest):
                    put(f"{p}/{k}_us_per_id@{n}", [g.get(f"{k}_us_per_id", {}).get(str(n)) for g in got])
            else:
                put(f"{p}/{k}", [g.get(k) for g in got])
    return out


def fit(xs: list[float], ys: list[float | None], tol: float) -> dict[str, Any] | None:
    """Least-squares ``a + b * x`` over the points that exist; flat when ``|b| x range`` is under
    ``tol`` of the mean value (the size explains less than that of the metric over the range)."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 2:
        return None
    x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    b, a = np.polyfit(x, y, 1)
    span = abs(b) * (x.max() - x.min())
    flat = bool(span <= tol * max(abs(y.mean()), 1e-12))
    return {"a": float(a), "b_per_gib": float(b), "flat": flat, "mean": float(y.mean()),
            "trend": "flat" if flat else "grows" if b > 0 else "falls",
            "change_over_range": float(span / max(abs(y.mean()), 1e-12))}


def project(name: str, f: dict[str, Any], host_budget: int) -> float:
    """The fit at 189 GiB where it grows; the measured mean where it is flat or falls (nothing
    in the store gets cheaper with a larger table: a falling fit is noise, not a trend). A
    budget-proportional metric scales its budget part (the intercept, or the mean) to the
    16 GiB host budget; what grows with the table (``b`` per GiB) is not the budget's, and
    is added unscaled."""
    scale = V41_HOST / host_budget if name.split("/")[-1] in BUDGET_SCALED else 1.0
    if f.get("trend", "grows") == "grows":
        return f["a"] * scale + f["b_per_gib"] * V41_GIB
    return f.get("mean", f["a"]) * scale


def _show(name: str, v: float) -> str:
    if name.endswith(("bytes", "rss", "anon_open", "anon_warm", "store_memory")):
        return format_size(v) if v >= 0 else "-" + format_size(-v)
    return f"{v:.3g}"


# ============================================================================ CLI
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.child:
        return run_child(json.loads(Path(args.child).read_text()))
    if args.quick:
        args.sizes, args.device_budget, args.host_budget = "0.015625,0.03125,0.0625", "1MiB", "4MiB"
        args.lookup_sizes, args.repeats, args.policies, args.resident_max = "1024,4096", 1, "static,lru", "32MiB"
    args.device_budget, args.host_budget = parse_size(args.device_budget), parse_size(args.host_budget)
    args.resident_max = parse_size(args.resident_max)
    args.lookup_sizes = [int(n) for n in args.lookup_sizes.split(",")]
    args.policies = args.policies.split(",")
    sizes = sorted(float(s) for s in args.sizes.split(","))
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    info = machine_info(work)
    print_header("bench_scale: the store's costs vs the table's size, fixed budgets", info, [
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"V4.1-layout tables of {sizes} GiB; device {format_size(args.device_budget)}, host "
        f"{format_size(args.host_budget)}; profile {args.hot_factor}x the budgets' rows, scattered, Zipf; "
        f"policies {args.policies}; lookups {args.lookup_sizes} ids; page cache evicted per file before each open",
        f"projection: {V41_GIB} GiB at a {format_size(V41_HOST)} host budget (budget-proportional metrics "
        f"scaled by {V41_HOST / args.host_budget:g}x: assumed, not measured)"])
    per_size = []
    try:
        for gib in sizes:
            path = work / f"result-{gib:g}GiB.json"
            budgets = {"device": args.device_budget, "host": args.host_budget}
            if path.exists() and not args.redo and json.loads(path.read_text()).get("budgets") == budgets:
                print(f"{gib:g} GiB: measured before, reusing {path} (--redo measures again)")
                r = json.loads(path.read_text())
            else:
                r = measure_size(gib, args, work, env)
                r["budgets"] = budgets
                path.write_text(json.dumps(r))
            per_size.append(r)
            shutil.rmtree(work / f"store-{gib:g}GiB", ignore_errors=True)  # stores are rebuilt (and timed) each run
            if args.drop_checkpoints:
                shutil.rmtree(work / f"ckpt-{gib:g}GiB", ignore_errors=True)
    finally:
        for p in work.glob("child*"):
            p.unlink()
    xs = [r["gib"] for r in per_size]
    series = metrics(per_size, args.lookup_sizes[-1])
    fits = {k: fit(xs, v, args.flat_tol) for k, v in series.items()}
    print(f"\n{'metric':<34}" + "".join(f"{x:>11g}G" for x in xs) + f"{'a':>11} {'b/GiB':>11} {'trend':>6}"
          f" {'@189GiB,16GiB host':>19}")
    proj = {}
    for k, v in series.items():
        f = fits[k]
        if f is not None:
            proj[k] = project(k, f, args.host_budget)
        print(f"{k:<34}" + "".join(f"{'-' if y is None else _show(k, y):>12}" for y in v)
              + (f"{_show(k, f['a']):>11} {_show(k, f['b_per_gib']):>11} {f['trend']:>6}"
                 f" {_show(k, proj[k]):>19}" if f else "   (fewer than two points)"))
    res = {"bench": "scale", "quick": args.quick, "machine": info, "sizes_gib": xs,
           "budgets": {"device": args.device_budget, "host": args.host_budget}, "flat_tol": args.flat_tol,
           "series": series, "fits": fits, "projection_189gib_16gib_host": proj,
           "flat": sorted(k for k, f in fits.items() if f and f["flat"]),
           "not_flat": sorted(k for k, f in fits.items() if f and not f["flat"]), "per_size": per_size}
    print(f"\nflat (independent of the table's size): {', '.join(res['flat']) or 'none'}")
    print(f"NOT flat (grows or shrinks with the table): {', '.join(res['not_flat']) or 'none'}")
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    json_line(res)
    return res


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="the store's costs vs table size (fixed budgets), fitted and projected")
    ap.add_argument("--sizes", default="1,8,30", help="GiB of V4.1-layout table rows, comma-separated")
    ap.add_argument("--quick", action="store_true", help="16/32/64 MiB tables, two policies (the test)")
    ap.add_argument("--workdir", default="/tmp/tierstore_bench_scale", help="checkpoints, stores, results")
    ap.add_argument("--device-budget", default="64MiB")
    ap.add_argument("--host-budget", default="256MiB")
    ap.add_argument("--hot-factor", type=float, default=2.0, help="profiled rows / the budgets' rows")
    ap.add_argument("--policies", default="static,lru,s3fifo,default")
    ap.add_argument("--lookup-sizes", default="1024,4096,16384,65536,131072")
    ap.add_argument("--repeats", type=int, default=2, help="timed lookups per size (the fastest is kept)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="a lookup slower than this stops its series")
    ap.add_argument("--resident-max", default="2GiB", help="largest table for the resident baseline (in RAM)")
    ap.add_argument("--build-rounds", type=int, default=1, help="dd + build rounds per size (median)")
    ap.add_argument("--flat-tol", type=float, default=0.15, help="flat: the fit moves < this of its mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redo", action="store_true", help="measure sizes that have a result file again")
    ap.add_argument("--drop-checkpoints", action="store_true", help="delete each checkpoint after its size")
    ap.add_argument("--clean", action="store_true", help="delete the workdir at the end")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


if __name__ == "__main__":
    main()
