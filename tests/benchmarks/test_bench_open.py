"""The open benchmark runs at a tiny size, its two paths agree, and it ends with JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_open

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_open_quick(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    res = bench_open.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert len(res["sizes"]) == 2
    for per in res["sizes"].values():
        for policy in ("static", "default"):
            old, new = per[f"rows/{policy}"], per[f"snapshot/{policy}"]
            assert old["snapshot"] == "none" and old["source"] == "host+rows"  # the baseline really ran
            assert new["snapshot"] == "ok" and new["source"] == "host+snapshot"
            assert old["rows_loaded"] == new["rows_loaded"] > 0
            assert new["bytes_read"] <= 1.2 * res["hot_bytes"] < old["bytes_read"]
            assert per[f"ratio/{policy}"]["bytes_old_over_new"] == pytest.approx(old["bytes_read"] / new["bytes_read"])
