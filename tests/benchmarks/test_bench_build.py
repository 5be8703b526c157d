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


def test_the_timed_region_starts_after_the_build_imports() -> None:
    """Regression: the CLI imports the build command's modules (torch among them) only when the
    command runs, so the figure counted ~1-3 s of imports (0.5x dd where the build ran 0.9x)."""
    import subprocess
    import sys

    code = bench_build._TIMED_CLI.split("t = time.perf_counter()")[0]
    code += "print(sorted(m for m in ('torch', 'tierstore.format.build', 'numpy') if m not in sys.modules))"
    root = Path(bench_build.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"imported after the clock starts: {out.stdout}"
