"""Row access-count profiles stored in a store directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierstore.errors import CorruptDataError, FormatVersionError, IdTypeError, InvalidIdError, TierStoreError
from tierstore.format.profile import (count_rows, has_profile, hot_rows, load_profile, profile_info, profile_paths,
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


def test_hot_rows_ties_and_zeros_by_hand():
    profile = np.array([0, 5, 5, 5, 1, 0, 9])
    assert hot_rows(profile, 2).tolist() == [6, 1]
    assert hot_rows(profile, 3).tolist() == [6, 1, 2]  # ties: the lowest ids
    assert hot_rows(profile, 10).tolist() == [6, 1, 2, 3, 4]  # never-read rows are not hot
    assert hot_rows(profile, 6, fill=True).tolist() == [6, 1, 2, 3, 4, 0]  # ...unless k rows must be placed
    assert hot_rows(profile, 10, fill=True).tolist() == [6, 1, 2, 3, 4, 0, 5]
    assert hot_rows(profile.astype(np.uint32), 3).tolist() == [6, 1, 2]
    assert hot_rows(None, 3).size == 0 and hot_rows(profile, 0).size == 0
    assert hot_rows(np.zeros(4, np.int64), 2).size == 0
    assert hot_rows(np.zeros(4, np.int64), 2, fill=True).tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(20))
def test_hot_rows_equal_a_plain_sort(seed):
    """Against the rule written as a plain sort: count descending, then row id; zeros only with fill."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    profile = rng.integers(0, int(rng.integers(1, 6)), n) * rng.integers(0, 2, n)  # many ties and zeros
    ranked = sorted(range(n), key=lambda r: (-int(profile[r]), r))
    for k in (1, 2, n // 3, n - 1, n, n + 5):
        want_fill = ranked[:max(k, 0)]
        assert hot_rows(profile, k, fill=True).tolist() == want_fill, (seed, k)
        assert hot_rows(profile, k).tolist() == [r for r in want_fill if profile[r] > 0], (seed, k)
