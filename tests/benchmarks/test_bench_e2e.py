"""The end-to-end benchmark runs at a tiny size, serves identical tokens and ends with a JSON line."""

from __future__ import annotations

import json

from benchmarks import bench_e2e

import pytest

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_e2e_quick(capsys):
    res = bench_e2e.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    assert res["identical_tokens"] is True, "store-served generation differs from resident"
    assert res["device_budget"] <= res["table_bytes"] / 10 and res["host_budget"] <= res["table_bytes"] / 4
    # cold: the first rows come from disk; warm: the tiers filled by earlier traffic serve most
    assert res["warm_tiers"]["disk_rows_read"] < res["cold_tiers"]["disk_rows_read"]
    # and memory (device + host) answers more of the same lookups. The device tier alone is
    # 122 slots of 16-byte rows here: since the per-slot state changed (and the slot count
    # with it), its hits are the same cold and warm (12 of 368), so it alone is no test
    mem = {k: res[k]["device_hits"] + res[k]["host_hits"] for k in ("cold_tiers", "warm_tiers")}
    assert mem["warm_tiers"] > mem["cold_tiers"], res
    # queued-request mode: the live tiers' counters equal the simulator's replay of the same run
    queued = {L: q for L, q in res["queued"].items() if L != "identical_tokens"}
    assert len(queued) == 2 and all(q["agree"] for q in queued.values()), queued
    assert res["queued"]["identical_tokens"] is True
