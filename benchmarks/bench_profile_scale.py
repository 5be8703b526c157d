"""`tierstore profile` at DeepSeek-V4.1 scale: wall time and peak RSS of one CLI run.

A synthetic Zipf trace of ``--lookups`` row ids over a table of V4.1's 384,006,168 rows
(steps of 24 ids: one token of one stream), and a profile trace of as many ids from another
seed (``static``/``default`` rank rows by it), both written as trace files; then
``tierstore profile`` replays them in a child process whose peak RSS (``ru_maxrss`` of a
fresh parent's children) counts everything: both traces, the simulations, the plot.

    PYTHONPATH=. python -m benchmarks.bench_profile_scale --lookups 20000000 \\
        --capacity 0.0001,0.001,0.01 --policy lru,lfu,s3fifo,wtinylfu,default,opt

The ranks follow a bounded power law (``--zipf``, over ``--universe`` ranks) scattered over
the table by a multiplicative hash: 20M ids at s = 0.9 touch ~8.6M rows (a real V4.1 trace
of 20M ids from Python source touched about 40% distinct). The last line is JSON.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import json_line
from tierstore.analysis.simulate import TableTrace, Trace, save_trace

V41_ROWS = 384_006_168
TABLE = "layers.1.engram.embed.weight"


def zipf_rows(n_rows: int, size: int, *, s: float = 0.9, universe: int = 10**8, seed: int = 0,
              step: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """``size`` row ids with P(rank k) ~ k**-s over ``universe`` ranks (inverse CDF of the
    continuous law), rank k at row (k * 2654435761) % n_rows; and step offsets every ``step``.
    Memory: O(size), nothing per table row."""
    u = np.random.default_rng(seed).random(size)
    if s == 1.0:
        ranks = np.exp(u * np.log(universe))
    else:
        ranks = ((universe ** (1 - s) - 1) * u + 1) ** (1 / (1 - s))
    rows = (ranks.astype(np.int64) - 1) * 2654435761 % n_rows
    return rows, np.arange(0, size, step, dtype=np.int64)


def write_traces(work: Path, lookups: int, *, n_rows: int = V41_ROWS, s: float = 0.9) -> tuple[Path, Path]:
    """The test trace and the profile trace (another seed), written once under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, name in ((0, "test"), (1, "train")):
        p = work / f"{name}-{lookups}-{n_rows}-{s}.trace.zst"
        if not p.exists():
            rows, off = zipf_rows(n_rows, lookups, s=s, seed=seed)
            save_trace(p, Trace({TABLE: TableTrace(rows, off, n_rows)}, {"synthetic": f"zipf s={s}"}))
        paths.append(p)
    return paths[0], paths[1]


def measure(argv: list[str]) -> dict:
    """Run ``tierstore <argv>`` in a child of a fresh interpreter: wall seconds, peak RSS
    bytes of that child alone, and its output."""
    code = ("import resource, subprocess, sys, time, json\n"
            "t0 = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "dt = time.perf_counter() - t0\n"
            "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'rc': p.returncode, 'seconds': dt, 'peak_rss': ru.ru_maxrss * 1024,"
            " 'cpu_seconds': ru.ru_utime + ru.ru_stime, 'out': p.stdout, 'err': p.stderr[-4000:]}))\n")
    cli = [sys.executable, "-c", "import sys; from tierstore_cli.cli import main; sys.exit(main())"]
    res = subprocess.run([sys.executable, "-c", code, *cli, *argv], capture_output=True, text=True, check=True,
                         env=os.environ.copy())
    import json

    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lookups", type=int, default=20_000_000)
    ap.add_argument("--rows", type=int, default=V41_ROWS, help="table rows (V4.1: 384,006,168)")
    ap.add_argument("--zipf", type=float, default=0.9)
    ap.add_argument("--capacity", default="0.0001,0.001,0.01")
    ap.add_argument("--policy", default="lru,lfu,s3fifo,wtinylfu,default,opt")
    ap.add_argument("--rank-plot", action="store_true", help="also draw the rank-frequency plot")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parents[1] / ".bench_cache" / "profile_scale"))
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    test, train = write_traces(Path(a.work), a.lookups, n_rows=a.rows, s=a.zipf)
    made = time.perf_counter() - t0
    cmd = ["profile", "--trace", str(test), "--profile-trace", str(train), "--capacity", a.capacity,
           "--policy", a.policy, "--json"]
    if a.rank_plot:
        cmd += ["--rank-plot", str(Path(a.work) / "rank.png")]
    r = measure(cmd)
    if r["rc"] != 0:
        raise SystemExit(f"tierstore profile failed: {r['err']}")
    import json

    results = json.loads(r["out"].strip().splitlines()[-1])["results"]
    print(f"# tierstore profile over {a.lookups:,} lookups of a {a.rows:,}-row table (traces made in {made:.1f} s)")
    print(f"# {' '.join(cmd)}")
    for x in results:
        print(f"{x['capacity_rows']:>10,} {x['policy']:>9s} {x['hit_ratio']:.4f}")
    out = {"lookups": a.lookups, "rows": a.rows, "zipf": a.zipf, "capacity": a.capacity, "policy": a.policy,
           "seconds": round(r["seconds"], 1), "cpu_seconds": round(r["cpu_seconds"], 1),
           "peak_rss_bytes": r["peak_rss"], "peak_rss_gib": round(r["peak_rss"] / 2**30, 3),
           "load_avg_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
           "results": [{k: x[k] for k in ("capacity_rows", "policy", "hit_ratio")} for x in results]}
    json_line(out)
    return out


if __name__ == "__main__":
    main()
