"""The per-call lookup benchmark runs at a tiny size and reports every policy, all hits."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_lookup

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_lookup_quick(capsys: pytest.CaptureFixture[str]) -> None:
    res = bench_lookup.main(["--quick", "--policies", "lru,static,default"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert [r["ids"] for r in res["results"]] == [64, 1024]
    for row in res["results"]:  # speed is the benchmark's to report, not a test's to assert
        for p in ("lru", "static", "default"):
            assert row[f"{p}_hit_ratio"] == 1.0, (p, row)  # the timed lookups are all hits, as documented
