"""`tierstore build / inspect / verify` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tierstore.format.spec import PAGE_SIZE, read_manifest
from tierstore_cli.cli import main


def test_build_inspect_verify(tmp_path, small_ckpt, capsys):
    ckpt, tensors = small_ckpt
    out = tmp_path / "store"
    assert main(["build", str(ckpt), str(out), "--quiet"]) == 0
    assert "2 table(s)" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "tierstore" and doc["version"] == 3 and len(doc["build_id"]) == 32
    assert {t["name"]: (t["rows"], t["dim"], t["dtype"]) for t in doc["tables"]} == {
        "blocks.1.engram.memory.weight": (5003, 64, "float32"),
        "blocks.3.engram.memory.weight": (1201, 48, "float32"),
    }
    assert main(["inspect", str(out)]) == 0
    assert "blocks.3.engram.memory.weight" in capsys.readouterr().out
    assert main(["verify", str(out), "--quiet"]) == 0
    # corrupt one byte of table 2, page 3
    info = read_manifest(out).tables["blocks.3.engram.memory.weight"]
    with open(out / info.file, "r+b") as f:
        f.seek(3 * PAGE_SIZE + 5)
        f.write(b"\x7f")
    assert main(["verify", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "table 'blocks.3.engram.memory.weight' block 3 offset 12288" in err


def test_errors_are_one_line_and_nonzero(tmp_path, small_ckpt, capsys):
    ckpt, _ = small_ckpt
    assert main(["build", str(ckpt), str(tmp_path / "s"), "--tables", "nomatch", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tierstore build: error:") and "\n" not in err
    assert main(["inspect", str(tmp_path / "missing")]) == 2


SCRIPT = Path(sys.executable).parent / "tierstore"


@pytest.mark.skipif(not SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_console_script(tmp_path, small_ckpt):
    ckpt, _ = small_ckpt
    r = subprocess.run([str(SCRIPT), "build", str(ckpt), str(tmp_path / "s"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "tierstore_cli", "verify", str(tmp_path / "s"), "--quiet"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stderr


def test_build_shard(tmp_path, small_ckpt, capsys):
    ckpt, tensors = small_ckpt
    assert main(["build", str(ckpt), str(tmp_path / "sh"), "--shard", "1/3", "--quiet"]) == 0
    m = read_manifest(tmp_path / "sh" / "shard-00001-of-00003")
    info = m.tables["blocks.1.engram.memory.weight"]
    assert info.rows == len(range(1, 5003, 3)) and info.source["shard"]["global_rows"] == 5003
    assert main(["build", str(ckpt), str(tmp_path / "sh2"), "--shard", "1-3"]) == 2
    assert "RANK/WORLD" in capsys.readouterr().err


@pytest.mark.parametrize("fp4", [False, True], ids=["fp8", "fp4"])
def test_inspect_shows_a_quantized_table_as_its_scheme(tmp_path, capsys, fp4):
    """A DeepSeek-V4.1-layout table is shown as its scheme, not as its stored bytes
    ("264 uint8"); ``--json`` has a ``quant`` field (null for a plain table)."""
    from ..v41 import embed, write_v41_checkpoint

    write_v41_checkpoint(tmp_path / "ckpt", {1: 300, 14: 200}, fp4=fp4)
    out = tmp_path / "store"
    assert main(["build", str(tmp_path / "ckpt"), str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    doc = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tables"]}
    scheme, row_bytes = ("fp4_e2m1/ue8m0", 136) if fp4 else ("fp8_e4m3/ue8m0", 264)
    for name, rows in ((embed(1), 300), (embed(14), 200)):
        t = doc[name]
        assert (t["rows"], t["dim"], t["dtype"]) == (rows, row_bytes, "uint8")  # the stored rows, as before
        assert t["quant"] == {"scheme": scheme, "block": 32, "values": 256, "row_bytes": row_bytes,
                              "lookup_dtype": "bfloat16"}
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    want = f"{'fp4 e2m1' if fp4 else 'fp8 e4m3'} + ue8m0/32, 256 values (bf16 on lookup)"
    lines = [line for line in text.splitlines() if line.startswith(embed(1))]
    assert len(lines) == 1 and want in lines[0] and "uint8" not in lines[0], text
    assert lines[0].split()[1:3] == ["300", "256"], lines[0]  # rows, and the values a lookup returns


def test_inspect_json_quant_is_null_for_a_plain_table(tmp_path, small_ckpt, capsys):
    ckpt, _ = small_ckpt
    assert main(["build", str(ckpt), str(tmp_path / "s"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "s"), "--json"]) == 0
    assert all(t["quant"] is None for t in json.loads(capsys.readouterr().out)["tables"])
