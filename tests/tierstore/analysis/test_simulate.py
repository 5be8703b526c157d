"""Trace files and the replay of traces through policies."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.analysis.belady import belady_hits
from tierstore.cache import CacheIndex
from tierstore.errors import CorruptDataError, FormatVersionError, IdTypeError, InvalidIdError, TierStoreError
from tierstore.analysis.simulate import (TableTrace, Trace, batch_bounds, load_trace, replay, save_trace,
                                simulate, simulate_tiers)


def zipf_trace(n=20_000, rows=5000, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.15, n) % rows).astype(np.int64)


def test_trace_roundtrip(tmp_path):
    a = zipf_trace(1000)
    b = zipf_trace(500, seed=1) + 2**31  # needs int64
    tr = Trace({"blocks.1.engram.memory.weight": TableTrace(a, np.array([0, 16, 32]), 5000),
                "t2": TableTrace(b)}, {"streams": 4})
    p = save_trace(tmp_path / "x.trace.zst", tr)
    back = load_trace(p)
    assert back.meta == {"streams": 4}
    t1 = back.tables["blocks.1.engram.memory.weight"]
    assert (t1.rows == a).all() and t1.offsets.tolist() == [0, 16, 32] and t1.n_rows == 5000
    assert (back.tables["t2"].rows == b).all() and back.tables["t2"].offsets is None
    # a plain .npy array is a one-table trace
    np.save(tmp_path / "plain.npy", a)
    assert (load_trace(tmp_path / "plain.npy").tables["trace"].rows == a).all()


def test_trace_errors(tmp_path):
    (tmp_path / "junk").write_bytes(b"not a trace")
    with pytest.raises(CorruptDataError):
        load_trace(tmp_path / "junk")
    with pytest.raises(TierStoreError, match="not found"):
        load_trace(tmp_path / "missing")
    with pytest.raises(CorruptDataError, match="offsets"):
        TableTrace(np.arange(10), np.array([0, 5, 5]))
    # a newer format version names the fix
    import io
    import json

    import zstandard
    buf = io.BytesIO()
    np.savez(buf, header=np.frombuffer(json.dumps({"format": "tierstore-trace", "version": 99,
                                                    "tables": {}}).encode(), np.uint8))
    (tmp_path / "v99").write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    with pytest.raises(FormatVersionError, match="re-run"):
        load_trace(tmp_path / "v99")


def test_batch_bounds_merge_steps():
    off = np.arange(0, 100, 16)  # steps of 16 lookups
    b = batch_bounds(100, off, 40)
    assert b[0] == 0 and b[-1] == 100 and set(b[:-1]) <= set(off.tolist())
    assert np.diff(b).max() < 2 * 40 + 16
    assert batch_bounds(10, None, 4).tolist() == [0, 4, 8, 10]
    assert batch_bounds(10, None, 1).tolist() == list(range(11))


def test_simulate_matches_manual_replay_and_opt():
    tr = zipf_trace()
    res = simulate(tr, [50, 500], ["lru", "s3fifo", "opt"], n_rows=5000, min_batch=64)
    by = {(r.policy, r.capacity_rows): r for r in res}
    for cap in (50, 500):
        idx = CacheIndex(5000, cap, "lru", pinned_rows=[])
        replay(idx, tr, batch_bounds(tr.size, None, 64))
        r = by[("lru", cap)]
        assert (r.hits, r.misses) == (idx.hits, idx.misses)
        assert r.hits + r.misses == tr.size
        opt = by[("opt", cap)]
        assert opt.hit_ratio >= max(by[(p, cap)].hit_ratio for p in ("lru", "s3fifo"))
    # one access per batch: opt is the plain sequential optimum
    res1 = simulate(tr[:3000], [100], ["opt"], n_rows=5000, min_batch=1, warm_opt=False)
    assert res1[0].hits == belady_hits(tr[:3000], 100)


def test_simulate_static_and_default_use_profile():
    """Both profile policies read the profile: without one static holds nothing and default
    hits less (measured: 10,744 hits with the profile, 10,151 without, of 20,000)."""
    tr = zipf_trace(seed=3)
    profile = np.bincount(zipf_trace(seed=4), minlength=5000)
    res = simulate(tr, [100], ["static", "default", "lru", "opt"], n_rows=5000, profile=profile)
    by = {r.policy: r.hits for r in res}
    assert by["opt"] >= max(by.values())
    blind = {r.policy: r.hits for r in simulate(tr, [100], ["static", "default"], n_rows=5000)}
    assert blind["static"] == 0 and by["static"] > by["lru"], (by, blind)
    assert by["default"] > 1.03 * blind["default"], (by, blind)


def test_lookahead_hints_help_default():
    """With the next batches hinted, the default policy keeps the announced rows and hits
    more (measured: 6,869 hits without hints, 7,573 one batch ahead, 7,922 two ahead, of
    24,000); without its hints it would hit exactly as often."""
    rng = np.random.default_rng(7)
    tr = np.concatenate([rng.permutation(3000)[:200].repeat(2) for _ in range(60)]).astype(np.int64)
    rng.shuffle(tr[: tr.size // 2])
    hits = [simulate(tr, [150], ["default"], n_rows=3000, min_batch=100, lookahead=la)[0].hits for la in (0, 1, 2)]
    assert hits[0] * 1.05 < hits[1] < hits[2], hits


def test_simulate_errors():
    with pytest.raises(TierStoreError, match="unknown policy"):
        simulate(np.arange(10), [2], ["nope"])
    with pytest.raises(InvalidIdError, match="id 5 at flat position 5 is out of range for the trace with 5 rows"):
        simulate(np.arange(10), [2], ["lru"], n_rows=5)
    with pytest.raises(TierStoreError, match="profile"):
        simulate(np.arange(10), [2], ["static"], profile=np.ones(3, np.int64))
    # a negative id used to wrap around to the last row and count as its hit
    with pytest.raises(InvalidIdError, match="id -1 at flat position 1"):
        simulate(np.array([3, -1, 2, 3]), [2], ["lru"])
    with pytest.raises(IdTypeError):
        simulate(np.array([1.0, 2.0]), [2], ["lru"])


def test_simulate_tiers_accounting():
    tr = zipf_trace(20_000, 5000, seed=9)
    r = simulate_tiers(tr, 100, 1000, "lru", n_rows=5000, min_batch=64)
    dev, host = r["device"], r["host"]
    assert dev["hits"] + dev["misses"] == tr.size
    assert host["hits"] + host["misses"] <= dev["misses"]  # the host sees each batch's missed rows once
    assert host["hit_ratio"] > 0
    # a resident host tier serves every device miss; a resident device tier everything
    r2 = simulate_tiers(tr, 100, 5000, "lru", n_rows=5000, min_batch=64)
    assert r2["device"]["hits"] == dev["hits"] and r2["host"]["misses"] == 0
    assert simulate_tiers(tr, 5000, 0, "lru", n_rows=5000)["device"]["hit_ratio"] == 1.0
    # host tier alone (device disabled): it sees each batch's unique rows
    r3 = simulate_tiers(tr, 0, 1000, "lru", n_rows=5000, min_batch=64)
    assert r3["device"]["hits"] == 0 and r3["host"]["hits"] > 0
