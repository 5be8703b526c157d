"""The device check: every test marked ``gpu`` and the GPU benchmarks, one JSON line.

    make gpu-check                     # installs the gpu extra (kvikio), then runs this
    python -m benchmarks.gpu_check [--rows 4194304] [--skip-tests] [--skip-e2e]

Parts, each against its baseline in the same process (with its goal):

1. ``tests``: ``pytest -m gpu tests`` (the stress test, kvikio vs POSIX, pinning, zero-copy,
   CapacityError, CUDA ids, generate on cuda), in a subprocess.
2. ``host_gather``: rows of a table held in the pinned host tier, gathered onto the GPU by
   the store (staged: CPU gather + one copy; zero-copy: the GPU reads pinned memory) vs
   ``index_select`` on a pinned tensor + ``.to("cuda", non_blocking=True)``, and the PCIe
   limit (one pinned buffer of the same bytes copied). Goal: store >= 0.8x the baseline.
3. ``cold``: cold reads through the store's disk tier (kvikio into GPU memory; also POSIX)
   vs raw ``kvikio.CuFile.pread`` of the same pages, under kvikio's GDS and compat modes,
   and fio 4K random reads on the same file when fio is installed. Goal: >= 0.8x raw.
4. ``device_gather``: the store with the table resident in GPU memory vs ``index_select``
   on a device tensor. Goal: >= 0.8x.
5. ``e2e``: ``benchmarks.bench_e2e --device cuda``: served vs resident decode and prefill
   tokens/s with identical tokens. Goal: warm >= 0.97x.

Headers say which path really ran (GDS or compat, pinned or zero-copy). Budget: under 8
minutes on one H100/H200. Without a CUDA device it prints "no CUDA device", runs nothing
and exits with status 77 (skipped; nonzero so that no one reads it as a pass).

Status: written without a GPU; it has never run on one. Its CPU-runnable pieces are
exercised by tests/benchmarks/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tierstore
from tierstore.format.spec import PAGE_SIZE
from tierstore.tiers.page_reader import _runs, evict_page_cache

from .common import machine_info, print_header
from .workloads import load_table, table_store

SKIPPED = 77  # exit status without a CUDA device (automake's "skipped")
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, *, min_s: float = 0.3, warmup: int = 2) -> float:
    """Mean seconds per call of ``fn`` over at least ``min_s`` (queued GPU work included:
    the device is synchronized before each clock read)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    n = max(3, int(min_s / est))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


# ----------------------------------------------------------------------------- 1. tests
def run_gpu_tests(timeout: float) -> dict[str, Any]:
    """``pytest -m gpu tests`` in a subprocess; counts from its summary line."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                           cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": timeout}
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail)}
    print(p.stdout[-4000:])
    return {"status": "ok" if p.returncode == 0 else "failed", "returncode": p.returncode, **counts,
            "seconds": round(time.perf_counter() - t0, 1), "summary": tail}


# ----------------------------------------------------------------------------- 2. host -> device gather
def bench_host_gather(store: Path, name: str, table: torch.Tensor, device: torch.device, *,
                      batch: int = 65536) -> dict[str, Any]:
    """Rows from host memory onto ``device`` (CPU: plain memory and a CPU "device", for the smoke test)."""
    cuda = device.type == "cuda"
    rows, dim = table.shape
    rb = dim * table.element_size()
    ids = np.random.default_rng(0).integers(0, rows, batch)
    ids_t = torch.from_numpy(ids)
    host = table.pin_memory() if cuda else table
    staging = torch.empty((batch, dim), dtype=table.dtype, pin_memory=cuda)
    out = torch.empty((batch, dim), dtype=table.dtype, device=device)

    def baseline() -> None:
        torch.index_select(host, 0, ids_t, out=staging)
        out.copy_(staging, non_blocking=True)

    res: dict[str, Any] = {"batch": batch, "row_bytes": rb}
    gbs = lambda s: batch * rb / s / 1e9  # noqa: E731 (row bytes moved per second)
    res["baseline_gb_s"] = gbs(seconds_per_call(baseline, device))
    res["pcie_one_buffer_gb_s"] = gbs(seconds_per_call(lambda: out.copy_(staging, non_blocking=True), device))
    for zc in ((False, True) if cuda else (False,)):
        with tierstore.open(store, device=device, device_budget=0, host_budget=rows * rb, zero_copy=zc) as s:
            key = "store_zero_copy" if zc else "store_staged"
            res[f"{key}_gb_s"] = gbs(seconds_per_call(lambda: s.lookup(name, ids, out=out), device))
            res[f"{key}_ratio"] = res[f"{key}_gb_s"] / res["baseline_gb_s"]
            assert torch.equal(out.cpu(), table[ids_t]), f"{key}: wrong rows"
    res["baseline_vs_pcie"] = res["baseline_gb_s"] / res["pcie_one_buffer_gb_s"]
    return res


# ----------------------------------------------------------------------------- 3. cold reads
def _pages_of(ids: np.ndarray, stride: int) -> np.ndarray:
    start = PAGE_SIZE + np.sort(ids) * stride
    return np.unique(np.concatenate([start // PAGE_SIZE, (start + stride - 1) // PAGE_SIZE]))


def raw_kvikio_pages_per_s(path: Path, page_sets: list[np.ndarray], device: torch.device) -> float:
    """Raw ``kvikio.CuFile.pread`` of the same pages (runs of adjacent pages coalesced, every
    future in flight at once), into one device buffer: the limit our reader is held to."""
    import kvikio

    buf = torch.empty((max(len(p) for p in page_sets), PAGE_SIZE), dtype=torch.uint8, device=device)
    evict_page_cache(path)
    with kvikio.CuFile(str(path), "r") as f:
        t0 = time.perf_counter()
        for pages in page_sets:
            starts, lengths = _runs(pages)
            futs = [f.pread(buf[s : s + k], int(k) * PAGE_SIZE, int(pages[s]) * PAGE_SIZE)
                    for s, k in zip(starts.tolist(), lengths.tolist())]
            for fut in futs:
                fut.get()
        dt = time.perf_counter() - t0
    return sum(len(p) for p in page_sets) / dt


def store_cold_pages_per_s(store: Path, name: str, batches: list[np.ndarray], device: torch.device,
                           reader: str) -> tuple[float, dict[str, Any]]:
    with tierstore.open(store, device=device, device_budget=0, host_budget=0, disk_reader=reader) as s:
        info = s.tables[name]
        out = torch.empty((max(len(b) for b in batches), info.dim), dtype=info.torch_dtype, device=device)
        rows_file = store / info.file
        evict_page_cache(rows_file)
        s.reset_stats()
        t0 = time.perf_counter()
        for b in batches:
            s.lookup(name, b, out=out[: len(b)])
        _sync(device)
        dt = time.perf_counter() - t0
        d = s.stats()["disk"]
    return d["pages_read"] / dt, {k: d[k] for k in ("reader", "reader_mode", "pages_read", "device_pages_read")}


def fio_randread_iops(path: Path, seconds: int = 8) -> float | None:
    """fio 4K random reads, O_DIRECT, libaio, queue depth 32, on the same file; None without fio."""
    if shutil.which("fio") is None:
        return None
    p = subprocess.run(["fio", "--name=r", f"--filename={path}", "--rw=randread", "--bs=4k", "--direct=1",
                        "--ioengine=libaio", "--iodepth=32", f"--runtime={seconds}", "--time_based",
                        "--output-format=json"], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    return float(json.loads(p.stdout)["jobs"][0]["read"]["iops"])


def bench_cold(store: Path, name: str, device: torch.device, *, batches: int = 16, batch: int = 8192) -> dict[str, Any]:
    import kvikio

    from tierstore.format.spec import read_manifest
    from tierstore.tiers.kvikio_reader import KvikioPageReader

    info = read_manifest(store).tables[name]
    depth = KvikioPageReader.__init__.__kwdefaults__["depth"]
    if kvikio.defaults.get("num_threads") < depth:  # the raw baseline gets the reads in flight our reader gets
        kvikio.defaults.set("num_threads", depth)
    rng = np.random.default_rng(1)
    id_sets = [np.unique(rng.integers(0, info.rows, batch)) for _ in range(batches)]
    page_sets = [_pages_of(b, info.row_stride) for b in id_sets]
    path = store / info.file
    res: dict[str, Any] = {"pages": int(sum(len(p) for p in page_sets)), "rows": int(sum(len(b) for b in id_sets))}
    for mode in ("OFF", "ON"):  # OFF: cuFile (GDS where nvidia-fs is loaded); ON: kvikio's POSIX path
        key = "gds" if mode == "OFF" else "compat"
        try:
            with kvikio.defaults.set("compat_mode", getattr(kvikio.CompatMode, mode)):
                raw = raw_kvikio_pages_per_s(path, page_sets, device)
                ours, how = store_cold_pages_per_s(store, name, id_sets, device, "kvikio")
        except Exception as e:  # e.g. OFF on a machine where cuFile cannot run at all
            res[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        res[key] = {"raw_kvikio_pages_s": raw, "store_pages_s": ours, "ratio": ours / raw, **how}
        print(f"   cold [{key}]: store {ours:,.0f} pages/s via {how['reader']}/{how['reader_mode']}, "
              f"raw kvikio {raw:,.0f} pages/s ({ours / raw:.2f}x)")
    posix, how = store_cold_pages_per_s(store, name, id_sets, device, "posix")
    res["posix"] = {"store_pages_s": posix, **how}
    res["fio_4k_randread_iops"] = fio_randread_iops(path)
    return res


# ----------------------------------------------------------------------------- 4. device-tier gather
def bench_device_gather(store: Path, name: str, table: torch.Tensor, device: torch.device, *,
                        batch: int = 65536) -> dict[str, Any]:
    rows, dim = table.shape
    rb = dim * table.element_size()
    ids = np.random.default_rng(2).integers(0, rows, batch)
    ids_dev = torch.from_numpy(ids).to(device)
    on_dev = table.to(device)
    out = torch.empty((batch, dim), dtype=table.dtype, device=device)
    gbs = lambda s: batch * rb / s / 1e9  # noqa: E731
    res: dict[str, Any] = {"batch": batch}
    res["index_select_gb_s"] = gbs(seconds_per_call(lambda: torch.index_select(on_dev, 0, ids_dev, out=out), device))
    with tierstore.open(store, device=device, device_budget=rows * rb, host_budget=0) as s:  # resident
        res["store_gb_s"] = gbs(seconds_per_call(lambda: s.lookup(name, ids, out=out), device))
        assert torch.equal(out.cpu(), table[torch.from_numpy(ids)]), "device tier: wrong rows"
    res["ratio"] = res["store_gb_s"] / res["index_select_gb_s"]
    del on_dev
    return res


# ----------------------------------------------------------------------------- 5. end to end
def run_e2e(timeout: float) -> dict[str, Any]:
    args = [sys.executable, "-m", "benchmarks.bench_e2e", "--device", "cuda", "--repeats", "2", "--prompts", "8",
            "--queued", "0"]
    try:
        p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": timeout}
    print(p.stdout[-3000:], p.stderr[-2000:] if p.returncode else "")
    if p.returncode != 0:
        return {"status": "failed", "returncode": p.returncode, "stderr": p.stderr[-500:]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    keep = ("resident_prefill_tok_s", "resident_decode_tok_s", "warm_prefill_tok_s", "warm_decode_tok_s",
            "cold_prefill_tok_s", "cold_decode_tok_s", "warm_prefill_ratio", "warm_decode_ratio",
            "cold_decode_ratio", "identical_tokens", "table_bytes", "device_budget", "host_budget")
    return {"status": "ok", **{k: out[k] for k in keep}}


# ----------------------------------------------------------------------------- main
def _part(res: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """Run one part; its error is recorded, not raised, so the JSON line always comes out."""
    t0 = time.perf_counter()
    print(f"== {key}", flush=True)
    try:
        res[key] = fn()
    except Exception as e:
        res[key] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    if isinstance(res[key], dict):
        res[key]["seconds"] = res[key].get("seconds", round(time.perf_counter() - t0, 1))
    print(f"   {key}: {json.dumps(res[key])[:600]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tierstore's device check: gpu tests + GPU benchmarks, one JSON line")
    ap.add_argument("--rows", type=int, default=1 << 22, help="rows of the benchmark table (256-byte rows)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing was run, nothing verified",
              file=sys.stderr)
        print(json.dumps({"bench": "gpu_check", "status": "skipped", "reason": "no CUDA device"}))
        return SKIPPED
    t_start = time.perf_counter()
    device = torch.device("cuda")
    try:
        from tierstore.tiers.kvikio_reader import kvikio_mode, load_kvikio

        kv = load_kvikio()
        kv_info = {"kvikio": kv.__version__, "kvikio_mode": kvikio_mode(kv)} if kv else {"kvikio": None}
    except tierstore.TierStoreError as e:
        kv, kv_info = None, {"kvikio": f"unusable: {e}"}
    res: dict[str, Any] = {"bench": "gpu_check", "gpu": torch.cuda.get_device_name(device),
                           "torch": torch.__version__, "cuda": torch.version.cuda, **kv_info}
    print_header("tierstore gpu_check", {**machine_info(REPO), **{k: v for k, v in res.items() if k != "bench"}})
    if not args.skip_tests:
        _part(res, "tests", lambda: run_gpu_tests(timeout=240))
    store, name = table_store(args.rows, 64, torch.float32, name="g.engram.memory.weight")
    table = load_table(store, name)
    _part(res, "host_gather", lambda: bench_host_gather(store, name, table, device))
    _part(res, "device_gather", lambda: bench_device_gather(store, name, table, device))
    del table
    if kv is not None:
        _part(res, "cold", lambda: bench_cold(store, name, device))
    else:
        res["cold"] = {"status": "skipped", "reason": "kvikio not installed (pip install -e '.[gpu]')"}
    if not args.skip_e2e:
        _part(res, "e2e", lambda: run_e2e(timeout=max(60.0, 450 - (time.perf_counter() - t_start))))
    g = lambda part, key: res.get(part, {}).get(key)  # noqa: E731
    res["goals"] = {
        "host_gather_staged>=0.8": (g("host_gather", "store_staged_ratio") or 0) >= 0.8,
        "host_gather_zero_copy>=0.8": (g("host_gather", "store_zero_copy_ratio") or 0) >= 0.8,
        "cold_gds>=0.8_raw": ((res.get("cold", {}).get("gds") or {}).get("ratio") or 0) >= 0.8,
        "cold_compat>=0.8_raw": ((res.get("cold", {}).get("compat") or {}).get("ratio") or 0) >= 0.8,
        "device_gather>=0.8": (g("device_gather", "ratio") or 0) >= 0.8,
        "e2e_warm_decode>=0.97": (g("e2e", "warm_decode_ratio") or 0) >= 0.97,
        "identical_tokens": g("e2e", "identical_tokens") is True,
    }
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(res))
    failed = res.get("tests", {}).get("status") not in (None, "ok") or any(
        isinstance(v, dict) and v.get("status") in ("error", "failed", "timeout") for v in res.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
