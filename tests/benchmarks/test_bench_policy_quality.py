"""The policy-quality benchmark runs end to end on a tiny model and small stdlib traces."""

from __future__ import annotations

import json

from benchmarks import bench_e2e, bench_policy_quality

import pytest

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_bench_policy_quality_tiny(tmp_path, capsys):
    ckpt = bench_e2e._train_small(tmp_path / "ckpt", quick=True)
    bench_policy_quality.main(["--checkpoint", str(ckpt), "--work", str(tmp_path / "w"), "--traces", "stdlib",
                               "--train-tokens", "4000", "--test-tokens", "3000", "--capacity", "0.01,0.1",
                               "--lookahead", "4"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by = {(r["trace"], r["capacity_rows"], r["policy"], r.get("lookahead", 0)): r["hit_ratio"] for r in res["results"]}
    assert by and all(0.0 <= v <= 1.0 for v in by.values())
    for (trace, cap, pol, la), v in by.items():  # nothing beats the optimum
        opt = by.get((trace, cap, "opt", 0))
        if opt is not None and pol != "opt":
            assert v <= opt + 1e-9, (trace, cap, pol, la)
