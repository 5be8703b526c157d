"""The store benchmarks run at a tiny size, agree with their baselines, and end with JSON."""

from __future__ import annotations

import json

from benchmarks import bench_host_gather, bench_mixed

import pytest

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_host_gather_quick(capsys, tmp_path):
    res = bench_host_gather.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert {(r["row_bytes"], r["ids"]) for r in res["results"]} == {
        (128, "uniform"), (128, "zipf1.0"), (1024, "uniform"), (1024, "zipf1.0")}
    for r in res["results"]:
        # the cached system is timed on hits only: the benchmark filled its cache first
        assert r["cache_hit_ratio"] == 1.0, r


def test_bench_mixed_quick(capsys, tmp_path):
    res = bench_mixed.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    # all three tiers serve: the device tier some ids, the host tier some of its misses, disk the rest
    assert 0 < res["device_hit_ratio"] < 1 and 0 < res["host_hit_ratio"] < 1 and res["disk_rows_per_lookup"] > 0
    assert res["metadata_bytes_per_table_row"] == 0.0, "no state per table row: the row -> slot map is sized to the cache"


def test_bench_distributed_quick(capsys, tmp_path):
    from benchmarks import bench_distributed

    res = bench_distributed.main(["--quick", "--no-text", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    by_world = {r["ranks"]: r for r in res["ranks"]}
    assert by_world[1]["bytes_sent_per_lookup"] == 0  # one rank owns every row
    # two ranks: every id that crosses to its owner comes back as a row (8 B out, 256 B back)
    sent = by_world[2]["bytes_sent_per_lookup"] * 2 * 3  # 2 ranks x 3 lookups
    assert round(sent) > 0 and abs(sent - round(sent)) < 1e-6 and round(sent) % (8 + res["row_bytes"]) == 0, sent
    # each rank asks an owner for a row once per lookup, however often its ids repeat it (Zipf ids)
    assert 0 < by_world[2]["dedup_ratio"] < 1
