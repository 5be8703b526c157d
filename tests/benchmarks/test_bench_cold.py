"""The cold-disk benchmark runs at a tiny size, its systems agree byte for byte, and it ends with JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_cold


def test_bench_cold_quick(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    res = bench_cold.main(["--quick", "--cache-dir", str(tmp_path), "--methods", "fadvise,pread"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert "O_DIRECT" in out or "buffered" in out, "header must say which I/O path ran"
    assert res["mismatches"] == 0, f"{res['mismatches']} rows differ between PageReader, memmap and LMDB"
    for s in (128, 1024):
        r = res[f"rows_{s}"]
        assert r["fadvise_rows_s"] > 0 and r["memmap_rows_s"] > 0 and r["lmdb_rows_s"] > 0
        assert r["ours_vs_memmap"] > 0 and r["ours_vs_lmdb"] > 0
    if res["fio_iops_qd32"] is None:
        assert "NOT INSTALLED" in out
