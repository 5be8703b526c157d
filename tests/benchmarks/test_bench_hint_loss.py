"""The hint table loses hints at the rate a direct-mapped table of its size should, no more."""

from __future__ import annotations

import pytest

from benchmarks import bench_hint_loss


def test_hint_loss_matches_the_direct_mapped_rate(capsys: pytest.CaptureFixture[str]) -> None:
    res = bench_hint_loss.main(["--slots", "4096", "--fractions", "0.25,1", "--seeds", "2"])
    assert "hint_loss" in capsys.readouterr().out
    for p in res["points"]:
        assert p["buckets"] == 4096  # one bucket per dynamic slot
        assert p["lost"] == pytest.approx(p["analytic"], abs=0.03), p
    # negative control: a quarter of the slots hinted loses about a tenth, all of them over a third
    assert res["points"][0]["lost"] < 0.15 < 0.3 < res["points"][1]["lost"]
