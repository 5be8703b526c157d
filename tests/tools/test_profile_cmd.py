"""`tierstore profile` and `tierstore size` as a user runs them, on traces of a tiny real
checkpoint (`tierstore trace`, registered by engram_model) and on .npy traces. The library
behind them has its own tests: tests/tierstore/analysis/test_sizing.py, test_hit_ratios.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierstore.cache.index import budget_for
from tierstore_cli.cli import main as cli

@pytest.fixture(scope="module")
def ckpt(engram_run) -> Path:
    return engram_run[0]  # the session's tiny trained checkpoint (tests/conftest.py)


@pytest.fixture(scope="module")
def traces(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("traces")
    train, test = d / "train.trace.zst", d / "test.trace.zst"
    for split, out in (("train", train), ("test", test)):
        assert cli(["trace", "--checkpoint", str(ckpt), "--stdlib", "--split", split, "--max-tokens", "6000",
                    "--streams", "4", "--out", str(out)]) == 0
    return train, test


def test_profile_json_and_plots(traces, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    train, test = traces
    hit_png, rank_png = tmp_path / "hit.png", tmp_path / "rank.png"
    rc = cli(["profile", "--trace", str(test), "--profile-trace", str(train), "--capacity", "0.01,300",
              "--policy", "lru,lfu,static,default,opt", "--json", "--plot", str(hit_png),
              "--rank-plot", str(rank_png), "--row-bytes", "16", "--batch", "64"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = out["results"]
    tables = {r["table"] for r in res}
    assert tables == {"blocks.0.engram.memory.weight", "blocks.1.engram.memory.weight"}
    for t in tables:
        rs = [r for r in res if r["table"] == t]
        caps = sorted({r["capacity_rows"] for r in rs})
        assert len(caps) == 2 and 300 in caps
        for cap in caps:
            by = {r["policy"]: r for r in rs if r["capacity_rows"] == cap}
            assert set(by) == {"lru", "lfu", "static", "default", "opt"}
            for p, r in by.items():
                assert 0 <= r["hit_ratio"] <= by["opt"]["hit_ratio"] + 1e-12, (t, cap, p)
                assert r["bytes_moved"] == r["misses"] * 16
            assert by["static"]["hit_ratio"] > 0  # the profile from the train slice was used
    for png in (hit_png, rank_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_npy_trace_fraction_of_distinct_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = (np.random.default_rng(0).zipf(1.2, 20_000) % 1000 + 5000).astype(np.int64)
    np.save(tmp_path / "t.npy", rows)
    assert cli(["profile", "--trace", str(tmp_path / "t.npy"), "--capacity", "0.1,50",
                "--policy", "lru,opt", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    distinct = np.unique(rows).size
    assert {r["capacity_rows"] for r in res} == {round(0.1 * distinct), 50}
    assert all(r["capacity_base"] == "distinct ids" for r in res)


def test_store_profile_live_and_size(ckpt: Path, traces, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from engram_model.generate import build_store_for
    from tierstore.format.profile import load_profile

    train, test = traces
    store = build_store_for(ckpt, tmp_path / "store")
    t1 = "blocks.1.engram.memory.weight"
    assert cli(["profile", "--trace", str(train), "--store", str(store), "--save-profile"]) == 0
    prof = load_profile(store, t1)
    assert prof is not None and prof.sum() > 0
    capsys.readouterr()
    rc = cli(["profile", "--trace", str(test), "--store", str(store), "--table", t1, "--capacity", "0.02",
              "--policy", "lru,default", "--live", "--json", "--batch", "64"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    live = [r for r in res if r.get("mode") == "live"]
    assert len(live) == 2
    for r in live:
        assert r["agree"], f"{r['policy']}: store {r['hits']}/{r['misses']} vs sim {r['sim_hits']}/{r['sim_misses']}"
    rc = cli(["size", "--trace", str(test), "--store", str(store), "--table", t1, "--device-hit", "0.3",
              "--total-hit", "0.6", "--json", "--batch", "64"])
    assert rc == 0
    size = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sizes"][0]
    assert size["device_hit_ratio"] >= 0.3 and size["total_hit_ratio"] >= 0.6
    # fp32 rows of 4 values, and the index's state a store pays for them out of the budget
    assert size["device_bytes"] == budget_for(size["device_rows"], 16, size["policy"])


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    np.save(tmp_path / "t.npy", np.arange(10, dtype=np.int64))
    assert cli(["profile", "--trace", str(tmp_path / "t.npy"), "--policy", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown policy 'nope'" in err[0]
    assert cli(["profile", "--trace", str(tmp_path / "t.npy"), "--capacity", "64MiB"]) == 2
    assert "--row-bytes" in capsys.readouterr().err


def test_save_profile_from_npy_trace_lands_under_the_store_table(tmp_path: Path, small_ckpt):
    """`profile --save-profile` on a .npy trace saved the profile under the table name
    "trace", so the store never loaded it and static/default ran without a profile."""
    import tierstore
    from tierstore.format.profile import has_profile, load_profile
    from safetensors.torch import save_file

    _, tensors = small_ckpt
    name = "blocks.1.engram.memory.weight"
    save_file({name: tensors[name]}, str(tmp_path / "one.safetensors"))
    store = tierstore.build_store(tmp_path / "one.safetensors", tmp_path / "store", progress=False)
    rows = np.random.default_rng(0).zipf(1.2, 20000) % 5003
    np.save(tmp_path / "t.npy", rows)
    assert cli(["profile", "--trace", str(tmp_path / "t.npy"), "--store", str(store), "--save-profile"]) == 0
    assert has_profile(store, name) and not has_profile(store, "trace")
    assert np.array_equal(load_profile(store, name), np.bincount(rows, minlength=5003))


def test_profile_says_when_it_is_approximate_and_lru_is_exact_at_batch_1(tmp_path: Path, capsys):
    """Merging a trace's steps into larger batches changes the answer: it is never the default
    and the output must say so. By default (--batch 1) the replay is exact: LRU at every
    capacity comes from one stack-distance pass and equals an OrderedDict LRU exactly."""
    from ..conftest import ordered_dict_lru_hits

    rows = np.random.default_rng(3).zipf(1.2, 30000) % 4000
    np.save(tmp_path / "t.npy", rows)
    assert cli(["profile", "--trace", str(tmp_path / "t.npy"), "--capacity", "50,400", "--policy", "lru",
                "--batch", "1024"]) == 0
    assert "approximate: trace steps merged into batches of >= 1024 lookups" in capsys.readouterr().out
    caps = list(range(10, 510, 10))  # 50 capacities
    assert cli(["profile", "--trace", str(tmp_path / "t.npy"), "--capacity", ",".join(map(str, caps)),
                "--policy", "lru", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert [r["capacity_rows"] for r in res] == caps and {r["semantics"] for r in res} == {"exact: one access at a time"}
    for r in res[::7]:
        assert r["hits"] == ordered_dict_lru_hits(rows, r["capacity_rows"]), r["capacity_rows"]


def test_size_prints_what_the_library_finds(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`tierstore size` on a .npy trace: its JSON is size_tiers' answer plus bytes, its text
    says the same, and a target above 1 is one line of error (it crashed the text output)."""
    from tierstore.analysis.sizing import size_tiers

    from ..conftest import real_text_trace

    rows = real_text_trace(6000) % 700
    np.save(tmp_path / "t.npy", rows)
    cmd = ["size", "--trace", str(tmp_path / "t.npy"), "--policy", "lru", "--device-hit", "0.3", "--total-hit", "0.6",
           "--row-bytes", "16"]
    assert cli([*cmd, "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sizes"]
    want = size_tiers(rows, n_rows=int(rows.max()) + 1, policy="lru", device_hit=0.3, total_hit=0.6,
                      table="trace").to_dict()
    assert len(got) == 1 and {k: got[0][k] for k in want} == want
    assert (got[0]["device_bytes"], got[0]["host_bytes"]) == (budget_for(want["device_rows"], 16, "lru"),
                                                              budget_for(want["host_rows"], 16, "lru"))
    assert cli(cmd) == 0
    assert capsys.readouterr().out.startswith(f"trace (lru): device {want['device_rows']:,} rows = ")
    assert cli([*cmd, "--total-hit", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tierstore size: error: total_hit=1.5 is not a hit ratio")


def test_profile_without_a_store_does_not_import_torch(tmp_path: Path):
    """`tierstore profile` of a .npy trace starts without torch (~1 s of a short run): only
    the cache layer and the simulator."""
    import subprocess
    import sys

    np.save(tmp_path / "t.npy", np.arange(100, dtype=np.int64) % 7)
    code = ("import sys; from tierstore_cli.cli import main; "
            "rc = main(['profile', '--trace', sys.argv[1], '--capacity', '3', '--policy', 'lru,opt', '--json']); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.npy")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
