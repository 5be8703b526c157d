"""How many hints the hint table drops: the measured fraction against the analytic one.

The hint table (``tierstore/cache/hints.py``) is direct-mapped, one bucket per dynamic slot;
a hint whose bucket holds another row's outstanding hint is dropped (a lost hint, never a
false one: it costs at most one miss). With m distinct hinted rows in H buckets, the
expected fraction lost is ``1 - (H/m)(1 - exp(-m/H))``. This hints m random distinct rows
into an empty ``default`` index and counts the rows the table holds afterwards.

    python -m benchmarks.bench_hint_loss [--slots 4096,65536] [--fractions 0.0625,0.25,0.5,1] [--seeds 3]

The last line is JSON: per slots and fraction, the measured and the analytic loss.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from tierstore.cache import CacheIndex
from tierstore.cache.hints import H_KEY

from .common import json_line

N_ROWS = 10_000_000


def lost_fraction(slots: int, m: int, seed: int) -> tuple[float, int]:
    """(fraction of m hinted distinct rows the table does not hold, buckets)."""
    idx = CacheIndex(N_ROWS, slots, "default", pinned_rows=np.empty(0, np.int64))
    rows = np.random.default_rng(seed).choice(N_ROWS, m, replace=False)
    idx.hint(rows)
    HT = idx.state[9]
    held = HT[H_KEY][HT[H_KEY] & 0xFF > 0] >> 8
    return 1.0 - np.isin(rows, held).sum() / m, HT.shape[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="4096,65536")
    ap.add_argument("--fractions", default="0.0625,0.25,0.5,1")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    res: dict = {"bench": "hint_loss", "points": []}
    for slots in (int(s) for s in args.slots.split(",")):
        for frac in (float(f) for f in args.fractions.split(",")):
            m = max(1, int(slots * frac))
            runs = [lost_fraction(slots, m, seed) for seed in range(args.seeds)]
            h = runs[0][1]
            point = {"slots": slots, "buckets": h, "hinted_rows": m, "lost": float(np.mean([r[0] for r in runs])),
                     "analytic": 1 - (h / m) * (1 - math.exp(-m / h))}
            res["points"].append(point)
            print(f"slots {slots:>7} buckets {h:>7} hinted {m:>7} ({frac:g} of the slots): "
                  f"lost {point['lost']:.4f}, analytic {point['analytic']:.4f}")
    json_line(res)
    return res


if __name__ == "__main__":
    main()
