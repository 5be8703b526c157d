"""The warm benchmark runs at a tiny size, both modes really ran, and it ends with JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_warm

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_warm_quick(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    res = bench_warm.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    for mode in bench_warm.MODES:
        (r,) = res["runs"][mode]
        assert r["warm"] == 1.0 and r["placed"] > 0  # every placed row in place at the end
        assert r["open_s"] <= r["first_row_s"] <= r["first_batch_s"] <= r["workload_s"]
    assert res["runs"]["open"][0]["on_demand"] == 0
    assert set(res["ratio_open_over_background"]) == {"open_s", "first_row_s", "first_batch_s", "workload_s", "warm_s"}
