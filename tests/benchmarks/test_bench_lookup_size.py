"""The lookup-size benchmark runs at a tiny size and reports every case it was asked for."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_lookup_size

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_lookup_size_quick(capsys: pytest.CaptureFixture[str]) -> None:
    res = bench_lookup_size.main(["--quick", "--policies", "lru,default"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    cases = [(r["policy"], r["profile"]) for r in res["results"]]
    assert cases == [("resident", "none"), ("lru", "profile"), ("default", "profile"), ("lru", "none"),
                     ("default", "none")]
    for row in res["results"]:  # speed is the benchmark's to report, not a test's to assert
        for kind in ("miss", "repeat"):
            for n in res["sizes"]:
                assert row[f"{kind}_{n}_us_per_id"] > 0, (row, kind, n)
            assert row[f"{kind}_growth"] > 0
