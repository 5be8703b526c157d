"""Hit ratio of every policy x capacity x trace on exact replays, next to Belady's optimum,
plus how much of the LRU -> optimum gap the default closes with announced futures.

Traces (``tierstore trace``, the model of ``--checkpoint``, default runs/learn_engram):

- ``stdlib``: the Python standard library (docs/profiling.md): a ``--split train`` slice of
  ``--train-tokens`` for the profile, ``--split test`` slices of ``--test-tokens`` served
  with ``--streams 1`` and ``--streams 64`` (requests of <= 1024 tokens);
- ``prose``: English prose of another kind: the Debian Reference (``debian-reference-en``)
  and the GNU info manuals in /usr/share/info (coding standards, maintainers' guide, bash,
  coreutils, gettext, find, sed, grep, wget, diffutils, gnupg...), cut into one document
  per section / info node (written under ``--work``), split train/test the same way.
  Install the packages with ``apt-get install -y debian-reference-en gnu-standards bash-doc``.

Traces are built once under ``--work`` (default runs/policy_quality) and reused. Every
replay is exact (the recorded serving steps, ``tierstore.analysis.simulate.simulate``). The lookahead
rows announce batch i+L before batch i (``--lookahead``, in recorded steps: one token of one
stream is 16 lookups, a step of 64 streams 1,024). The gap closure at capacity c is
(default with lookahead - lru) / (opt - lru).

    PYTHONPATH=. python -m benchmarks.bench_policy_quality [--traces stdlib,prose]

The last line is JSON: {"results": [{trace, capacity_fraction, capacity_rows, policy,
lookahead, hit_ratio}...], "closure": [...]}.
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tierstore.analysis.simulate import load_trace, simulate

from .common import json_line

POLICIES = ["lru", "s3fifo", "wtinylfu", "arc", "static", "default"]
CAPS = [0.001, 0.003, 0.01, 0.03, 0.1]

INFO = ["standards", "maintain", "bash", "coreutils", "gettext", "find", "find-maint", "sed", "grep", "wget",
        "diffutils", "gnupg", "rluserman", "bzip2", "ed", "gzip", "time", "bc"]


def prose_corpus(out: Path) -> Path:
    """One text file per section of the Debian Reference / node of the GNU info manuals."""
    if out.is_dir() and any(out.iterdir()):
        return out
    out.mkdir(parents=True, exist_ok=True)
    docs: list[str] = []
    ref = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
    if ref.is_file():
        text = gzip.open(ref, "rt", errors="replace").read()
        # sections are headed "N.N. Title" / "N.N.N. Title" on a line of their own
        docs += [d for d in re.split(r"\n(?=\d+\.\d+(?:\.\d+)*\.\s+\S)", text) if d.strip()]
    info = Path("/usr/share/info")
    for name in INFO:
        for f in sorted(info.glob(f"{name}.info*.gz")):
            text = gzip.open(f, "rt", errors="replace").read()
            docs += [d for d in text.split("\x1f") if len(d.strip()) > 200]  # one node each
    if not docs:
        raise SystemExit("no prose found: apt-get install -y debian-reference-en gnu-standards bash-doc")
    for i, d in enumerate(docs):
        (out / f"{i:05d}.txt").write_text(d)
    return out


def build(args, name: str) -> dict[str, Path]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if name == "stdlib":
        src = ["--stdlib"]
    else:
        src = ["--text", str(prose_corpus(work / "prose_docs")), "--glob", "*.txt"]
    want = {"train": ("train", args.train_tokens, 1, 0), "b1": ("test", args.test_tokens, 1, 1024),
            "b64": ("test", args.test_tokens, 64, 1024)}
    paths = {}
    for key, (split, tokens, streams, doc_tokens) in want.items():
        p = work / f"{name}_{key}_{tokens}.trace.zst"
        if not p.is_file():
            cmd = [sys.executable, "-m", "tierstore_cli.cli", "trace", "--checkpoint", args.checkpoint, *src,
                   "--split", split, "--max-tokens", str(tokens), "--streams", str(streams),
                   "--doc-tokens", str(doc_tokens), "--out", str(p)]
            print("#", " ".join(cmd[2:]), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        paths[key] = p
    return paths


def table_of(path: Path):
    tr = load_trace(path)
    (name, t), = tr.tables.items()  # the example model has one Engram table
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/learn_engram")
    ap.add_argument("--work", default="runs/policy_quality")
    ap.add_argument("--traces", default="stdlib,prose")
    ap.add_argument("--train-tokens", type=int, default=1_000_000)
    ap.add_argument("--test-tokens", type=int, default=200_000)
    ap.add_argument("--capacity", default=",".join(map(str, CAPS)))
    ap.add_argument("--policy", default=",".join(POLICIES))
    ap.add_argument("--lookahead", default="4,64",
                    help="lookaheads (in recorded steps) for the default at the gap-closure capacity")
    ap.add_argument("--closure-capacity", type=float, default=0.01)
    ap.add_argument("--no-opt", action="store_true")
    args = ap.parse_args(argv)
    caps = [float(c) for c in args.capacity.split(",")]
    policies = args.policy.split(",")
    lookaheads = [int(x) for x in args.lookahead.split(",") if x]
    results, closure = [], []
    t_all = time.perf_counter()
    for name in args.traces.split(","):
        paths = build(args, name)
        train = table_of(paths["train"])
        n_rows = train.n_rows
        profile = np.bincount(train.rows, minlength=n_rows)
        for key in ("b1", "b64"):
            t = table_of(paths[key])
            label = f"{name} {key}"
            rows_caps = [max(1, int(round(c * n_rows))) for c in caps]
            ps = policies + ([] if args.no_opt else ["opt"])
            t0 = time.perf_counter()
            res = simulate(t.rows, rows_caps, ps, n_rows=n_rows, offsets=t.offsets, profile=profile)
            hr = {(r.policy, r.capacity_rows): r.hit_ratio for r in res}
            print(f"\n### {label}: {t.rows.size:,} lookups, {np.unique(t.rows).size:,} distinct of {n_rows:,} rows "
                  f"({time.perf_counter() - t0:.0f} s)\n")
            online = [p for p in policies if p != "default"]
            cols = ps + (["default - best"] if "default" in ps and online else [])
            print("| capacity | " + " | ".join(cols) + " |")
            print("|---" * (len(cols) + 1) + "|")
            for c, rc in zip(caps, rows_caps):
                cells = [f"{hr[(p, rc)]:.4f}" for p in ps]
                if "default" in ps and online:
                    best = max(hr[(p, rc)] for p in online)
                    cells.append(f"{hr[('default', rc)] - best:+.4f}")
                print(f"| {c:.1%} ({rc:,}) | " + " | ".join(cells) + " |", flush=True)
                for p in ps:
                    results.append({"trace": label, "capacity_fraction": c, "capacity_rows": rc, "policy": p,
                                    "lookahead": 0, "hit_ratio": hr[(p, rc)]})
            if lookaheads and not args.no_opt:
                rc = max(1, int(round(args.closure_capacity * n_rows)))
                base = simulate(t.rows, [rc], ["lru", "opt"], n_rows=n_rows, offsets=t.offsets, profile=profile) \
                    if (("lru", rc) not in hr) else None
                lru = hr.get(("lru", rc), base and base[0].hit_ratio)
                opt = hr.get(("opt", rc), base and base[1].hit_ratio)
                for L in lookaheads:
                    d = simulate(t.rows, [rc], ["default"], n_rows=n_rows, offsets=t.offsets, profile=profile,
                                 lookahead=L)[0].hit_ratio
                    frac = (d - lru) / (opt - lru) if opt > lru else float("nan")
                    closure.append({"trace": label, "capacity_fraction": args.closure_capacity, "capacity_rows": rc,
                                    "lookahead": L, "lookups_ahead": L * (1024 if key == "b64" else 16),
                                    "lru": lru, "default": d, "opt": opt, "closed": frac})
                    print(f"lookahead {L} steps at {args.closure_capacity:.1%}: default {d:.4f}, lru {lru:.4f}, "
                          f"opt {opt:.4f}: closes {frac:.1%} of the lru -> opt gap", flush=True)
    print(f"\n# {time.perf_counter() - t_all:.0f} s", file=sys.stderr)
    json_line({"results": results, "closure": closure})


if __name__ == "__main__":
    main()
