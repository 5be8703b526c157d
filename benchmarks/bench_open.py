"""Open with a scattered hot set: bytes read at open and time to the first row, with and
without the hot-set snapshot (``tierstore profile --save-profile`` writes it).

One table of V4.1-like 264-byte rows (uint8) per size; a saved profile whose hot rows
(``--hot``, 64 MiB by default) are scattered uniformly over the table, with Zipf counts; a
host budget of their bytes (it holds somewhat fewer rows: a budget also pays for its tier's
bookkeeping, ``cache.index.state_bytes``) and a device budget of a quarter of that. For each
table size and policy, in the same run:

- ``rows`` (the baseline, the path before snapshots): no snapshot file, so open loads the
  placed rows from the row file;
- ``snapshot``: the same open after ``tierstore.save_snapshot``.

Before every open the row file, its checksum file and the snapshot are evicted from the page
cache (docs/baselines.md, "Taking cold-disk numbers honestly"; ``fincore`` confirms where
installed). Measured: bytes read at open (the store's ``stats()["open"]["bytes_read"]``, and
the process's ``/proc/self/io`` ``read_bytes`` across the open as an independent count), open
seconds, and time to the first row (``tierstore.open`` + one lookup of a hot row). The
kernels are compiled before any timing. The stores live in ``--cache-dir`` and are reused.

    python -m benchmarks.bench_open [--quick] [--sizes 1GiB,4GiB] [--hot 64MiB] [--policies static,default]
                                    [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import tierstore
from benchmarks.common import evict, json_line, machine_info, print_header, resident_bytes
from tierstore.format.profile import save_profile
from tierstore.format.snapshot import snapshot_path
from tierstore.sizes import format_size, parse_size

ROW_BYTES = 264  # a DeepSeek-V4.1 Engram row: fp8 values + scales
TABLE = "t"


def ensure_store(cache: Path, size: int) -> Path:
    """A store of one table of ``size // 264`` random 264-byte rows (built once, reused)."""
    rows = size // ROW_BYTES
    out = cache / f"open_store_{rows}"
    if (out / "manifest.json").exists():
        return out
    ckpt = cache / f"open_ckpt_{rows}.safetensors"
    header = json.dumps({TABLE: {"dtype": "U8", "shape": [rows, ROW_BYTES],
                                 "data_offsets": [0, rows * ROW_BYTES]}}).encode()
    header += b" " * (-len(header) % 8)
    rng = np.random.default_rng(rows)
    with open(ckpt, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        left = rows * ROW_BYTES
        while left:
            n = min(left, 64 << 20)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    try:
        tierstore.build_store(ckpt, out, tables=f"^{TABLE}$", force=True, progress=False)
    finally:
        ckpt.unlink(missing_ok=True)
    return out


def save_scattered_profile(store: Path, hot_rows: int) -> np.ndarray:
    rows = tierstore.open(store, device="cpu").tables[TABLE].rows
    rng = np.random.default_rng(7)
    hot = rng.choice(rows, size=min(hot_rows, rows), replace=False)
    counts = np.zeros(rows, np.int64)
    counts[hot] = np.maximum(1, 1e7 / np.arange(1, len(hot) + 1)).astype(np.int64)  # Zipf counts
    save_profile(store, TABLE, counts)
    return hot


def _io_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return -1


def measure_open(store: Path, *, policy: str, host: int, device: int, first_id: int) -> dict[str, Any]:
    info = tierstore.open(store, device="cpu").tables[TABLE]
    files = [store / info.file, store / info.checksum_file]
    snap = snapshot_path(store, TABLE)
    if snap.exists():
        files.append(snap)
    evict(*files)
    resident = {f.name: resident_bytes(f) for f in files}
    io0 = _io_read_bytes()
    t0 = time.perf_counter()
    s = tierstore.open(store, device="cpu", device_budget=device, host_budget=host, policy=policy)
    t_open = time.perf_counter() - t0
    s.lookup(TABLE, np.array([first_id]))
    t_first = time.perf_counter() - t0
    io = _io_read_bytes() - io0
    o = s.stats()["open"]
    s.close()
    return {"open_s": t_open, "first_row_s": t_first, "bytes_read": o["bytes_read"], "proc_read_bytes": io,
            "rows_loaded": o["rows_loaded"], "source": o["source"], "snapshot": o["snapshot"],
            "resident_after_evict": resident}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1GiB,4GiB", help="table sizes (comma-separated)")
    p.add_argument("--hot", default="64MiB", help="bytes of scattered profiled rows; the host budget holds them")
    p.add_argument("--policies", default="static,default")
    p.add_argument("--repeats", type=int, default=1, help="opens per (size, policy, path); the median is reported")
    p.add_argument("--quick", action="store_true", help="tiny sizes (8MiB, 16MiB tables, 1MiB hot): for the test")
    p.add_argument("--cache-dir", default=os.environ.get("TIERSTORE_BENCH_CACHE", "/tmp/tierstore_bench_cache"))
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.hot = "8MiB,16MiB", "1MiB"
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    hot_bytes = parse_size(args.hot)
    hot_rows = hot_bytes // ROW_BYTES
    host, device = hot_rows * ROW_BYTES, hot_rows * ROW_BYTES // 4
    policies = args.policies.split(",")
    sizes = [parse_size(x) for x in args.sizes.split(",")]
    print_header("open with a scattered hot set: snapshot vs row file", machine_info(cache),
                 [f"tables: {', '.join(format_size(x) for x in sizes)} of {ROW_BYTES}-byte rows; "
                  f"hot set {format_size(hot_bytes)} ({hot_rows:,} rows) scattered; host budget = the hot set, "
                  f"device budget = 1/4; page cache evicted before every open"])
    result: dict[str, Any] = {"hot_bytes": host, "host_budget": host, "device_budget": device, "sizes": {}}
    for size in sizes:
        store = ensure_store(cache, size)
        hot = save_scattered_profile(store, hot_rows)
        snapshot_path(store, TABLE).unlink(missing_ok=True)
        for policy in policies:  # compile this policy's kernels before any timing
            with tierstore.open(store, device="cpu", device_budget=4096 * ROW_BYTES, host_budget=0,
                                policy=policy, use_profile=False) as s:
                s.lookup(TABLE, np.arange(8))
        per: dict[str, Any] = {}
        for mode in ("rows", "snapshot"):
            if mode == "snapshot":
                t = time.perf_counter()
                head = tierstore.save_snapshot(store)[TABLE]
                per["snapshot_write_s"] = time.perf_counter() - t
                per["snapshot_bytes"] = head["bytes"]
            for policy in policies:
                runs = [measure_open(store, policy=policy, host=host, device=device, first_id=int(hot[0]))
                        for _ in range(args.repeats)]
                r = sorted(runs, key=lambda x: x["first_row_s"])[len(runs) // 2]  # the median open
                r["first_row_s_all"] = [x["first_row_s"] for x in runs]
                per[f"{mode}/{policy}"] = r
                print(f"{format_size(size):>8} {policy:>8} {mode:>9}: open read {format_size(r['bytes_read']):>10} "
                      f"({r['bytes_read'] / host:5.2f}x hot; /proc/self/io {format_size(max(0, r['proc_read_bytes']))})"
                      f", open {r['open_s']:6.2f} s, first row {r['first_row_s']:6.2f} s  [{r['source']}]")
        for policy in policies:
            old, new = per[f"rows/{policy}"], per[f"snapshot/{policy}"]
            per[f"ratio/{policy}"] = {"bytes_old_over_new": old["bytes_read"] / max(1, new["bytes_read"]),
                                      "first_row_old_over_new": old["first_row_s"] / new["first_row_s"],
                                      "new_bytes_over_hot": new["bytes_read"] / host}
        snapshot_path(store, TABLE).unlink(missing_ok=True)
        result["sizes"][str(size)] = per
    json_line(result)
    return result


if __name__ == "__main__":
    main()
