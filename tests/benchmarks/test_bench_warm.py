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


def test_bench_warm_phases_quick(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--phases: every open ran in its own process with each phase timed inside the open's
    own time, for both budgets and policies, and a fit per slot came out of them."""
    res = bench_warm.main(["--phases", "--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert len(res["budgets"]) == 2
    for per in res["budgets"].values():
        assert set(per) == {"new/default", "new/static"}
        for key, med in per.items():
            cpu, wall = med["open"]
            assert 0 < cpu and 0 < wall and med["slots"][0] > 0
            for name in ("ranking", "slab", "index", "warmth"):
                assert 0 <= med[name][0] <= cpu + 1e-3 and med[name][1] <= wall + 1e-3, (key, name)
        assert per["new/default"]["index: prefill"][0] > 0  # default prefills its ranked core
    assert set(res["fits"]) == {"new/default", "new/static"}
    assert all("per_slot" in f["open"] for f in res["fits"].values())


def test_bench_warm_vs_dd_timeline_quick(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--vs-dd --timeline: each open (a fresh process) times its first row after the open,
    and its phases: the host tier's early snapshot read and the device tier's copy from the
    host slab on threads of their own, every phase inside the open's time."""
    res = bench_warm.main(["--vs-dd", "--quick", "--timeline", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    (run,) = res["runs"]["new"]
    assert 0 < run["open_s"] <= run["first_row_s"]
    threads = {p["phase"]: p["thread"] for p in run["timeline"]}
    assert threads["EarlyLoad._read"] == "tierstore-early-load"
    assert threads["EarlyCopy._run"] == "tierstore-early-copy"
    assert {"CacheTier.preload[host]", "CacheTier.preload[device]", "Store._ranking"} <= set(threads)
    assert all(0 <= p["start"] <= p["end"] <= run["open_s"] + 1e-3 for p in run["timeline"])
