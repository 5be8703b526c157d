"""DeepSeek-V4.1's Engram traffic on real text, hashed with its real tokenizer: how much
memory buys how many hits (docs/v41_sizing.md has the results and the commands).

    python -m benchmarks.corpora                       # the three corpora (Debian packages)
    python -m benchmarks.v41_sizing --steps growth     # rank-frequency + distinct rows, to 10M tokens
    python -m benchmarks.v41_sizing --steps traces,hit # hit ratio vs cache size, every policy + opt
    python -m benchmarks.v41_sizing --steps budget     # host GiB per hit target, expected tokens/s

Steps (each writes ``--work``/<step>.json, which later steps and re-runs reuse):

- ``growth``: every document of a corpus (train then test split, each in file order)
  tokenized with ``--tokenizer``, hashed with ``--preset deepseek-v4.1`` (both layers, the
  trace command's own ``TraceSource``); exact access counts per table and n-gram order
  (``benchmarks.rowcount.RowCounter``: sorted ids and counts, memory sized by the distinct
  rows, never by the table's), hence the distinct rows touched after 1K, 2K, 5K ... 10M
  tokens, and the rank-frequency of each n-gram order (2-, 3-, 4-gram: 8 heads each) after
  each of ``--zipf-tokens`` tokens with the fitted Zipf exponent (``format.profile.zipf_fit``:
  the most accessed half of the rows read).
- ``traces``: ``tierstore trace`` of each corpus: a train slice (``--train-tokens``, the
  profile) and test slices (``--hit-tokens``, requests of <= 1024 tokens) served by 1 and
  64 interleaved streams.
- ``hit``: ``tierstore profile --json`` on each test slice, profile from the same corpus's
  train slice, and across corpora (profile from code, serve prose), every policy and the
  optimum at 0.01% .. 10% of the table, both layers; one PNG per trace.
- ``tables``: print the Markdown tables of docs/v41_sizing.md from the saved results (the
  budget table from the ``hit`` curves of ``--hit-tokens``, for ``--table`` or layer 1).
- ``budget``: from the ``hit`` curves, the smallest capacity (log-interpolated between the
  measured ones) at which a policy reaches 50/80/90/95% hits, as host GiB of 264-byte
  rows, and the tokens/s of the lookup path that hit ratio gives under the tier-cost model
  of ``tierstore.analysis.sizing.TierCosts`` (this machine's measured costs).

The last line is JSON with everything measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .common import json_line
from .corpora import DEFAULT_CACHE

CORPORA = ("code", "prose", "nonenglish")
CROSS = ("code", "prose")  # profile from the first, serve the second
CAPS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
POLICIES = "lru,lfu,s3fifo,wtinylfu,arc,static,default,opt"
TARGETS = (0.5, 0.8, 0.9, 0.95)
TOKEN_TOOL = "deepseek-v4.1"
LOOKUPS_PER_TOKEN = 48  # 2 tables x 3 orders x 8 heads


def checkpoints(limit: int) -> list[int]:
    """1K, 2K, 5K, 10K, ... up to ``limit`` tokens."""
    out, d = [], 1000
    while d <= limit:
        out += [m * d for m in (1, 2, 5) if m * d <= limit]
        d *= 10
    return out


def corpus_files(cache: Path, name: str, split: str | None = None) -> list[Path]:
    splits = (split,) if split else ("train", "test")
    files = [f for s in splits for f in sorted((cache / name / s).glob("*.txt"))]
    if not files:
        raise SystemExit(f"corpus {name!r} not found under {cache}: run python -m benchmarks.corpora first")
    return files


# ---------------------------------------------------------------------------- growth + Zipf
def growth(name: str, *, cache: Path, tokenizer: str, limit: int, zipf_tokens: int | list[int],
           save: Callable[[dict], object] | None = None) -> dict:
    """Distinct rows after each checkpoint of tokens, and the Zipf exponent per order after
    each of ``zipf_tokens`` (and at the end, where the corpus or ``limit`` ends before the
    largest). ``save`` gets the result so far after every 256 documents.

    Exact counts per (table, n-gram order) in a ``RowCounter`` (sorted ids and counts:
    memory sized by the distinct rows, nothing by the table's). An order's 8 heads, and the
    3 orders, hash into disjoint ranges of the table (``head_offsets``), so the distinct rows
    of a table are the sum over its orders."""
    from engram_model.trace import TraceSource
    from tierstore.format.profile import zipf_fit

    from .rowcount import RowCounter

    src = TraceSource(tokenizer=tokenizer, preset=TOKEN_TOOL)
    K = src.hasher.n_head_per_ngram
    orders = range(2, src.hasher.max_ngram_size + 1)
    counters = {t: {n: RowCounter() for n in orders} for t in src.tables}
    zipf_at = sorted({zipf_tokens} if isinstance(zipf_tokens, int) else set(zipf_tokens))
    fits: dict[int, dict] = {}  # tokens -> table -> order -> fit
    marks = checkpoints(limit)
    curve: dict[str, list[int]] = {t: [] for t in src.tables}
    done, files, t0 = 0, corpus_files(cache, name), time.perf_counter()
    timing = {"encode": 0.0, "hash": 0.0, "count": 0.0, "zipf": 0.0}

    def fit_zipf(tokens: int) -> None:
        t1 = time.perf_counter()
        fits[tokens] = {}
        for t, per_order in counters.items():
            fits[tokens][t] = {}
            for n, rc in per_order.items():
                s, sc = zipf_fit(rc.counts)
                ranks = np.unique(np.geomspace(1, max(sc.size, 1), 200).astype(np.int64))
                fits[tokens][t][f"{n}-gram"] = {"s": s, "distinct": int(sc.size), "lookups": int(rc.lookups),
                                                "ranks": ranks.tolist(),
                                                "counts": sc[ranks - 1].astype(int).tolist() if sc.size else []}
        timing["zipf"] += time.perf_counter() - t1

    def result() -> dict:
        last = max(fits) if fits else 0
        return {"tokens": done, "checkpoints": marks[:len(next(iter(curve.values())))], "distinct": curve,
                "table_rows": {t: src.hasher.total_rows(L) for t, L in src.tables.items()},
                "zipf_tokens": last, "zipf": fits.get(last, {}),
                "zipf_by_tokens": {str(k): {t: {o: {"s": z["s"], "distinct": z["distinct"]} for o, z in f.items()}
                                            for t, f in v.items()} for k, v in fits.items()},
                "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time(),
                "step_seconds": dict(timing)}

    for i in range(0, len(files), 256):
        t1 = time.perf_counter()
        docs = src.encode([f.read_text(encoding="utf-8", errors="replace") for f in files[i:i + 256]])
        timing["encode"] += time.perf_counter() - t1
        for d in docs:
            d = d[: limit - done]
            if not d.size:
                continue
            t1 = time.perf_counter()
            rows = src.rows(d)  # table -> (T, 24) int32
            t2 = time.perf_counter()
            timing["hash"] += t2 - t1
            pos = 0  # cut the document at the checkpoints and Zipf points inside it
            for m in sorted({m for m in (*marks, *zipf_at) if done < m <= done + d.size} | {done + d.size}):
                for t, r in rows.items():
                    for n, rc in counters[t].items():
                        rc.add(r[pos:m - done, (n - 2) * K:(n - 1) * K])
                pos = m - done
                if m in marks:
                    for t in rows:
                        curve[t].append(sum(rc.distinct for rc in counters[t].values()))
                if m in zipf_at:
                    timing["count"] += time.perf_counter() - t2
                    fit_zipf(m)
                    t2 = time.perf_counter()
            timing["count"] += time.perf_counter() - t2
            done += d.size
            if done >= limit:
                break
        print(f"  {name}: {done:,} tokens, {time.perf_counter() - t0:.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in timing.items())})", file=sys.stderr, flush=True)
        if save is not None:
            save(result())
        if done >= limit:
            break
    if done not in fits and (not fits or done < zipf_at[-1]):
        fit_zipf(done)  # the corpus (or limit) ended before the largest Zipf point
    return result()


# ---------------------------------------------------------------------------- traces + hits
def cli(*args: str) -> str:
    cmd = [sys.executable, "-m", "tierstore_cli.cli", *args]
    print("# tierstore", " ".join(args), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def trace_paths(work: Path, name: str, args: argparse.Namespace) -> dict[str, Path]:
    return {"train": work / f"{name}_train_{args.train_tokens}.trace.zst",
            **{f"b{b}": work / f"{name}_test_{args.hit_tokens}_b{b}.trace.zst" for b in (1, 64)}}


def make_traces(name: str, work: Path, args: argparse.Namespace) -> dict[str, Path]:
    paths = trace_paths(work, name, args)
    base = ["trace", "--tokenizer", args.tokenizer, "--preset", TOKEN_TOOL, "--glob", "*.txt"]
    for key, p in paths.items():
        if p.is_file():
            continue
        split, tokens = ("train", args.train_tokens) if key == "train" else ("test", args.hit_tokens)
        extra = [] if key == "train" else ["--doc-tokens", "1024", "--streams", key[1:]]
        cli(*base, "--text", str(Path(args.cache) / name / split), "--max-tokens", str(tokens), *extra,
            "--out", str(p))
    return paths


def hit_runs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(label, test corpus, profile corpus) of every hit-ratio run."""
    runs = [(f"{c}_b{b}", c, c) for c in args.corpora for b in (1, 64)]
    if set(CROSS) <= set(args.corpora):
        runs += [(f"{CROSS[0]}->{CROSS[1]}_b{b}", CROSS[1], CROSS[0]) for b in (1, 64)]
    return runs


def hit(work: Path, img: Path, args: argparse.Namespace) -> dict:
    from tierstore.analysis.plots import plot_hit_ratios

    out_path = work / f"hit_{args.hit_tokens}.json"
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    for label, test, prof in hit_runs(args):
        if label in results:
            continue
        b = label.rsplit("_b", 1)[1]
        t0 = time.perf_counter()
        js = json.loads(cli("profile", "--trace", str(trace_paths(work, test, args)[f"b{b}"]),
                            "--profile-trace", str(trace_paths(work, prof, args)["train"]),
                            "--capacity", ",".join(map(str, CAPS)), "--policy", args.policy, "--json",
                            *(["--table", args.table] if args.table else [])).strip().splitlines()[-1])
        results[label] = {"results": js["results"], "seconds": time.perf_counter() - t0}
        out_path.write_text(json.dumps(results))
        plot_hit_ratios(js["results"], img / f"v41_hit_{label.replace('->', '_to_')}.png")
    return results


# ---------------------------------------------------------------------------- budgets
def capacity_for(points: list[tuple[float, float]], target: float) -> float | None:
    """Smallest capacity fraction reaching ``target``, log-interpolated between the measured
    (fraction, hit ratio) points; None when the largest measured capacity falls short."""
    pts = sorted(points)
    if pts[0][1] >= target:
        return pts[0][0]  # reached at the smallest capacity measured: an upper bound
    for (f0, h0), (f1, h1) in zip(pts, pts[1:]):
        if h1 >= target:  # h0 < target <= h1
            w = (target - h0) / (h1 - h0)
            return float(np.exp(np.log(f0) + w * (np.log(f1) - np.log(f0))))
    return None


def budget(hits: dict, args: argparse.Namespace) -> list[dict]:
    from tierstore.analysis.sizing import TierCosts

    costs = TierCosts()
    rows = []
    for label, run in hits.items():
        for table in sorted({r["table"] for r in run["results"]}):
            for policy in ("default", "opt", "s3fifo", "lru"):
                pts = [(r["capacity_fraction"], r["hit_ratio"]) for r in run["results"]
                       if r["table"] == table and r["policy"] == policy and r.get("mode") != "live"]
                if not pts:
                    continue
                n_rows = next(r["capacity_rows"] / r["capacity_fraction"] for r in run["results"]
                              if r["table"] == table)
                for target in TARGETS:
                    f = capacity_for(pts, target)
                    e = {"run": label, "table": table, "policy": policy, "target": target,
                         "fraction": f, "host_gib": None if f is None else f * n_rows * 264 / 2**30}
                    # one tier (host) in front of the disk: the hit ratio's lookup cost
                    e["lookup_us"] = costs.lookup_us(device_hit=0.0, host_hit=target)
                    e["tokens_per_s"] = 1e6 / (LOOKUPS_PER_TOKEN * e["lookup_us"])
                    e["slowdown_vs_resident"] = costs.slowdown(device_hit=0.0, host_hit=target)
                    rows.append(e)
    return rows


# ---------------------------------------------------------------------------- plots
def plot_growth(g: dict, img: Path) -> None:
    from tierstore.analysis.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in g.items():
        for t, ys in r["distinct"].items():
            ax.loglog(r["checkpoints"][:len(ys)], ys, marker=".", label=f"{name}, layer {t.split('.')[1]}",
                      linestyle="-" if ".1." in t else ":")
    ax.set_xlabel("tokens served")
    ax.set_ylabel("distinct rows touched (of 384M per table)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, plt, img / "v41_distinct_rows.png")
    fig, axes = plt.subplots(1, len(g), figsize=(4.2 * len(g), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], g.items()):
        t = sorted(r["zipf"])[0]
        for order, z in r["zipf"][t].items():
            ax.loglog(z["ranks"], z["counts"], label=f"{order} (s = {z['s']:.2f})")
        ax.set_title(f"{name}, {t.split('.engram')[0]}, {r['zipf_tokens'] / 1e6:.0f}M tokens", fontsize=8)
        ax.set_xlabel("row rank")
        ax.set_ylabel("accesses")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, plt, img / "v41_rank_frequency.png")


# ---------------------------------------------------------------------------- markdown
def _layer(t: str) -> str:
    return t.split(".engram")[0]


def zipf_table(g: dict) -> str:
    out = ["| corpus | tokens counted | layer | 2-gram s (distinct rows) | 3-gram s | 4-gram s |",
           "|---|---|---|---|---|---|"]
    for name, r in sorted(g.items()):
        for tokens, fit in sorted(r.get("zipf_by_tokens", {}).items(), key=lambda kv: int(kv[0])):
            for t in sorted(fit, key=lambda t: int(t.split(".")[1])):
                cells = [f"{z['s']:.3f} ({z['distinct']:,})" for _, z in sorted(fit[t].items())]
                out.append(f"| {name} | {int(tokens):,} | {_layer(t)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def growth_tables(g: dict) -> str:
    out = []
    for name, r in sorted(g.items()):
        t1, t14 = sorted(r["distinct"], key=lambda t: int(t.split(".")[1]))
        rows = r["table_rows"][t1]
        cpu = f", {r['cpu_seconds']:.0f} s of CPU" if "cpu_seconds" in r else ""
        out += [f"**{name}** ({r['tokens']:,} tokens, {r['seconds']:.0f} s{cpu}):", "",
                "| tokens served | distinct rows, layer 1 | % of the table | distinct rows per token "
                "| distinct rows, layer 14 |", "|---|---|---|---|---|"]
        for m, a, b in zip(r["checkpoints"], r["distinct"][t1], r["distinct"][t14]):
            out.append(f"| {m:,} | {a:,} | {100 * a / rows:.3g}% | {a / m:.1f} | {b:,} |")
        out.append("")
    return "\n".join(out)


def hit_tables(hits: dict) -> str:
    out = []
    for label, run in hits.items():
        for t in sorted({r["table"] for r in run["results"]}, key=lambda t: int(t.split(".")[1])):
            res = [r for r in run["results"] if r["table"] == t and r.get("mode") != "live"]
            pols = list(dict.fromkeys(r["policy"] for r in res))
            caps = sorted({r["capacity_fraction"] for r in res})
            n = res[0]["lookups"]
            sec = run.get("seconds_by_table", {}).get(t, run["seconds"])
            out += [f"**{label}, {_layer(t)}** ({n:,} lookups; {sec:.0f} s of wall time)", "",
                    "| capacity (rows) | " + " | ".join(pols) + " | default - best other |",
                    "|---" * (len(pols) + 2) + "|"]
            for c in caps:
                h = {r["policy"]: r for r in res if r["capacity_fraction"] == c}
                online = {p: h[p]["hit_ratio"] for p in pols if p not in ("default", "opt")}
                best = max(online, key=online.get)
                cells = [f"**{h[p]['hit_ratio']:.4f}**" if p == "default" else f"{h[p]['hit_ratio']:.4f}"
                         for p in pols]
                d = h["default"]["hit_ratio"] - online[best]
                out.append(f"| {100 * c:.3g}% ({h[pols[0]]['capacity_rows']:,}) | " + " | ".join(cells)
                           + f" | {d:+.4f} ({best}) |")
            out.append("")
    return "\n".join(out)


def _size(fraction: float, n_rows: float) -> str:
    b = fraction * n_rows * 264
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def budget_table(rows: list[dict], hits: dict, table: str | None = None) -> str:
    """The Markdown budget table of docs/v41_sizing.md: one row per (run, policy) of ``budget``'s
    output, for one table (default: the lowest layer measured); "<=" where the target is met
    at the smallest capacity measured (an upper bound), "not reached" past the largest."""
    if not rows:
        return ""
    table = table or min({e["table"] for e in rows}, key=lambda t: int(t.split(".")[1]))
    out = ["| run | policy | " + " | ".join(f"{100 * t:.0f}% hits" for t in TARGETS) + " |",
           "|---" * (len(TARGETS) + 2) + "|"]
    for label, run in hits.items():
        res = [r for r in run["results"] if r["table"] == table and r.get("mode") != "live"]
        if not res:
            continue
        n_rows = res[0]["capacity_rows"] / res[0]["capacity_fraction"]
        lo, hi = min(r["capacity_fraction"] for r in res), max(r["capacity_fraction"] for r in res)
        for policy in ("default", "lru", "s3fifo", "opt"):
            got = {e["target"]: e["fraction"] for e in rows
                   if e["run"] == label and e["table"] == table and e["policy"] == policy}
            if not got:
                continue
            cells = []
            for t in TARGETS:
                f = got[t]
                if f is None:
                    cells.append(f"not reached at {100 * hi:.3g}%")
                elif f <= lo:
                    cells.append(f"<= {_size(f, n_rows)} (<= {100 * f:.2g}%)")
                else:
                    cells.append(f"{_size(f, n_rows)} ({100 * f:.2g}%)")
            out.append(f"| {label} | {policy} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(Path.home() / ".cache/tierstore/deepseek_v3-3.7.2/tokenizer.json"))
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="corpora (python -m benchmarks.corpora)")
    ap.add_argument("--work", default="runs/v41_sizing", help="traces and step results")
    ap.add_argument("--img", default="docs/img", help="PNGs")
    ap.add_argument("--steps", default="growth,traces,hit,budget")
    ap.add_argument("--corpora", default=",".join(CORPORA))
    ap.add_argument("--growth-tokens", type=int, default=10_000_000)
    ap.add_argument("--zipf-tokens", default="1000000,10000000",
                    help="fit the Zipf exponents after these many tokens (comma-separated)")
    ap.add_argument("--train-tokens", type=int, default=1_000_000, help="profile slice (train split)")
    ap.add_argument("--hit-tokens", type=int, default=1_000_000, help="test slice the hit ratios replay")
    ap.add_argument("--policy", default=POLICIES)
    ap.add_argument("--plot-only", action="store_true", help="growth: plot what the saved results hold")
    ap.add_argument("--table", default=None, help="only this table (default: both layers)")
    args = ap.parse_args(argv)
    args.corpora = args.corpora.split(",")
    steps = args.steps.split(",")
    work, img = Path(args.work), Path(args.img)
    work.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    if "growth" in steps:
        g = {}
        for name in args.corpora:  # one file per corpus: corpora can run in parallel processes
            gpath = work / f"growth_{name}.json"
            g[name] = json.loads(gpath.read_text()) if gpath.is_file() else {"tokens": 0}
            if g[name]["tokens"] < args.growth_tokens and not args.plot_only:
                g[name] = growth(name, cache=Path(args.cache), tokenizer=args.tokenizer, limit=args.growth_tokens,
                                 zipf_tokens=[int(x) for x in args.zipf_tokens.split(",")],
                                 save=lambda r, p=gpath: p.write_text(json.dumps(r)))
                gpath.write_text(json.dumps(g[name]))
        g = {n: r for n, r in g.items() if r["tokens"] and r.get("zipf")}
        if g:
            plot_growth(g, img)
        out["growth"] = {n: {"tokens": r["tokens"], "distinct": r["distinct"], "checkpoints": r["checkpoints"],
                             "zipf": {t: {o: z["s"] for o, z in zz.items()} for t, zz in r["zipf"].items()}}
                         for n, r in g.items()}
    if "traces" in steps:
        for name in args.corpora:
            make_traces(name, work, args)
    if "tables" in steps:  # the markdown tables of docs/v41_sizing.md, from the saved results
        g = {n: json.loads((work / f"growth_{n}.json").read_text()) for n in args.corpora
             if (work / f"growth_{n}.json").is_file()}
        h = work / f"hit_{args.hit_tokens}.json"
        hj = json.loads(h.read_text()) if h.is_file() else {}
        print(zipf_table(g), growth_tables(g), hit_tables(hj), budget_table(budget(hj, args), hj, args.table),
              sep="\n\n", file=sys.stderr)
    hits = None
    if "hit" in steps:
        hits = hit(work, img, args)
        out["hit"] = {k: v["results"] for k, v in hits.items()}
    if "budget" in steps:
        hits = hits or json.loads((work / f"hit_{args.hit_tokens}.json").read_text())
        out["budget"] = budget(hits, args)
        (work / f"budget_{args.hit_tokens}.json").write_text(json.dumps(out["budget"]))
    json_line(out)


if __name__ == "__main__":
    main()
