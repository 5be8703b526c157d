"""Writing a hot-set snapshot (``tierstore.save_snapshot``) against a direct-I/O copy of as many bytes.

The snapshot reads the profile's ranked rows (scattered over the row file) and writes them
packed in rank order. The baseline is what the disk does with that many bytes and no work:
``dd iflag=direct oflag=direct bs=16M conv=fsync`` of the hot rows' bytes from the row file.
Each round evicts the row file from the page cache (``posix_fadvise``), runs dd, then each
system's ``save_snapshot`` in a child (``--base-cwd``: another checkout, e.g. main's, in the
same rounds); each ratio is against that round's dd.

    python -m benchmarks.bench_snapshot --gib 3 --hot-gib 1 [--repeats 2] [--workdir DIR] \\
        [--base-cwd /tmp/main-checkout]
    python -m benchmarks.bench_snapshot --quick      # 16 MiB, for the test
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_build import NAME, save_hot_profile, write_plain
from benchmarks.common import evict, json_line, machine_info, print_header
from tierstore.sizes import format_size

_CHILD = ("import sys, time, resource, tierstore\n"
          "def io():\n"
          "    d = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())\n"
          "    return int(d['read_bytes']), int(d['write_bytes'])\n"
          "r0, w0 = io(); t = time.perf_counter(); h = tierstore.save_snapshot(sys.argv[1])\n"
          "s = time.perf_counter() - t; r1, w1 = io()\n"
          "print('SNAP_SECONDS', s, 'SNAP_ROWS', sum(v['n'] for v in h.values()), 'SNAP_READ', r1 - r0,\n"
          "      'SNAP_WRITTEN', w1 - w0, 'SNAP_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def dd_bytes(src: Path, nbytes: int, work: Path) -> float:
    """Seconds to copy the first ``nbytes`` (whole 16 MiB blocks, at least one) of ``src`` with direct I/O."""
    evict(src)
    dst = work / "dd.copy"
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={src}", f"of={dst}", "iflag=direct", "oflag=direct", "bs=16M",
                    f"count={max(1, nbytes >> 24)}", "conv=fsync"], check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    dst.unlink()
    return seconds


def snapshot(python: str, cwd: str, store: Path, rows_file: Path) -> tuple[float, int, dict[str, int]]:
    """One cold ``save_snapshot`` in a child: its seconds (after imports), the rows written, and
    its disk bytes read and written (``/proc/self/io``) and peak RSS."""
    evict(rows_file)
    r = subprocess.run([python, "-c", _CHILD, str(store)], cwd=cwd, env={**os.environ, "PYTHONPATH": cwd},
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"save_snapshot failed ({r.returncode}): {r.stderr[-2000:]}")
    words = r.stdout.split()
    extra = {k.lower(): int(words[words.index(f"SNAP_{k}") + 1]) for k in ("READ", "WRITTEN", "RSS")}
    return float(words[words.index("SNAP_SECONDS") + 1]), int(words[words.index("SNAP_ROWS") + 1]), extra


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="tierstore.save_snapshot vs a direct-I/O copy of the hot bytes")
    ap.add_argument("--gib", type=float, default=3.0, help="table size (default 3)")
    ap.add_argument("--hot-gib", type=float, default=1.0, help="hot set, scattered (default 1)")
    ap.add_argument("--quick", action="store_true", help="16 MiB table, 4 MiB hot, one round (the test)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="scratch directory on the disk to measure (deleted after)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--base-cwd", default=None, help="another checkout whose save_snapshot runs in the same rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.gib, args.hot_gib, args.repeats = 16 / 1024, 4 / 1024, 1
    import tierstore

    work = Path(args.workdir or f"/tmp/bench-snapshot-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    here = str(Path(__file__).resolve().parents[1])
    systems = {"ours": here, **({"base": args.base_cwd} if args.base_cwd else {})}
    print_header("save_snapshot vs dd of the hot bytes", machine_info(work),
                 [f"table {args.gib:g} GiB, hot set {args.hot_gib:g} GiB scattered; row file evicted before each run",
                  "2 cores, shared with other jobs: compare only figures from the same run"])
    res: dict[str, Any] = {"gib": args.gib, "hot_gib": args.hot_gib, "loadavg": os.getloadavg()[0]}
    try:
        ckpt = work / "m.safetensors"
        rows = write_plain(ckpt, int(args.gib * (1 << 30)))
        store = tierstore.build_store(ckpt, work / "store", progress=False)
        ckpt.unlink()
        info = next(iter(tierstore.format.spec.read_manifest(store).tables.values()))
        hot = save_hot_profile(store, NAME, rows, fraction=args.hot_gib / args.gib)
        hot_bytes = hot * info.row_bytes
        rows_file = store / info.file
        rounds: dict[str, list[dict[str, float]]] = {k: [] for k in systems}
        for _ in range(args.repeats):
            dd_s = dd_bytes(rows_file, hot_bytes, work)
            dd_rate = max(1, hot_bytes >> 24) * (16 << 20) / dd_s
            print(f"dd: {dd_s:6.2f} s  {format_size(dd_rate)}/s")
            for name, cwd in systems.items():
                s, n, extra = snapshot(args.python, cwd, store, rows_file)
                assert n == hot, (n, hot)
                r = {"seconds": s, "bytes_s": hot_bytes / s, "dd_bytes_s": dd_rate, "vs_dd": hot_bytes / s / dd_rate,
                     "read_bytes_s": extra["read"] / s, "written_bytes_s": extra["written"] / s,
                     "peak_rss": extra["rss"], "load": os.getloadavg()[0]}
                rounds[name].append(r)
                print(f"{name:>5}: {s:6.2f} s  {format_size(r['bytes_s'])}/s  {r['vs_dd']:.3f}x dd  "
                      f"disk read {format_size(r['read_bytes_s'])}/s written {format_size(r['written_bytes_s'])}/s  "
                      f"peak RSS {format_size(r['peak_rss'])}  load {r['load']:.1f}")
        for name, rs in rounds.items():
            res[name] = {"median_bytes_s": float(np.median([r["bytes_s"] for r in rs])),
                         "median_vs_dd": float(np.median([r["vs_dd"] for r in rs])), "rounds": rs}
        res["hot_rows"] = hot
        res["loadavg_end"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    json_line(res)
    return res


if __name__ == "__main__":
    main()
