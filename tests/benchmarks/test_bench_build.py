"""The build benchmark runs at a tiny size: every variant builds, says which write path ran,
and the ratios are the ones its own timings give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_build

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_build_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = bench_build.main(["--quick", "--workdir", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(res))
    for key in ("plain", "ordered", "v41"):
        v = res[f"{key}_ours"]
        (b,) = v["rounds"]
        assert b["write_path"] in ("O_DIRECT", "buffered"), b  # the path that ran, from the manifest
        assert b["vs_dd"] == pytest.approx(b["dd_seconds"] / b["build_seconds"]) == pytest.approx(v["median_vs_dd"])
        assert 0 < b["build_seconds"] <= b["seconds"]
        assert v["max_peak_rss_bytes"] == b["peak_rss_bytes"] > 0
    assert res["hot_rows"] >= 16
    assert not (tmp_path / "w").exists(), "the scratch directory is removed"
