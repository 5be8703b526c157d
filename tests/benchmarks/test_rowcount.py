"""benchmarks/rowcount.py's counts, checked against np.unique (the plain reference) on random
ids, on skewed (Zipf-like) ids, and on real-ish ids: Engram row ids of text hashed with the
V4.1 preset, whose orders and heads occupy disjoint ranges of one table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks.rowcount import RowCounter

TOKENIZER = Path(os.environ.get("TIERSTORE_DEEPSEEK_TOKENIZER",
                                Path.home() / ".cache/tierstore/deepseek_v3-3.7.2/tokenizer.json"))


def _check(counter: RowCounter, ids: np.ndarray) -> None:
    u, c = np.unique(ids, return_counts=True)
    assert counter.distinct == u.size
    np.testing.assert_array_equal(counter.ids, u)
    np.testing.assert_array_equal(counter.counts, c)
    assert counter.lookups == ids.size


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
def test_counts_match_np_unique_on_random_ids(chunk: int):
    rng = np.random.default_rng(chunk)
    ids = rng.integers(0, 384_006_168, 50_000, dtype=np.int64).astype(np.int32)
    ids[::3] = ids[1::3][: ids[::3].size]  # repeats, some inside one chunk, some across chunks
    rc = RowCounter(chunk=chunk)
    for part in np.array_split(ids, 37):  # uneven pieces: chunk boundaries fall inside them
        rc.add(part)
    _check(rc, ids)


def test_counts_match_np_unique_on_skewed_ids_with_flushes_between():
    rng = np.random.default_rng(1)
    ids = (rng.zipf(1.3, 200_000) % 1_000_003).astype(np.int32)  # a few ids very often, a long tail
    rc = RowCounter(chunk=4096)
    seen = 0
    for k, part in enumerate(np.array_split(ids, 50)):
        rc.add(part.reshape(-1, 2) if part.size % 2 == 0 else part)  # 2-D input is counted element-wise
        seen += part.size
        if k % 7 == 0:  # a read mid-stream (the study's checkpoints) flushes; later adds still merge
            assert rc.distinct == np.unique(ids[:seen]).size
    _check(rc, ids)
    assert rc.counts.max() == np.unique(ids, return_counts=True)[1].max() > 1000


def test_an_empty_counter_and_an_empty_add():
    rc = RowCounter()
    rc.add(np.empty(0, np.int32))
    assert rc.distinct == 0 and rc.ids.size == 0 and rc.counts.size == 0 and rc.lookups == 0


def test_int64_ids_keep_their_width():
    ids = np.array([2**40 + 5, 3, 2**40 + 5, 2**33], np.int64)
    rc = RowCounter(dtype=np.int64, chunk=3)
    rc.add(ids)
    _check(rc, ids)


@pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"DeepSeek's tokenizer.json not at {TOKENIZER} "
                    "(docs/v41_sizing.md says how to fetch it)")
def test_counts_match_np_unique_on_real_row_ids():
    from engram_model.trace import TraceSource

    src = TraceSource(tokenizer=str(TOKENIZER), preset="deepseek-v4.1")
    texts = [Path(__file__).read_text(), "Die Katze sitzt auf der Matte, und der Hund schläft. " * 30]
    docs = src.encode(texts)
    for table in src.tables:
        rows = np.concatenate([src.rows(d)[table] for d in docs])  # (T, 24) int32
        rc = RowCounter(chunk=5000)
        for d0 in range(0, rows.shape[0], 333):  # token slices, as the study cuts documents
            rc.add(rows[d0:d0 + 333, 16:24])  # the 4-gram heads: a non-contiguous slice
        _check(rc, rows[:, 16:24].reshape(-1))
