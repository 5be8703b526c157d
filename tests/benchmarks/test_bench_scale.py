"""The scale benchmark runs at three tiny sizes, measures what it says, resumes, and fits lines.

What it proves beyond "it ran": every open really read from disk (the page cache was
evicted: /proc/self/io counted bytes) and loaded rows from the hot-set snapshot; the "hit"
lookups read (almost) nothing from disk while the "miss" ones did, so the two series are
what they are named; the resident baseline ran where the table fits; a rerun reuses the
measured sizes and the written checkpoints instead of redoing them; and the line fit calls
a constant flat and a growing series not flat.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_scale

pytestmark = pytest.mark.slow  # `make test-all` (CI) runs these; `make test` skips them


def test_fit_flat_and_growing() -> None:
    flat = bench_scale.fit([1, 8, 30], [5.0, 5.1, 4.95], 0.15)
    grows = bench_scale.fit([1, 8, 30], [1.0, 8.0, 30.0], 0.15)
    assert flat is not None and flat["flat"] and abs(flat["b_per_gib"]) < 0.01
    assert grows is not None and not grows["flat"] and grows["b_per_gib"] == pytest.approx(1.0)
    assert bench_scale.fit([1, 8, 30], [1.0, None, None], 0.15) is None  # one point is no line
    # budget-proportional metrics are scaled to the 16 GiB host budget, per-id costs are not
    f = {"a": 2.0, "b_per_gib": 0.0}
    assert bench_scale.project("lru/open_read_bytes", f, 1 << 30) == pytest.approx(32.0)
    assert bench_scale.project("lru/miss_us_per_id@4096", f, 1 << 30) == pytest.approx(2.0)
    # what grows with the table is not the budget's: only the intercept is scaled (it scaled
    # the growth too: lru's open read 2 MiB per GiB of checksums became 23.7 GiB at 189 GiB)
    g = {"a": 2.0, "b_per_gib": 1.0, "trend": "grows"}
    assert bench_scale.project("lru/open_read_bytes", g, 1 << 30) == pytest.approx(2.0 * 16 + 189.0)
    assert bench_scale.project("lru/miss_us_per_id@4096", g, 1 << 30) == pytest.approx(2.0 + 189.0)


def test_bench_scale_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "scale"
    res = bench_scale.main(["--quick", "--workdir", str(work)])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(res))
    assert len(res["sizes_gib"]) == 3
    for r in res["per_size"]:
        assert r["checkpoint"]["written"]
        b = r["build"]
        assert b["build_s"] > 0 and b["dd_s"] > 0 and b["rounds"][0]["dd_bytes"] >= r["table_bytes"]
        assert set(r["policies"]) >= {"static", "lru"}, r["policies"]
        for policy, c in r["policies"].items():
            assert "failed" not in c, c
            assert c["open_read_bytes"] > 0, f"{policy}: open read nothing from disk: the page cache was not evicted"
            if policy == "static":  # places the profile's hot set at open, from the snapshot (lru places nothing)
                assert c["snapshot"] == "ok" and c["rows_loaded"] > 0 and c["open_store_bytes"] > 0, c
            if policy != "resident":
                assert c["hit_disk_rows_per_id"] < 0.1 < c["miss_disk_rows_per_id"], c
            assert all(v is not None and v > 0 for v in c["hit_us_per_id"].values()), c
    assert "resident" in res["per_size"][0]["policies"]  # 16 MiB fits --quick's resident limit
    assert set(res["flat"]) | set(res["not_flat"]) == {k for k, f in res["fits"].items() if f}
    assert "static/open_read_bytes" in res["projection_189gib_16gib_host"]

    # resumable: a measured size is reused, a missing one is measured again from its kept checkpoint
    (work / "result-0.0625GiB.json").unlink()
    again = bench_scale.main(["--quick", "--workdir", str(work)])
    assert "measured before" in capsys.readouterr().out
    assert [r["checkpoint"]["written"] for r in again["per_size"]] == [True, True, False]
    assert not list(work.glob("store-*")), "stores are deleted after their size"
