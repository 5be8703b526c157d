"""The end-to-end benchmark runs at a tiny size, serves identical tokens and ends with a JSON line."""

from __future__ import annotations

import json

from benchmarks import bench_e2e


def test_bench_e2e_quick(capsys):
    res = bench_e2e.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    assert res["identical_tokens"] is True, "store-served generation differs from resident"
    assert res["device_budget"] <= res["table_bytes"] / 10 and res["host_budget"] <= res["table_bytes"] / 4
    assert res["cold_tiers"]["disk_rows_read"] > 0
    assert res["resident_decode_tok_s"] > 0 and res["warm_decode_tok_s"] > 0
