"""What the build says about checkpoints it cannot read unambiguously, or whose data is odd
(issue 22, item 10): each refusal names the tensor, key or files; NaN block scales are kept
bit-exact but counted, warned about and shown by `tierstore inspect`. Each case was
accepted silently, or raised without naming the tensor, before the fix."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import tierstore
from tierstore import CheckpointError
from tierstore.format.checkpoint import open_checkpoint
from tierstore.format.quant import FP8_SCHEME, NanScaleWarning, Quant
from tierstore.format.spec import read_manifest
from tierstore_cli.cli import main as cli

from ...v41 import assert_dequantized, embed, scale_of, write_v41_checkpoint

V41_LAYERS = {1: 301, 3: 299}


def test_odd_fp4_block_names_the_table_and_its_scales(tmp_path):
    # 256 fp4 values per row (128 bytes) with 256 scales: blocks of 1 value, half a byte each
    odd = torch.zeros(299, 256, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    write_v41_checkpoint(tmp_path / "c", V41_LAYERS, fp4=True, override={scale_of(embed(3)): odd})
    with pytest.raises(CheckpointError, match=rf"table '{embed(3)}' \[299, 128\] uint8 with scales "
                                              rf"'{scale_of(embed(3))}' \[299, 256\]: .*block=1 must be even"):
        tierstore.build_store(tmp_path / "c", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_several_indexes_in_a_directory_are_refused_naming_them(tmp_path):
    write_v41_checkpoint(tmp_path / "c", V41_LAYERS)
    full = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
    part = {k: v for k, v in full["weight_map"].items() if ".engram.embed." in k}
    (tmp_path / "c" / "engram.safetensors.index.json").write_text(json.dumps({"weight_map": part}))
    with pytest.raises(CheckpointError, match=r"2 sharded-checkpoint indexes \(engram\.safetensors\.index\.json, "
                                              r"model\.safetensors\.index\.json\); pass the one"):
        open_checkpoint(tmp_path / "c")
    # naming one of them is the way out
    assert set(open_checkpoint(tmp_path / "c" / "engram.safetensors.index.json").tensors) == set(part)


def test_duplicate_key_in_the_index_is_refused_naming_it(tmp_path):
    write_v41_checkpoint(tmp_path / "c", V41_LAYERS)
    index = tmp_path / "c" / "model.safetensors.index.json"
    text = index.read_text()
    name, shard = embed(1), json.loads(text)["weight_map"][embed(1)]
    # the same tensor named twice, the second time in another shard: json.loads keeps the last
    index.write_text(text.replace(f'"{name}": "{shard}"',
                                  f'"{name}": "{shard}", "{name}": "model-00001-of-00003.safetensors"'))
    with pytest.raises(CheckpointError, match=rf"names '{name}' twice"):
        open_checkpoint(tmp_path / "c")
    index.write_text(text.replace('"weight_map"', '"metadata": {}, "weight_map"', 1))  # "metadata" twice
    with pytest.raises(CheckpointError, match=r"names 'metadata' twice"):
        open_checkpoint(index)


def test_nan_scales_are_kept_counted_and_warned(tmp_path, capsys):
    raw = write_v41_checkpoint(tmp_path / "c", V41_LAYERS, scale_codes=(240, 256))  # ~1/16 of them 0xFF
    want = {embed(L): int(np.count_nonzero(raw[scale_of(embed(L))] == 0xFF)) for L in V41_LAYERS}
    assert all(want.values())
    with pytest.warns(NanScaleWarning) as caught:
        out = tierstore.build_store(tmp_path / "c", tmp_path / "s", progress=False)
    assert len(caught) == len(V41_LAYERS)
    for w, (name, n) in zip(caught, want.items()):
        assert f"table '{name}': {n:,} of {V41_LAYERS[int(name.split('.')[1])] * 8:,} block scales are NaN" in str(w.message)
    m = read_manifest(out)
    assert {n: t.source["nan_scales"] for n, t in m.tables.items()} == want
    # kept: lookups equal the reference arithmetic, NaN blocks included
    with tierstore.open(out, device="cpu") as st:
        for name in want:
            ids = np.arange(st.tables[name].rows)
            assert_dequantized(st.lookup(name, ids), raw[name], raw[scale_of(name)], Quant(FP8_SCHEME, 32, 256))
    # inspect shows the count; the CLI's build says it in one line per table
    capsys.readouterr()
    assert cli(["inspect", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {t["name"]: t["nan_scales"] for t in doc["tables"]} == want
    assert cli(["inspect", str(out)]) == 0
    assert f"{want[embed(1)]:,} NaN scales" in capsys.readouterr().out
    assert cli(["build", str(tmp_path / "c"), str(tmp_path / "s2"), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(V41_LAYERS) and all(e.startswith("tierstore build: warning: table '") for e in err), err


def test_finite_scales_record_zero_and_warn_nothing(tmp_path):
    write_v41_checkpoint(tmp_path / "c", V41_LAYERS)  # codes 110..139
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tierstore.build_store(tmp_path / "c", tmp_path / "s", progress=False)
    assert {t.source["nan_scales"] for t in read_manifest(out).tables.values()} == {0}


def test_nan_scale_count_of_a_shard_is_its_own_rows(tmp_path):
    raw = write_v41_checkpoint(tmp_path / "c", V41_LAYERS, scale_codes=(240, 256))
    with pytest.warns(NanScaleWarning):
        shard = tierstore.build_store(tmp_path / "c", tmp_path / "shard", shard=(1, 3), progress=False)
    s = raw[scale_of(embed(3))][1::3]
    assert read_manifest(shard).tables[embed(3)].source["nan_scales"] == int(np.count_nonzero(s == 0xFF))
