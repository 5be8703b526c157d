"""The device check (benchmarks/gpu_check.py): without CUDA it says so and runs nothing; its
benchmark functions run here at a tiny size on the CPU so they do not rot. On a GPU it runs
through ``make gpu-check`` (never run yet)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import gpu_check
from benchmarks.workloads import load_table, table_store
from tierstore.format.spec import read_manifest

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_without_cuda_it_says_so_and_exits_skipped():
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == gpu_check.SKIPPED == 77, p.stderr
    assert "no CUDA device" in p.stderr and "Traceback" not in p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"bench": "gpu_check", "status": "skipped",
                                                             "reason": "no CUDA device"}


def test_benchmark_functions_run_tiny_on_the_cpu(tmp_path):
    store, name = table_store(3000, 64, torch.float32, name="g.engram.memory.weight", cache=tmp_path)
    table = load_table(store, name)
    cpu = torch.device("cpu")
    h = gpu_check.bench_host_gather(store, name, table, cpu, batch=512)
    assert h["baseline_gb_s"] > 0 and h["store_staged_ratio"] > 0 and "store_zero_copy_gb_s" not in h
    d = gpu_check.bench_device_gather(store, name, table, cpu, batch=512)
    assert d["ratio"] > 0
    rate, how = gpu_check.store_cold_pages_per_s(store, name, [np.arange(0, 3000, 7)], cpu, "posix")
    assert rate > 0 and how["reader"] == "posix" and how["pages_read"] == len(
        gpu_check._pages_of(np.arange(0, 3000, 7), read_manifest(store).tables[name].row_stride))
