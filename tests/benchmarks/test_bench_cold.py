"""The cold-disk benchmark runs at a tiny size, its systems agree byte for byte, and it ends with JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_cold

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


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
        ours = r["systems"][res["ours"]]["rows_s"]
        # the store's paths run at fio's queue depth, on the store's own row file
        assert res["depths"] == [32] and r["systems"]["store d32"]["in_flight"] == 32
        assert r["systems"]["store+tiers d32"]["in_flight"] == 32
        if r["fio_iops"]["32"] is not None:
            st = r["systems"]["store d32"]
            assert r["store_vs_fio_iops"]["32"] == pytest.approx(st["iops"] / r["fio_iops"]["32"])
        assert r["ours_vs_memmap"] == pytest.approx(ours / r["systems"]["memmap"]["rows_s"])
    # cold means cold: eviction left nothing of the files just written in the page cache (the
    # checksum files stay mapped by the open stores, so their pages stay)
    residue = {f: b for f, b in res["resident_after_evict"].items() if not f.endswith(".sum")}
    assert len(residue) == 5 and (set(residue.values()) == {None} or set(residue.values()) == {0}), residue
    if res["rows_128"]["fio_iops_qd32"] is None:
        assert "NOT INSTALLED" in out


def test_the_disk_tier_path_agrees_with_plain_slicing(tmp_path: Path) -> None:
    """What the benchmark times as "ours" is the store's disk tier on the store built from the
    row file: rows that straddle pages (stride not dividing 4096) come back whole, and the
    tier really read them from its file (its page counter moved)."""
    import numpy as np

    from tierstore.format.spec import PAGE_SIZE

    size = 16 * PAGE_SIZE
    row_file = bench_cold.ensure_row_file(tmp_path, size)
    data = np.fromfile(row_file, dtype=np.uint8)
    for row_bytes in (128, 1000, 3000):
        store = bench_cold.ensure_store(tmp_path, row_file, row_bytes)
        ids = np.array([0, 3, 4, size // row_bytes - 1])
        want = np.stack([data[i * row_bytes:(i + 1) * row_bytes] for i in ids])
        tier = bench_cold.open_disk_tier(store, method="pread", threads=2, depth=8)
        try:
            for batch in (None, 1, 3):
                got = bench_cold.read_disk(tier, ids, batch=batch)
                assert (got == want).all(), f"row_bytes={row_bytes} batch={batch}: {int((got != want).sum())} bytes differ"
            assert tier.stats()["pages_read"] >= 3 * len(bench_cold.row_pages(ids, row_bytes))
        finally:
            tier.close()
