"""Shared benchmark helpers: timing, the machine header, honest page-cache eviction, the JSON line.

Every benchmark prints a header that says what machine and which code path really ran,
measures its baseline in the same process, and ends its output with one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tierstore.tiers.page_reader import evict_page_cache

__all__ = ["timed", "best_of", "machine_info", "print_header", "evict", "resident_bytes", "rss_anon", "fio", "json_line"]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def best_of(fn: Callable[[], Any], repeats: int, *, warmup: int = 1) -> float:
    """Fastest of ``repeats`` timed calls after ``warmup`` untimed ones (for warm, CPU-bound work)."""
    for _ in range(warmup):
        fn()
    return min(timed(fn)[0] for _ in range(repeats))


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _disk_of(path: str | os.PathLike[str]) -> dict[str, str]:
    """Block device, model, scheduler and filesystem holding ``path`` (best effort, Linux)."""
    info: dict[str, str] = {}
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    if os.path.exists(dev):
        real = os.path.realpath(dev)
        name = os.path.basename(real)
        disk = real if os.path.exists(f"{real}/queue") else os.path.dirname(real)  # partition -> its disk
        info["device"] = name
        info["model"] = _read(f"{disk}/device/model") or _read(f"{disk}/device/vendor") or "?"
        sched = _read(f"{disk}/queue/scheduler")
        info["scheduler"] = sched[sched.find("[") + 1:sched.find("]")] if "[" in sched else sched
        info["read_ahead_kb"] = _read(f"{disk}/queue/read_ahead_kb")
        info["rotational"] = _read(f"{disk}/queue/rotational")
    if shutil.which("findmnt"):
        fs = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", str(path)], capture_output=True, text=True).stdout
        info["fs"] = fs.strip()
    return info


def machine_info(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """CPU, cores, memory, kernel, Python and (given a path) the disk under it."""
    cpu = "?"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    if path is not None:
        info["disk"] = _disk_of(path)
    return info


def print_header(title: str, info: dict[str, Any], lines: Iterable[str] = ()) -> None:
    print(f"== {title}")
    for k, v in info.items():
        print(f"   {k}: {v}")
    for line in lines:
        print(f"   {line}")


def evict(*paths: str | os.PathLike[str]) -> None:
    """Drop each file from the page cache (``tierstore.tiers.page_reader.evict_page_cache``, which flushes dirty pages first).

    Close every map of a file first (numpy.memmap, LMDB environment): mapped pages stay.
    """
    for p in paths:
        evict_page_cache(p)


def resident_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes of ``path`` in the page cache, by util-linux ``fincore``; None if it is not installed."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True)
    try:
        return int(out.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def rss_anon() -> int:
    """This process's anonymous resident memory (``RssAnon`` of /proc/self/status), bytes: heap,
    slabs, policy state; not mapped files or shared memory. It never shrinks back much after a
    peak, so measure one configuration per process."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def fio(path: str | os.PathLike[str], *, rw: str, bs: str = "4k", iodepth: int = 32, runtime: float | None = None,
        size: str | int | None = None, direct: bool = True, offset: int = 0) -> dict[str, float] | None:
    """One fio job on ``path`` (libaio): ``{"iops", "bw_bytes" (per second), "lat_us" (mean
    completion latency)}`` of its read or write side, by ``rw``; None when fio is not installed
    (``apt-get install -y fio``). ``runtime`` runs time-based over the file; ``size`` bounds
    the bytes (and creates the file when writing); ``offset`` is where in the file they start
    (with ``size``: fio reads only that region, e.g. a row file's rows). Writes end with an fsync
    (``--end_fsync``), so a buffered write is counted to the disk, not to the page cache."""
    if shutil.which("fio") is None:
        return None
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--direct={int(direct)}",
           "--ioengine=libaio", f"--iodepth={iodepth}", "--output-format=json"]
    if runtime is not None:
        cmd += [f"--runtime={runtime}", "--time_based"]
    if size is not None:
        cmd += [f"--size={size}"]
    if offset:
        cmd += [f"--offset={offset}"]
    if "write" in rw:
        cmd += ["--end_fsync=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return {"iops": float(side["iops"]), "bw_bytes": float(side["bw_bytes"]),
            "lat_us": float(side["clat_ns"]["mean"]) / 1e3}


def json_line(result: dict[str, Any]) -> None:
    """The benchmark's last output line: one JSON object."""
    print(json.dumps(result, sort_keys=False))
