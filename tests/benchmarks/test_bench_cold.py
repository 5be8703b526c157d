"""The cold-disk benchmark runs at a tiny size, its systems agree byte for byte, and it ends with JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_cold


def test_bench_cold_quick(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    res = bench_cold.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert "O_DIRECT" in out or "buffered" in out, "the header must say which I/O path ran"
    assert res["mismatches"] == 0, f"{res['mismatches']} rows differ between PageReader, memmap and LMDB"
    assert res["ours"].startswith("auto=")
    for s in (128, 1024):
        r = res[f"rows_{s}"]
        assert set(r["systems"]) >= {res["ours"], "fadvise", "pread", "memmap", "lmdb"}
        assert all(v["rows_s"] > 0 and v["iops"] > 0 for v in r["systems"].values())
        assert r["ours_vs_memmap"] > 0 and r["ours_vs_lmdb"] > 0
    if res["rows_128"]["fio_iops_qd32"] is None:
        assert "NOT INSTALLED" in out


def test_row_pages_and_gather_agree_with_plain_slicing() -> None:
    """Rows that straddle pages (stride not dividing 4096) come back whole."""
    import numpy as np

    from tierstore.tiers.page_reader import PAGE_SIZE

    data = np.random.default_rng(0).integers(0, 256, 8 * PAGE_SIZE, dtype=np.uint8)

    class FakeReader:
        def read_pages(self, pages: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
            return data.reshape(-1, PAGE_SIZE)[pages]

    for row_bytes in (128, 1024, 1000, 3000):
        ids = np.array([0, 3, 4, (8 * PAGE_SIZE) // row_bytes - 1])
        got = bench_cold.read_ours(FakeReader(), ids, row_bytes)  # type: ignore[arg-type]
        want = np.stack([data[i * row_bytes:(i + 1) * row_bytes] for i in ids])
        assert (got == want).all(), f"row_bytes={row_bytes}: max diff {np.abs(got.astype(int) - want).max()}"
