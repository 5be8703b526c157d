"""`tierstore trace` (engram_model/trace.py): text -> the row ids each Engram table is read
at, as a server reads them. Run through the `tierstore` command, where the model package
registers it (the `tierstore.commands` entry point)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engram_model.checkpoint import read_config
from engram_model.compression import build_compression
from engram_model.hasher import NgramHasher
from engram_model.tokenizer import load_tokenizer
from engram_model.trace import interleave
from tierstore.analysis.simulate import load_trace
from tierstore_cli.cli import main as cli


def test_interleave_by_hand():
    a = np.array([[1, 2], [3, 4], [5, 6]])  # doc 0: 3 tokens, 2 heads
    b = np.array([[7, 8]])  # doc 1: 1 token
    c = np.array([[9, 10], [11, 12]])  # doc 2: goes to the stream that frees first (b's)
    rows, off = interleave([a, b, c], 2)
    # step 0: a0 b0 | step 1: a1 c0 | step 2: a2 c1
    assert rows.tolist() == [1, 2, 7, 8, 3, 4, 9, 10, 5, 6, 11, 12]
    assert off.tolist() == [0, 4, 8]
    rows1, off1 = interleave([a, b], 1)  # one stream: documents one after the other
    assert rows1.tolist() == [1, 2, 3, 4, 5, 6, 7, 8] and off1.tolist() == [0, 2, 4, 6]


def test_trace_matches_the_hasher(engram_run, tmp_path: Path):
    """A token-id file traced by the CLI gives the model's own packed row ids."""
    ckpt, _ = engram_run
    tok = load_tokenizer(ckpt)
    ids = np.array(tok.encode("def f(x):\n    return x + 1\n" * 5).ids, dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "t.trace.zst"
    assert cli(["trace", "--checkpoint", str(ckpt), "--tokens", str(tmp_path / "ids.npy"), "--out", str(out)]) == 0
    tr = load_trace(out)
    h = NgramHasher(**read_config(ckpt)["hasher"])
    cid = build_compression(tok)(ids)
    for L in h.layer_ids:
        want = (h.hash(cid[None])[L][0] + h.head_offsets(L)).reshape(-1)
        got = tr.tables[f"blocks.{L}.engram.memory.weight"]
        assert np.array_equal(got.rows, want), f"layer {L}: max diff {np.abs(got.rows - want).max()}"
        assert got.n_rows == h.total_rows(L) and got.offsets.tolist() == list(range(0, want.size, h.heads_per_layer))


def test_trace_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert cli(["trace", "--checkpoint", str(tmp_path), "--stdlib", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tierstore trace: error:") and "config.json" in err[0]
