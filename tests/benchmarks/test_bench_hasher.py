"""The hasher benchmark runs at a tiny size, agrees with its baseline and ends with a JSON line."""

from __future__ import annotations

import json

from benchmarks import bench_hasher

import pytest

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_hasher_quick(capsys):
    res = bench_hasher.main(["--quick", "--threads", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == res
    assert res["mismatches"] == 0, f"{res['mismatches']} row ids differ from the reference spelling"
    # the comparison covers every row id of the layer, and those ids are not degenerate
    assert res["ids_compared"] == res["positions"] * res["heads_per_layer"]
    assert res["distinct_ids"] > res["positions"]
