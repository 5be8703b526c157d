"""Hit ratio of the compiled ``default`` policy (tierstore.cache) against lru, s3fifo and
static on real text, next to the old batch-vectorized DefaultPolicy (tierstore.policy).

Trace: word ids of the standard library's source (tests/conftest.py::real_text_trace, over
subpackages too: the top-level modules give only 516K ids; ``--top-level`` uses them);
the first 200K ids make the profile, the next 500K are replayed. Capacities: 0.1%, 1% and
10% of the distinct ids of those 700K. The compiled policies run through
``tierstore.cache.walk.replay`` (no host tier) one id per lookup (exactly sequential) and
16 ids per lookup; the old class through ``tierstore.simulate.replay`` 16 ids per lookup.

    PYTHONPATH=. python -m benchmarks.default_port_hits [--profile 200000 --replay 500000]
"""

from __future__ import annotations

import argparse
import re
import sysconfig
import time
from pathlib import Path

import numpy as np

from tests.conftest import real_text_trace
from tierstore.cache import CacheIndex
from tierstore.cache import walk
from tierstore.cache.layout import CACHED, NONE


def text_trace(n: int) -> np.ndarray:
    """real_text_trace's word ids, over the standard library's subpackages too (sorted
    paths, site-packages left out): the top-level modules alone give 516K ids."""
    ids: dict[str, int] = {}
    out: list[int] = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        for w in re.findall(r"[A-Za-z_]+", path.read_text(errors="replace")):
            out.append(ids.setdefault(w, len(ids)))
        if len(out) >= n:
            break
    return np.array(out[:n], dtype=np.int64)


def run_new(n_rows, cap, policy, prof, test, batch, lookahead=0):
    ci = CacheIndex(n_rows, cap, policy, profile=prof if policy in ("static", "default") else None)
    H = CacheIndex(n_rows, 0, "lru").state
    bounds = np.append(np.arange(0, test.size, batch), test.size).astype(np.int64)
    walk.replay(CACHED, ci.state, NONE, H, test, bounds, lookahead)
    return ci.hit_ratio


def run_old(n_rows, cap, prof, test, batch):
    from tierstore.cache_index import CacheIndex as OldIndex
    from tierstore.simulate import replay
    ci = OldIndex(n_rows, cap, "default", profile=prof)
    bounds = np.append(np.arange(0, test.size, batch), test.size).astype(np.int64)
    replay(ci, test, bounds)
    return ci.hit_ratio


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", type=int, default=200_000)
    ap.add_argument("--replay", type=int, default=500_000)
    ap.add_argument("--top-level", action="store_true", help="real_text_trace itself (top-level modules only)")
    args = ap.parse_args(argv)
    t = (real_text_trace if args.top_level else text_trace)(args.profile + args.replay)
    n_rows = int(t.max()) + 1
    prof = np.bincount(t[: args.profile], minlength=n_rows)
    test = np.ascontiguousarray(t[args.profile:])
    print(f"# real text: {t.size:,} ids, {n_rows:,} distinct; profile {args.profile:,}, replay {test.size:,}")
    cols = ["lru", "s3fifo", "static", "default", "default b16", "default b16+hints", "old default b16"]
    print("| capacity (rows) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for frac in (0.001, 0.01, 0.1):
        cap = max(1, int(frac * n_rows))
        t0 = time.time()
        r = [run_new(n_rows, cap, p, prof, test, 1) for p in ("lru", "s3fifo", "static", "default")]
        r.append(run_new(n_rows, cap, "default", prof, test, 16))
        r.append(run_new(n_rows, cap, "default", prof, test, 16, lookahead=2))
        r.append(run_old(n_rows, cap, prof, test, 16))
        cells = " | ".join(f"{x:.4f}" for x in r)
        print(f"| {frac:.1%} ({cap:,}) | {cells} |  <!-- {time.time() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
