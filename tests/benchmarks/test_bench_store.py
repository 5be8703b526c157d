"""The store benchmarks run at a tiny size, agree with their baselines, and end with JSON."""

from __future__ import annotations

import json

from benchmarks import bench_host_gather, bench_mixed


def test_bench_host_gather_quick(capsys, tmp_path):
    res = bench_host_gather.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert {(r["row_bytes"], r["ids"]) for r in res["results"]} == {
        (128, "uniform"), (128, "zipf1.0"), (1024, "uniform"), (1024, "zipf1.0")}
    for r in res["results"]:
        assert r["index_select_out_GBps"] > 0 and r["index_select_slab_GBps"] > 0 and r["store_out_GBps"] > 0
        assert r["ratio_out"] > 0 and r["ratio_cached"] > 0 and 0 < r["cache_hit_ratio"] <= 1


def test_bench_mixed_quick(capsys, tmp_path):
    res = bench_mixed.main(["--quick", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    assert 0 < res["device_hit_ratio"] < 1 and res["disk_rows_per_lookup"] > 0
    assert res["all_in_memory_lookups_per_s"] > 0 and 0 <= res["ready_at_result"] <= 1


def test_bench_distributed_quick(capsys, tmp_path):
    from benchmarks import bench_distributed

    res = bench_distributed.main(["--quick", "--no-text", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == res
    by_world = {r["ranks"]: r for r in res["ranks"]}
    assert by_world[1]["bytes_sent_per_lookup"] == 0  # one rank owns every row
    assert by_world[2]["bytes_sent_per_lookup"] > 0 and by_world[2]["lookups_per_s_total"] > 0
    assert 0 < by_world[2]["dedup_ratio"] <= 1
