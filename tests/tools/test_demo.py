"""`make demo` end to end at a tiny size: train, build, verify, serve, compare with resident."""

from __future__ import annotations

import json

import pytest

from tierstore_cli import demo


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    args = ["--workdir", str(tmp_path / "demo"), "--quick", "--train-seconds", "5", "--steps", "8",
            "--prompts", "2", "--max-new-tokens", "4"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "verify: ok" in out and "--- generated ---" in out
    runs = [json.loads(line) for line in out.splitlines() if line.startswith('{"served_prefill')]
    summary = runs[-1]  # the last JSON line: the run with the saved profile, page cache dropped
    assert out.strip().splitlines()[-1].startswith("{") and json.loads(out.strip().splitlines()[-1]) == summary
    assert summary["same_tokens_as_resident"] is True and runs[0]["same_tokens_as_resident"] is True
    assert summary["device_budget"] < summary["table_bytes"] and summary["disk_rows_read"] > 0
    assert runs[0]["profile"] is False and summary["profile"] is True and summary["page_cache_dropped"] is True
    for key in ("served_prefill_tok_s", "served_decode_tok_s", "resident_prefill_tok_s", "resident_decode_tok_s"):
        assert summary[key] > 0
    assert "placement: decode" in out and "medians of the rounds" in out
    # the second run reuses checkpoint and store
    assert demo.main(args) == 0
    assert "reusing the checkpoint" in capsys.readouterr().out
