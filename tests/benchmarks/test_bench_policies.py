"""The policy benchmark runs at a tiny size, our LRU matches the baseline exactly, JSON last."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_policies


def test_bench_policies_quick(capsys: pytest.CaptureFixture[str]) -> None:
    res = bench_policies.main(["--quick"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert res["lru_exact_diff"] == 0, "our LRU, one lookup at a time, differs from OrderedDict LRU"
    for name in bench_policies.SPEED_POLICIES:
        p = res["policies"][name]
        assert 0 < p["hit_ratio"] <= res["opt"]["hit_ratio"] + 1e-9, name
        assert p["lookups_s"] > 0
    assert res["baseline_lru_lookups_s"] > 0
