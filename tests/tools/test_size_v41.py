"""`tierstore size` on a DeepSeek-V4.1 trace without the store: the table's rows and the
stored row size come from the trace (`tierstore trace` records them), the search never
simulates a tier of the table's size, and budgets can be asked the other way round."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_profile_scale import V41_ROWS, zipf_rows
from tierstore.analysis.simulate import TableTrace, Trace, save_trace, simulate_tiers
from tierstore.analysis.sizing import TierCosts, size_tiers
from tierstore.errors import TierStoreError
from tierstore.cache.index import budget_for, slots_within
from tierstore_cli.cli import main as cli

TABLE = "layers.1.engram.embed.weight"


@pytest.fixture
def v41_trace(tmp_path: Path) -> Path:
    rows, off = zipf_rows(V41_ROWS, 60_000, s=1.0, universe=10**6)
    p = tmp_path / "v41.trace.zst"
    save_trace(p, Trace({TABLE: TableTrace(rows, off, V41_ROWS)}, {"row_bytes": 264, "model": {"preset": "x"}}))
    return p


def test_size_without_a_store(v41_trace: Path, capsys: pytest.CaptureFixture[str]):
    assert cli(["size", "--trace", str(v41_trace), "--policy", "lru", "--device-hit", "0.3", "--total-hit", "0.5",
                "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sizes"][0]
    t = TableTrace(*zipf_rows(V41_ROWS, 60_000, s=1.0, universe=10**6), V41_ROWS)
    want = size_tiers(t.rows, n_rows=V41_ROWS, policy="lru", device_hit=0.3, total_hit=0.5, offsets=t.offsets,
                      table=TABLE).to_dict()
    assert {k: got[k] for k in want} == want
    # the budgets pay for the rows and the index's state, as a store counts them
    assert got["device_bytes"] == budget_for(got["device_rows"], 264, "lru")
    assert got["host_bytes"] == budget_for(got["host_rows"], 264, "lru")
    assert slots_within(got["device_bytes"], 264, "lru") == got["device_rows"]
    assert got["device_bytes"] > got["device_rows"] * 264
    assert got["device_rows"] < 60_000 and got["device_hit_ratio"] >= 0.3


def test_budgets_give_the_hit_ratios(v41_trace: Path, capsys: pytest.CaptureFixture[str]):
    assert cli(["size", "--trace", str(v41_trace), "--policy", "lru", "--device-budget", "1MiB",
                "--host-budget", "8MiB", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["budgets"][0]
    t = TableTrace(*zipf_rows(V41_ROWS, 60_000, s=1.0, universe=10**6), V41_ROWS)
    dev, host = slots_within(1 << 20, 264, "lru"), slots_within(8 << 20, 264, "lru")
    assert dev < (1 << 20) // 264  # the bookkeeping is paid out of the budget
    r = simulate_tiers(t.rows, dev, host, "lru", n_rows=V41_ROWS, offsets=t.offsets)
    assert (got["device_rows"], got["host_rows"]) == (dev, host)
    assert got["device_hit_ratio"] == r["device"]["hit_ratio"]
    assert got["disk_rows"] == r["host"]["misses"] and got["disk_bytes"] == r["host"]["misses"] * 264
    assert 0 < got["device_hit_ratio"] < got["total_hit_ratio"] < 1
    # no row size known: one clear line
    np.save(v41_trace.with_suffix(".npy"), t.rows)
    assert cli(["size", "--trace", str(v41_trace.with_suffix(".npy")), "--device-budget", "1MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row size" in err[0]


def test_budgets_give_the_expected_slowdown(v41_trace: Path, capsys: pytest.CaptureFixture[str]):
    """Each budget's hit ratios turned into a lookup time by the tier costs given, over the
    resident table's: worked out here from the simulation itself, not from the command."""
    t = TableTrace(*zipf_rows(V41_ROWS, 60_000, s=1.0, universe=10**6), V41_ROWS)
    slow = []
    for host_mib in (0, 2, 8):
        assert cli(["size", "--trace", str(v41_trace), "--policy", "lru", "--device-budget", "1MiB",
                    "--host-budget", f"{host_mib}MiB", "--tier-costs", "1,3,20,0.5", "--json"]) == 0
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["budgets"][0]
        dev, host = slots_within(1 << 20, 264, "lru"), slots_within(host_mib << 20, 264, "lru")
        r = simulate_tiers(t.rows, dev, host, "lru", n_rows=V41_ROWS, offsets=t.offsets)
        n = t.rows.size
        disk = r["host"]["misses"] if host else r["device"]["misses"]
        dev_hits = r["device"]["hit_ratio"]
        want = dev_hits * 1 + (1 - disk / n - dev_hits) * 3 + disk / n * 20
        assert got["lookup_us"] == pytest.approx(want, rel=1e-12)
        assert got["slowdown_vs_resident"] == pytest.approx(want / 0.5, rel=1e-12)
        slow.append(got["slowdown_vs_resident"])
    # a host tier serves rows the disk would: more host memory, less time
    assert slow[0] > slow[1] > slow[2] > 1
    # the targets' answer carries its own expected slowdown; the text output says it
    assert cli(["size", "--trace", str(v41_trace), "--policy", "lru", "--device-hit", "0.3", "--total-hit", "0.5",
                "--tier-costs", "1,3,20,0.5"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "x all rows resident" in line


def test_tier_costs_refuse_what_is_not_a_cost(v41_trace: Path, capsys: pytest.CaptureFixture[str]):
    for bad in ("1,2,3", "1,2,x,4", "1,2,3,0", "1,-2,3,4"):
        assert cli(["size", "--trace", str(v41_trace), "--device-budget", "1MiB", "--tier-costs", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "microseconds" in err[0], err  # names the value and the fix


def test_tier_cost_model():
    c = TierCosts(device_us=1.0, host_us=2.0, disk_us=10.0, resident_us=1.0)
    assert c.slowdown(device_hit=1.0, host_hit=0.0) == 1.0
    assert c.lookup_us(device_hit=0.5, host_hit=0.25) == pytest.approx(0.5 + 0.5 + 2.5)
    with pytest.raises(TierStoreError):
        c.lookup_us(device_hit=0.8, host_hit=0.3)
