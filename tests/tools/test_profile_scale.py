"""`tierstore profile` at DeepSeek-V4.1 scale: memory follows the trace and the capacities,
never the table's 384,006,168 rows (issue 21: the profiler took 6.33 GiB for a 20M-id trace).

The bound is linear in what a run holds: the interpreter with numpy, numba and matplotlib
loaded, a cost per lookup of both traces (the trace itself, the profile trace's sort, stack
distances, next uses), and a cost per slot of the largest capacity (a policy's state and
its row map: ~60-250 B). Measured: 344 MiB for 2M + 2M lookups up to 384K slots (the
bound below is 576 MiB), 1.36 GiB for 20M + 20M up to 3.84M slots (`python -m
benchmarks.bench_profile_scale --rank-plot`). One byte per table row adds 366 MiB and
breaks it; the rank-frequency plot's bincount up to the largest id was 3 GB.
"""

from __future__ import annotations

import pytest

from benchmarks import bench_profile_scale as bench

BASE = 320 << 20  # python + numpy + numba + matplotlib
PER_LOOKUP = 40  # bytes per lookup, of the test trace and of the profile trace
PER_SLOT = 250  # bytes per slot of the largest capacity


@pytest.mark.slow
def test_profile_memory_is_bounded_by_the_trace_and_the_capacities(tmp_path):
    # 2M lookups and up to 0.1% of the table keep the run near 20 s on 2 cores; 1% (3.84M
    # slots) is the benchmark's. The capacities are a user's: 0.001% / 0.01% / 0.1% of V4.1's
    # table, 3,840 / 38,401 / 384,006 rows (1 MB / 10 MB / 101 MB of 264-byte rows).
    lookups, caps = 2_000_000, "0.00001,0.0001,0.001"
    out = bench.main(["--lookups", str(lookups), "--capacity", caps, "--rank-plot", "--work", str(tmp_path)])
    bound = BASE + PER_LOOKUP * 2 * lookups + PER_SLOT * 384_006
    assert out["peak_rss_bytes"] <= bound, (
        f"peak RSS {out['peak_rss_bytes'] / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB for {lookups:,} lookups "
        f"over {bench.V41_ROWS:,} rows: something is sized by the table")
    by = {(r["capacity_rows"], r["policy"]): r["hit_ratio"] for r in out["results"]}
    assert len(by) == 18 and (tmp_path / "rank.png").stat().st_size > 0
    for (cap, pol), v in by.items():  # the runs are real: nothing beats the optimum
        assert 0 < v <= by[(cap, "opt")] + 1e-9, (cap, pol, v)
