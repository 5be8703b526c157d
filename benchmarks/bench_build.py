"""`tierstore build` against a direct-I/O copy of the same checkpoint on the same disk.

The baseline is what the disk does with the same bytes and no work on them:
``dd if=CKPT of=COPY iflag=direct oflag=direct bs=16M conv=fsync`` (one reader, no page
cache, ending durable, as the build does). dd alternates a read and a write; the build
overlaps them (tierstore/format/writer.py), so a ratio near or above 1 is possible.

Each variant builds from a cold page cache (the checkpoint is evicted before every dd and
every build) in a child process measured by ``/usr/bin/time`` (peak RSS) and ``wait4``:

* ``plain``: an fp16 table [rows, 128] (256-byte rows) in one ``.safetensors``;
* ``ordered``: the same, ``--order-by-profile`` with a saved profile of 1% of the rows,
  scattered, Zipf counts (one sweep of the checkpoint writes the cold tail and collects the
  hot head, which is written last: tierstore/format/sweep.py);
* ``v41`` (``--v41``): a DeepSeek-V4.1-layout checkpoint of the same size (two fp8 tables
  with UE8M0 scales in shards of their own, benchmarks/v41_checkpoint.py): 264-byte rows
  read from two tensors and written at a 272-byte stride.

``--base-cwd``/``--base-python`` also run another checkout's build (e.g. main's) in the same
rounds, for a before/after against the same dd. Each round runs dd and then the builds, and
each ratio is against that round's dd: the disk's rate moves within minutes on the shared VM.

    python -m benchmarks.bench_build --gib 2 [--v41] [--repeats 2] [--workdir DIR] \\
        [--base-cwd /work/main --base-python /work/main/.venv/bin/python]
    python -m benchmarks.bench_build --quick      # 16 MiB, for the test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import evict, json_line, machine_info, print_header
from benchmarks.isolation import run_measured
from tierstore.format.profile import save_profile
from tierstore.format.spec import read_manifest
from tierstore.sizes import format_size

NAME = "model.layers.0.engram.memory.weight"
DIM = 128  # fp16 values per row: 256-byte rows
ALIGN = 4096


def write_plain(path: Path, nbytes: int, seed: int = 0) -> int:
    """An fp16 [rows, DIM] safetensors file of about ``nbytes``, data 4 KiB-aligned (so dd's
    O_DIRECT transfers are whole blocks), written 64 MiB at a time. Returns the rows."""
    rows = max(ALIGN // (2 * DIM), nbytes // (2 * DIM) // 16 * 16)
    size = rows * 2 * DIM
    entry = {NAME: {"dtype": "F16", "shape": [rows, DIM], "data_offsets": [0, size]}}
    head = json.dumps(entry).encode()
    head += b" " * (-(8 + len(head)) % ALIGN)  # the spec allows trailing spaces
    block = np.random.default_rng(seed).integers(0, 0x3C00, 32 << 20, dtype=np.uint16)  # finite fp16
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        left, i = size, 0
        while left:
            n = min(left, block.nbytes)
            f.write(((block + np.uint16(i)) & np.uint16(0x3BFF)).view(np.uint8)[:n].tobytes())
            left, i = left - n, i + 1
        f.flush()
        os.fsync(f.fileno())
    return rows


def save_hot_profile(store: Path, table: str, rows: int, seed: int = 1, fraction: float = 0.01) -> int:
    """A profile of ``fraction`` of ``rows`` (at least 16), scattered, Zipf counts; returns the hot rows."""
    rng = np.random.default_rng(seed)
    k = min(rows, max(16, int(rows * fraction)))
    counts = np.zeros(rows, dtype=np.int64)
    counts[rng.choice(rows, k, replace=False)] = np.maximum(1, 1e6 / np.arange(1, k + 1)).astype(np.int64)
    save_profile(store, table, counts)
    return k


def dd_copy(files: list[Path], work: Path) -> tuple[float, int]:
    """Seconds to copy ``files`` with direct I/O (sequentially, one dd each), and the bytes."""
    total, seconds = 0, 0.0
    for f in files:
        dst = work / "dd.copy"
        evict(f)
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={f}", f"of={dst}", "iflag=direct", "oflag=direct", "bs=16M", "conv=fsync"],
                       check=True, capture_output=True)
        seconds += time.perf_counter() - t0
        total += f.stat().st_size
        dst.unlink()
    return seconds, total


def build(python: str, cwd: str, ckpt: Path, out: Path, work: Path, *extra: str) -> dict[str, Any]:
    """One cold build in a child; its seconds, peak RSS and the write path it reported."""
    shutil.rmtree(out, ignore_errors=True)
    files = sorted(ckpt.glob("*.safetensors")) if ckpt.is_dir() else [ckpt]
    evict(*files)
    env = {**os.environ, "PYTHONPATH": cwd}
    r = run_measured([python, "-c", _TIMED_CLI, "build", str(ckpt), str(out), "--quiet", *extra],
                     log=work / "build.log", cwd=cwd, env=env)
    text = r.log.read_text()
    if r.returncode:
        raise RuntimeError(f"tierstore build failed ({r.returncode}): {text[-2000:]}")
    paths = sorted({str(t.source.get("write_path", "buffered (not recorded)")) for t in read_manifest(out).tables.values()})
    inside = float(text.split("BUILD_SECONDS")[-1].split()[0])
    return {"seconds": r.seconds, "build_seconds": inside, "peak_rss_bytes": r.max_rss_bytes,
            "rss_clean": r.rss_clean, "write_path": "/".join(paths)}


# `tierstore build ...` in a child that also prints how long the command itself took, from
# after its imports (torch's import alone is seconds on a loaded 2-core machine) to its exit.
# The CLI imports a command's module (and so torch) only when the command runs: import the
# build command's modules before the clock starts, or the figure counts them.
_IMPORTS = "import sys, time; import tierstore.format.build, tierstore_cli.store_cmds; from tierstore_cli.cli import main"
_TIMED_CLI = (f"{_IMPORTS}; t = time.perf_counter(); rc = main(sys.argv[1:]); "
              "print('BUILD_SECONDS', time.perf_counter() - t); sys.exit(rc)")


def variant(res: dict[str, Any], key: str, files: list[Path], ckpt: Path, work: Path, systems: dict[str, tuple[str, str]],
            repeats: int, *extra: str) -> None:
    """``repeats`` rounds of: dd of ``files``, then each system's build of ``ckpt``; each build's
    ratio is against the dd just before it (the disk's rate drifts within minutes here)."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    for _ in range(repeats):
        dd_s, nbytes = dd_copy(files, work)
        print(f"{key:>8} dd: {dd_s:6.2f} s  {format_size(nbytes / dd_s)}/s")
        for name, (python, cwd) in systems.items():
            b = build(python, cwd, ckpt, work / f"{key}-{name}", work, *extra)
            shutil.rmtree(work / f"{key}-{name}", ignore_errors=True)
            b.update(dd_seconds=dd_s, vs_dd=dd_s / b["build_seconds"], wall_vs_dd=dd_s / b["seconds"],
                     bytes_s=nbytes / b["build_seconds"])
            rounds[name].append(b)
            print(f"{key:>8} {name:>5}: {b['build_seconds']:6.2f} s  {format_size(b['bytes_s'])}/s  "
                  f"{b['vs_dd']:.2f}x dd   (wall {b['seconds']:.2f} s with start-up: {b['wall_vs_dd']:.2f}x)  "
                  f"peak RSS {format_size(b['peak_rss_bytes'])}  writes: {b['write_path']}")
    for name, rs in rounds.items():
        res[f"{key}_{name}"] = {"median_vs_dd": float(np.median([r["vs_dd"] for r in rs])),
                               "max_peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs), "rounds": rs}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="tierstore build vs a direct-I/O copy of the checkpoint")
    ap.add_argument("--gib", type=float, default=2.0, help="checkpoint size (default 2)")
    ap.add_argument("--quick", action="store_true", help="16 MiB, every variant, one round (the test)")
    ap.add_argument("--v41", action="store_true", help="also a V4.1-layout fp8 checkpoint of the same size")
    ap.add_argument("--workdir", default=None, help="scratch directory on the disk to measure (deleted after)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the build")
    ap.add_argument("--cwd", default=str(Path(__file__).resolve().parents[1]), help="checkout the build runs from")
    ap.add_argument("--base-cwd", default=None, help="another checkout (e.g. main's) whose build runs in the same rounds")
    ap.add_argument("--base-python", default=None, help="its interpreter (default --python)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of dd + builds per variant (default 2)")
    ap.add_argument("--hot-fraction", type=float, default=0.01,
                    help="the ordered build's profiled rows / the table's (default 0.01; a head over "
                         "sweep.HEAD_BYTES is spilled through the row file: one more write and read of the head)")
    ap.add_argument("--variants", default="plain,ordered", help="of plain,ordered (default both; --v41 adds v41)")
    args = ap.parse_args(argv)
    nbytes = 16 << 20 if args.quick else int(args.gib * 2**30)
    if args.quick:
        args.repeats = 1
    work = Path(args.workdir or f"/tmp/bench_build-{os.getpid()}").absolute()
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info(work)
    print_header("tierstore build vs dd (direct I/O copy)", info, [
        f"checkpoint {format_size(nbytes)}, build from {args.cwd} with {args.python}",
        "page cache: each checkpoint file evicted (fdatasync + posix_fadvise DONTNEED) before every dd and build",
        f"{os.cpu_count()} cores, shared with other jobs: compare only figures from the same run"])
    res: dict[str, Any] = {"bench": "build", "checkpoint_bytes": nbytes, "machine": info, "cwd": args.cwd}
    try:
        res["loadavg"] = os.getloadavg()
        systems = {"ours": (args.python, args.cwd)}
        if args.base_cwd:
            systems["base"] = (args.base_python or args.python, args.base_cwd)
        ckpt = work / "plain.safetensors"
        rows = write_plain(ckpt, nbytes)
        build(args.python, args.cwd, ckpt, work / "profiled", work)  # a store to hold the profile
        res["hot_rows"] = save_hot_profile(work / "profiled", NAME, rows, fraction=args.hot_fraction)
        for f in (work / "profiled" / "tables").glob("*.rows"):  # only its profile is used: free the disk
            f.unlink()
        variants = args.variants.split(",")
        if "plain" in variants:
            variant(res, "plain", [ckpt], ckpt, work, systems, args.repeats)
        if "ordered" in variants:
            variant(res, "ordered", [ckpt], ckpt, work, systems, args.repeats, "--order-by-profile", str(work / "profiled"))
        shutil.rmtree(work / "profiled", ignore_errors=True)
        ckpt.unlink()
        if args.v41 or args.quick:
            from benchmarks import v41_checkpoint as v41

            v41dir = v41.write_checkpoint(work / "v41", engram_vocab_size=v41.vocab_for_table_bytes(nbytes),
                                          compressed_vocab_size=16, pad_id=1, dense={})
            variant(res, "v41", sorted(v41dir.glob("*.safetensors")), v41dir, work, systems, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    json_line(res)
    return res


if __name__ == "__main__":
    main()
