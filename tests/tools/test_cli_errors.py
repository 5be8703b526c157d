"""Every error of the `tierstore` command is one line on stderr and exit code 2; with `--json`
it is also a JSON object `{"error", "type"}` on stdout (issue 22, item 8). Each case below
printed a traceback, or no JSON, before the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierstore_cli import profile_cmd
from tierstore_cli.cli import main as cli


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "t.npy"
    np.save(path, np.arange(100, dtype=np.int64) % 7)  # 7 distinct rows
    return path


def _one_line(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return out, lines[0]


@pytest.mark.parametrize("capacity", ["inf", "nan", "1e300", "-inf", "9.3e18", "1e30GiB"])
def test_capacity_that_is_no_row_count_is_one_line(trace: Path, capacity: str, capsys):
    assert cli(["profile", "--trace", str(trace), f"--capacity={capacity}", "--policy", "lru,lfu,opt",
                "--row-bytes", "4"]) == 2
    _, err = _one_line(capsys)
    assert err.startswith("tierstore profile: error: capacity") and repr(capacity) in err


def test_capacity_above_the_table_is_the_whole_table(trace: Path, capsys):
    """A capacity past the table's rows holds it all: the same hits as a capacity of n_rows
    (it allocated an index of 10**12 rows, a MemoryError, before)."""
    pols = "lru,lfu,s3fifo,wtinylfu,arc,opt"
    assert cli(["profile", "--trace", str(trace), "--capacity", f"7,{10**12}", "--policy", pols, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    by = {(r["capacity_rows"], r["policy"]): r["hits"] for r in res}
    for p in pols.split(","):
        assert by[(10**12, p)] == by[(7, p)], p


@pytest.mark.parametrize("row_bytes", ["0", "-4", "x"])
def test_row_bytes_must_be_positive(trace: Path, row_bytes: str, capsys):
    assert cli(["profile", "--trace", str(trace), "--capacity", "64KiB", f"--row-bytes={row_bytes}"]) == 2
    _, err = _one_line(capsys)
    assert "--row-bytes" in err and repr(row_bytes) in err


def test_row_bytes_zero_in_the_library_is_typed():
    from tierstore.errors import TierStoreError

    with pytest.raises(TierStoreError, match="row_bytes=0"):
        profile_cmd.parse_capacities("64KiB", 100, 0)


@pytest.mark.parametrize("where", ["parent_is_a_file", "path_is_a_directory"])
@pytest.mark.parametrize("flag", ["--plot", "--rank-plot"])
def test_unwritable_plot_fails_before_the_simulations(trace: Path, tmp_path: Path, where: str, flag: str,
                                                      capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    calls = []
    real = profile_cmd.policy_hit_ratios
    monkeypatch.setattr(profile_cmd, "policy_hit_ratios", lambda *a, **k: calls.append(1) or real(*a, **k))
    (tmp_path / "afile").write_text("x")
    path = tmp_path / "afile" / "hit.png" if where == "parent_is_a_file" else tmp_path
    assert cli(["profile", "--trace", str(trace), "--capacity", "3", "--policy", "lru", flag, str(path),
                "--json"]) == 2
    out, err = _one_line(capsys)
    assert json.loads(out) == {"error": err.split(": error: ", 1)[1], "type": "OutputPathError"}
    assert str(path) in err
    assert not calls, "the simulations ran before the plot path was checked"


def test_json_errors_are_json_on_stdout(trace: Path, tmp_path: Path, capsys):
    cases = [
        (["profile", "--trace", str(trace), "--policy", "nope", "--json"], "TierStoreError", "'nope'"),
        (["profile", "--trace", str(trace), "--bogus", "--json"], "UsageError", "--bogus"),
        (["profile", "--trace", str(tmp_path / "missing.npy"), "--json"], None, "missing.npy"),
        (["inspect", str(tmp_path / "nostore"), "--json"], None, "nostore"),
        (["profile", "--trace", str(trace), "--capacity", "nan", "--json"], "TierStoreError", "'nan'"),
    ]
    for argv, kind, named in cases:
        assert cli(argv) == 2, argv
        out, err = _one_line(capsys)
        doc = json.loads(out)
        assert set(doc) == {"error", "type"} and named in doc["error"] and named in err, (argv, doc)
        assert kind is None or doc["type"] == kind, (argv, doc)


def test_usage_errors_are_one_line(trace: Path, capsys):
    for argv in (["profile"], ["profile", "--trace", str(trace), "--batch", "two"], ["nocommand"], []):
        assert cli(argv) == 2, argv
        _, err = _one_line(capsys)
        assert err.startswith("tierstore") and "error:" in err and "--help" in err, (argv, err)
