"""Plot and tabulate validation curves of training runs (the learning evidence in docs/model.md).

    python -m engram_model.report runs/learn_engram runs/learn_base_wide runs/learn_base_same \\
        --out docs/learning.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engram_model.checkpoint import read_config

__all__ = ["load_runs", "plot_runs", "main"]


def _active(s: dict[str, Any], args: dict[str, Any]) -> int:
    """Parameters one token uses: every dense weight (tied embedding/head included) except idle
    experts, plus the table values it reads (recomputed: older summaries used another definition)."""
    p = s["params"]
    idle = 0
    if args.get("n_expert"):
        idle = args["n_layer"] * (args["n_expert"] - args["moe_top_k"]) * 3 * args["d_model"] * s["d_ff"]
    reads = 0
    if s["kind"] == "engram":
        reads = len(args["engram_layers"]) * (args["engram_max_ngram"] - 1) * args["engram_d_mem"]
    return int(p["dense"] - idle + reads)


def load_runs(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Per run: label, summary and validation history from its config.json."""
    runs = []
    for d in dirs:
        cfg = read_config(d)
        tr = cfg["training"]
        s = tr["summary"]
        args = tr["args"]
        if s["kind"] == "engram":
            init = "random W_v" if args.get("random_value_init", True) else "zero-init W_v"  # runs before the flag: random
            label = f"Engram, {init} ({s['params']['total'] / 1e6:.1f}M params, {_active(s, args) / 1e6:.1f}M active)"
        elif args.get("n_expert"):
            label = (f"no Engram, MoE {args['n_expert']} experts top-{args['moe_top_k']} "
                     f"({s['params']['total'] / 1e6:.1f}M params, {_active(s, args) / 1e6:.1f}M active)")
        else:
            how = f"FFN widened to d_ff={s['d_ff']}" if s.get("widened_from_d_ff") else f"same backbone, d_ff={s['d_ff']}"
            label = f"no Engram, {how} ({s['params']['total'] / 1e6:.1f}M params, {_active(s, args) / 1e6:.1f}M active)"
        runs.append({"dir": str(d), "label": label, "summary": s, "history": tr["history"]})
    return runs


def plot_runs(runs: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Validation loss against training tokens, one curve per run (tierstore.analysis.plots)."""
    from tierstore import plot_curves

    series = [(r["label"], [p["tokens"] / 1e6 for p in r["history"]], [p["val_loss"] for p in r["history"]])
              for r in runs]
    return plot_curves(series, out, xlabel="training tokens (M)", ylabel="validation loss (nats/token)",
                       title=title or "validation loss, same tokens")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="checkpoint directories written by engram_model.train")
    ap.add_argument("--out", default="docs/learning.png")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    runs = load_runs(args.runs)
    plot_runs(runs, args.out, args.title)
    print(f"{'run':70s} {'final val':>9s} {'tokens':>10s} {'tok/s':>7s}")
    for r in runs:
        s = r["summary"]
        print(f"{r['label']:70s} {s['final_val_loss']:9.4f} {s['tokens']:10,d} {s['tokens_per_second']:7.0f}")
    print(json.dumps([{"dir": r["dir"], "final_val_loss": r["summary"]["final_val_loss"],
                       "history": [(p["tokens"], round(p["val_loss"], 4)) for p in r["history"]]} for r in runs]))
    return runs


if __name__ == "__main__":
    main()
