"""The snapshot-write benchmark runs at a tiny size: the ratio is the one its own timings give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_snapshot

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_snapshot_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = bench_snapshot.main(["--quick", "--workdir", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(res))
    (r,) = res["ours"]["rounds"]
    assert r["vs_dd"] == pytest.approx(r["bytes_s"] / r["dd_bytes_s"]) == pytest.approx(res["ours"]["median_vs_dd"])
    assert res["hot_rows"] >= 16
    assert not (tmp_path / "w").exists(), "the scratch directory is removed"
