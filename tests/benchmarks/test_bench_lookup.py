"""The per-call lookup benchmark runs at a tiny size and reports every policy, all hits."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_lookup


def test_bench_lookup_quick(capsys: pytest.CaptureFixture[str]) -> None:
    res = bench_lookup.main(["--quick", "--policies", "lru,static,default"])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert [r["ids"] for r in res["results"]] == [64, 1024]
    for row in res["results"]:
        for p in ("lru", "static", "default"):
            # bookkeeping can only add to the resident gather of the same rows
            assert row[f"{p}_us"] >= 0.5 * row["resident_us"], (p, row)
