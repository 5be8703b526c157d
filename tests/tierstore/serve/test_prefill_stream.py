"""A DeepSeek-V4.1 prefill of 4,096 tokens is one lookup per table, and it streams through
tiers far smaller than it: no error, no stall, every row bit-exact.

The geometry is the released config's (``tierstore trace --preset deepseek-v4.1``): each
token reads ``rows_per_token`` = 3 orders x 8 heads = 24 rows of each Engram layer's
table, so one 4,096-token prefill asks a table for 98,304 ids in one call, 98x the device
tier and 24x the host tier here. The table is small and quantized as V4.1's (fp8 values and
UE8M0 scales, 264 bytes a row); the result is checked against the stored bytes
(``raw=True``) and against the independent dequantization oracle. "No stall" is counted,
not timed: the walk's accesses plus the leased entries victim searches stepped over
(``M_SCAN``) stay a few steps per id (a stalling walk took thousands per id: issue 19).
"""

from __future__ import annotations

import numpy as np
import pytest

import tierstore
from engram_model.deepseek_v41 import V41EngramConfig
from tierstore.cache import policy_names
from tierstore.cache.layout import M_SCAN, M_TICK
from tierstore.format.profile import save_profile
from tierstore.format.quant import Quant

from ...v41 import assert_dequantized, embed, scale_of, write_v41_checkpoint

ROWS = 6_000
TOKENS = 4_096
ROW_BYTES = 264
TABLE = embed(1)


@pytest.fixture(scope="module")
def v41_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefill")
    raw = write_v41_checkpoint(tmp / "ckpt", {1: ROWS})
    path = tierstore.build_store(tmp / "ckpt", tmp / "store", progress=False)
    return path, raw[TABLE], raw[scale_of(TABLE)]


def _prefill_ids() -> np.ndarray:
    """[tokens, rows per token] ids of one V4.1 prefill: Zipf-skewed (n-gram ids repeat), so
    some hit the tiers and most stream through them."""
    per_token = V41EngramConfig.preset("deepseek-v4.1").rows_per_token
    assert per_token == 24
    rng = np.random.default_rng(5)
    return (rng.zipf(1.2, (TOKENS, per_token)) * 7919 % ROWS).astype(np.int64)


@pytest.mark.parametrize("profiled", [True, False], ids=["profile", "no-profile"])
@pytest.mark.parametrize("policy", policy_names())
def test_v41_prefill_is_one_lookup_through_tiers_smaller_than_it(v41_store, policy, profiled):
    path, values, scales = v41_store
    if profiled:  # a profile whose hot set is 4x the host tier (the normal case at V4.1 size)
        counts = np.zeros(ROWS, np.int64)
        hot = np.random.default_rng(2).choice(ROWS, 4_096, replace=False)
        counts[hot] = np.maximum(1, 1e6 / np.arange(1, hot.size + 1)).astype(np.int64)
        save_profile(path, TABLE, counts)
    ids = _prefill_ids()
    with tierstore.open(path, device="cpu", device_budget=1_000 * ROW_BYTES, host_budget=4_000 * ROW_BYTES,
                        policy=policy, use_profile=profiled) as store:
        t = store._tables[TABLE]
        assert 0 < t.dev.capacity < t.host.capacity < ids.size  # both tiers smaller than the batch
        M = t.dev.index.state[0]
        before = int(M[M_TICK] + M[M_SCAN])
        got = store.lookup(TABLE, ids)  # one call: 98,304 ids
        work = (int(M[M_TICK] + M[M_SCAN]) - before) / ids.size
        raw = store.lookup(TABLE, ids, raw=True)  # again, now with the tiers warm
        stats = store.stats()
    assert got.shape == (TOKENS, 24, 256)
    stored = np.concatenate([values, scales], axis=1)
    assert np.array_equal(raw.numpy(), stored[ids]), "raw rows differ from the stored bytes"
    assert_dequantized(got, values[ids], scales[ids], Quant("fp8_e4m3/ue8m0", 32, 256))
    assert work <= 3.0, f"{policy}: {work:.2f} walk steps per id: the lookup stalls on its leased slots"
    assert stats["disk"]["rows_read"] > 0  # from disk through the tiers
    for tier in (t.dev.index, t.host.index):
        assert (tier.refcount == 0).all(), "a lease outlived the lookup"
