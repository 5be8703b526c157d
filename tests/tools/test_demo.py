"""`make demo` end to end at a tiny size: train, build, verify, serve, compare with resident."""

from __future__ import annotations

import json

import pytest

from tools import demo


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    args = ["--workdir", str(tmp_path / "demo"), "--quick", "--train-seconds", "5", "--steps", "8",
            "--prompts", "2", "--max-new-tokens", "4"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "verify: ok" in out and "--- generated ---" in out
    summary = json.loads([line for line in out.splitlines() if line.startswith('{"served_prefill')][-1])
    assert summary["same_tokens_as_resident"] is True
    assert summary["device_budget"] < summary["table_bytes"] and summary["disk_rows_read"] > 0
    # the second run reuses checkpoint and store
    assert demo.main(args) == 0
    assert "reusing the checkpoint" in capsys.readouterr().out
