"""`tierstore profile` at DeepSeek-V4.1 scale: memory follows the trace and the capacities,
never the table's 384,006,168 rows (issue 21: the profiler took 6.33 GiB for a 20M-id trace).

The bound is linear in what a run holds: the interpreter with numpy/numba loaded, a fixed
cost per lookup of both traces (the trace, its sort for the profile, stack distances and
next uses: ~100 B each), and a cost per slot of the largest capacity (a policy's state and
its row map: ~60-250 B). Any array with one byte per table row adds 384 MB and breaks it;
the one the rank-frequency plot built (a bincount up to the largest id) was 3 GB.
"""

from __future__ import annotations

import pytest

from benchmarks import bench_profile_scale as bench

BASE = 450 << 20  # python + numpy + numba + matplotlib, measured ~330 MB
PER_LOOKUP = 160  # bytes per lookup of the test trace and of the profile trace together
PER_SLOT = 500  # bytes per slot of the largest capacity


@pytest.mark.slow
def test_profile_memory_is_bounded_by_the_trace_and_the_capacities(tmp_path):
    lookups, caps = 2_000_000, "0.00001,0.0001,0.001"  # 3,840 / 38,401 / 384,006 slots
    out = bench.main(["--lookups", str(lookups), "--capacity", caps, "--rank-plot", "--work", str(tmp_path)])
    bound = BASE + PER_LOOKUP * 2 * lookups + PER_SLOT * 384_006
    assert out["peak_rss_bytes"] <= bound, (
        f"peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB for {lookups:,} lookups "
        f"over {bench.V41_ROWS:,} rows: something is sized by the table")
    by = {(r["capacity_rows"], r["policy"]): r["hit_ratio"] for r in out["results"]}
    assert len(by) == 18 and (tmp_path / "rank.png").stat().st_size > 0
    for (cap, pol), v in by.items():  # the runs are real: nothing beats the optimum
        assert 0 < v <= by[(cap, "opt")] + 1e-9, (cap, pol, v)
