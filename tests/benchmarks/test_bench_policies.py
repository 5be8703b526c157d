"""The policy benchmark runs at a tiny size, our LRU matches the baseline exactly, JSON last."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_policies

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_policies_quick(capsys: pytest.CaptureFixture[str]) -> None:
    res = bench_policies.main(["--quick"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert res["lru_exact_diff"] == 0, "our LRU, one lookup at a time, differs from OrderedDict LRU"
    assert res["lru_curve_exact_diff"] == 0, "LRU from stack distances differs from OrderedDict LRU"
    for name in bench_policies.SPEED_POLICIES:
        p = res["policies"][name]
        assert 0 < p["hit_ratio"] <= res["opt"]["hit_ratio"] + 1e-9, name
    # one access at a time, LRU timed three ways counts the same hits: through simulate, through
    # the walk itself, and read off the stack-distance curve of 50 capacities from one pass
    lru = res["policies"]["lru"]["hit_ratio"]
    assert res["lru_walk"]["hit_ratio"] == lru and res["lru_exact"]["hit_ratio"] == lru
    curve = dict(res["lru_exact"]["curve"])
    caps = sorted(curve)
    assert len(caps) == res["lru_exact"]["capacities"] > 10
    assert [curve[c] for c in caps] == sorted(curve.values()), "LRU's hit ratio cannot fall as the cache grows"
    cap = res["capacity_rows"]  # the walk's figure sits between the curve's neighbours (5 decimals)
    below, above = max(c for c in caps if c <= cap), min(c for c in caps if c >= cap)
    assert curve[below] - 1e-5 <= lru <= curve[above] + 1e-5, (curve[below], lru, curve[above])
