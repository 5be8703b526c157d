"""Every figure the project draws, in one place: hit ratio against capacity and the
rank-frequency curve of row accesses (``tierstore profile --plot/--rank-plot``), curves
with a zoom panel (``python -m engram_model.report``'s learning curves), and serving speed
against host budget (``python -m benchmarks.bench_big_table``).

matplotlib is an optional dependency (the ``plot`` extra): it is imported on the first
plot, never by ``import tierstore`` or the store's CLI, and its absence raises
:class:`~tierstore.errors.MissingExtraError` naming the extra. Figures are written with
the Agg backend (no display needed) at 110 dpi.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingExtraError, OutputPathError
from ..format.profile import zipf_fit

__all__ = ["check_available", "check_writable", "plot_hit_ratios", "plot_rank_frequency", "plot_curves", "plot_budget_sweep"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise MissingExtraError(f"plots need matplotlib ({e}): pip install 'tierstore[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_available() -> None:
    """Raise :class:`MissingExtraError` now if plots cannot be drawn (before a long run whose
    figures would then fail at the end)."""
    _pyplot()


def check_writable(path: str | Path) -> Path:
    """Raise :class:`OutputPathError` now if a figure cannot be written to ``path`` (before
    the simulations that draw it, not after them): the path must not be a directory, and
    its nearest existing folder must be a writable directory (missing folders are created
    when the figure is saved). Returns ``path`` as a Path."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write a figure to {path}: it is a directory; name a file in it, "
                              f"e.g. {path / 'figure.png'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"cannot write a figure to {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputPathError(f"cannot write a figure to {path}: {path if path.exists() else folder} "
                              "is not writable; choose another path")
    return path


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hit_ratios(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Hit ratio against capacity (% of table rows, log scale), one panel per table and one
    curve per policy, the optimum dashed and drawn last, ``default`` bold. ``results``:
    the dicts of ``hit_ratios.policy_hit_ratios`` (live replays are left out)."""
    plt = _pyplot()
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
    return _save(fig, plt, path)


def plot_rank_frequency(rows_by_table: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Accesses per row against the row's rank (log-log), one curve per table, with the Zipf
    line fitted over the head (``format.profile.zipf_fit``) dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, rows in rows_by_table.items():
        # counts of the rows read (a sort of the trace), not a bincount over every id up to
        # the largest: that is 3 GB at V4.1's 384M rows
        s, sorted_counts = zipf_fit(np.unique(rows, return_counts=True)[1])
        # ~2,000 log-spaced ranks draw the same curve as millions of points
        r = np.unique(np.geomspace(1, max(1, sorted_counts.size), 2000).astype(np.int64))
        ax.loglog(r, sorted_counts[r - 1], label=f"{name} (Zipf s = {s:.2f})")
        n = max(3, sorted_counts.size // 2)
        head = r[r <= n]
        fit_c = np.exp(np.polyfit(np.log(np.arange(1, n + 1)), np.log(sorted_counts[:n]), 1)[1])
        ax.loglog(head, fit_c * head ** -s, "k--", linewidth=1)
    ax.set_xlabel("row rank")
    ax.set_ylabel("accesses")
    ax.set_title("rank-frequency of row accesses (dashed: fitted Zipf)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_curves(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: str | Path, *,
                xlabel: str, ylabel: str, title: str, zoom_title: str = "zoom: last two thirds") -> Path:
    """``series`` of (label, x, y) side by side twice: whole, and without the first point
    with the y range fitted to the last two thirds of every curve (where runs that start
    alike part)."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, x, y in series:
        ax.plot(x, y, marker=".", label=label)
        ax2.plot(x[1:], y[1:], marker=".", label=label)
    for a in (ax, ax2):
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
    ax.set_title(title)
    last = [v for _, _, y in series for v in y[len(y) // 3:]]
    if last:
        ax2.set_ylim(min(last) - 0.05, max(last) + 0.05)
    ax2.set_title(zoom_title)
    ax.legend(fontsize=7)
    return _save(fig, plt, path)


def plot_budget_sweep(runs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Tokens/s (prefill and decode, log scale) and the fraction of row lookups served from
    memory (store: rows; mmap: pages touched) against the store's host budget, the store
    against mmap at the same memory.
    ``runs``: dicts with ``system`` ("store", "mmap", and "compute" for the dense model's
    own speed, drawn as horizontal lines), ``host_budget`` (bytes), ``decode_tok_s``,
    ``prefill_tok_s``, ``memory_hit_ratio`` and, for the store, ``device_hit_ratio``."""
    plt = _pyplot()
    gib = float(1 << 30)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, style, color in (("store", "-o", "tab:blue"), ("mmap", "--s", "tab:red")):
        rs = sorted((r for r in runs if r["system"] == system), key=lambda r: r["host_budget"])
        if not rs:
            continue
        x = [r["host_budget"] / gib for r in rs]
        ax1.plot(x, [r["decode_tok_s"] for r in rs], style, color=color, label=f"{system} decode")
        ax1.plot(x, [r["prefill_tok_s"] for r in rs], style, color=color, alpha=0.5, label=f"{system} prefill")
        what = "rows from memory" if system == "store" else "page-cache hits (per page touched)"
        ax2.plot(x, [r["memory_hit_ratio"] for r in rs], style, color=color, label=f"{system}: {what}")
        if system == "store":
            ax2.plot(x, [r["device_hit_ratio"] for r in rs], ":^", color=color, alpha=0.6,
                     label="store: device tier hits")
    floor = next((r for r in runs if r["system"] == "compute"), None)
    if floor is not None:  # the dense model alone: no way of fetching rows beats it
        ax1.axhline(floor["decode_tok_s"], color="grey", lw=0.8, ls=":", label="compute only, decode")
        ax1.axhline(floor["prefill_tok_s"], color="grey", lw=0.8, ls="-.", label="compute only, prefill")
    ax1.set_yscale("log")
    ax1.set_xlabel("store host budget (GiB); mmap's memory limit = the store's peak")
    ax1.set_ylabel("tokens/s")
    ax2.set_xlabel("store host budget (GiB)")
    ax2.set_ylabel("hit ratio")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Engram tables larger than memory (DeepSeek-V4.1 layout): store vs mmap")
    return _save(fig, plt, path)
