"""Row access-count profiles stored in a store directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierstore.errors import CorruptDataError, FormatVersionError, IdTypeError, InvalidIdError, TierStoreError
from tierstore.format.profile import (count_rows, has_profile, load_profile, profile_info, profile_paths,
                               save_profile, zipf_fit)


def test_roundtrip(tmp_path):
    counts = np.bincount(np.random.default_rng(0).zipf(1.2, 10_000) % 1000, minlength=1000)
    assert not has_profile(tmp_path, "blocks.1.engram.memory.weight")
    p = save_profile(tmp_path, "blocks.1.engram.memory.weight", counts, meta={"source": "test"})
    assert p.name.endswith(".npy.zst") and p.parent.name == "profiles"
    back = load_profile(tmp_path, "blocks.1.engram.memory.weight", n_rows=1000)
    info = profile_info(tmp_path, "blocks.1.engram.memory.weight")
    assert back.dtype == np.int64 and (back == counts).all()
    assert info["format"] == "tierstore-profile" and info["total"] == counts.sum()
    assert info["source"] == "test" and info["dtype"] == "int32"
    big = counts.astype(np.int64) * 2**32
    save_profile(tmp_path, "t", big)
    assert (load_profile(tmp_path, "t") == big).all()


def test_errors(tmp_path):
    assert load_profile(tmp_path, "nope") is None  # a store without a profile opens fine
    with pytest.raises(TierStoreError, match="--save-profile"):
        load_profile(tmp_path, "nope", missing_ok=False)
    save_profile(tmp_path, "t", np.arange(10))
    with pytest.raises(TierStoreError, match="another table"):
        load_profile(tmp_path, "t", n_rows=11)
    data, meta = profile_paths(tmp_path, "t")
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "version": 2}))
    with pytest.raises(FormatVersionError):
        load_profile(tmp_path, "t")
    meta.write_text(json.dumps(info))
    data.write_bytes(b"garbage")
    with pytest.raises(CorruptDataError):
        load_profile(tmp_path, "t")
    with pytest.raises(TierStoreError):
        save_profile(tmp_path, "t", np.array([-1, 2]))
    with pytest.raises(InvalidIdError, match="id 5 at flat position 1 is out of range for the trace with 5 rows"):
        count_rows(np.array([0, 5]), 5)
    with pytest.raises(IdTypeError):
        count_rows(np.array([0.0]), 5)
    assert profile_paths(tmp_path, "a/b")[0].parent == tmp_path / "profiles"


def test_count_rows_and_zipf_fit():
    assert count_rows(np.array([1, 1, 3]), 5).tolist() == [0, 2, 0, 1, 0]
    # exact power law: count = 1e6 / rank^1.1
    counts = (1e6 / np.arange(1, 2001) ** 1.1).astype(np.int64)
    s, sorted_counts = zipf_fit(np.random.default_rng(0).permutation(counts))
    assert s == pytest.approx(1.1, abs=0.02)
    assert (np.diff(sorted_counts) <= 0).all()
