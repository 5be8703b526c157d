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
from tierstore.analysis.sizing import size_tiers
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
    assert got["device_bytes"] == got["device_rows"] * 264 and got["host_bytes"] == got["host_rows"] * 264
    assert got["device_rows"] < 60_000 and got["device_hit_ratio"] >= 0.3


def test_budgets_give_the_hit_ratios(v41_trace: Path, capsys: pytest.CaptureFixture[str]):
    assert cli(["size", "--trace", str(v41_trace), "--policy", "lru", "--device-budget", "1MiB",
                "--host-budget", "8MiB", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["budgets"][0]
    t = TableTrace(*zipf_rows(V41_ROWS, 60_000, s=1.0, universe=10**6), V41_ROWS)
    dev, host = (1 << 20) // 264, (8 << 20) // 264
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
