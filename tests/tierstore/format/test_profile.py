"""Row access-count profiles stored in a store directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierstore.errors import CorruptDataError, FormatVersionError, IdTypeError, InvalidIdError, TierStoreError
import tierstore.format.profile as profile_mod
from tierstore.format.profile import (TopProfile, count_rows, has_profile, hot_rows, load_profile, profile_info,
                                      profile_paths, save_profile, zipf_fit)

from .legacy import save_v1_profile


def test_roundtrip(tmp_path):
    counts = np.bincount(np.random.default_rng(0).zipf(1.2, 10_000) % 1000, minlength=1000)
    assert not has_profile(tmp_path, "blocks.1.engram.memory.weight")
    p = save_profile(tmp_path, "blocks.1.engram.memory.weight", counts, meta={"source": "test"})
    assert p.name.endswith(".npy.zst") and p.parent.name == "profiles"
    back = load_profile(tmp_path, "blocks.1.engram.memory.weight", n_rows=1000)
    info = profile_info(tmp_path, "blocks.1.engram.memory.weight")
    assert back.dtype == np.int64 and (back == counts).all()
    assert info["format"] == "tierstore-profile" and info["total"] == counts.sum()
    assert info["source"] == "test" and info["version"] == 2 and info["nonzero"] == np.count_nonzero(counts)
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
    meta.write_text(json.dumps({**info, "version": 3}))
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


def _zipf_counts(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.minimum(rng.zipf(1.3, n), 10**6) * (rng.random(n) < 0.3)
    c[: min(n, 40)] = 7  # ties across chunk boundaries: broken by row id
    return c.astype(np.int64)


@pytest.mark.parametrize("version", [1, 2])
def test_top_load_equals_hot_rows_of_the_dense_counts(tmp_path, monkeypatch, version):
    """load_profile(top=k) keeps exactly hot_rows(dense, k) with their counts; a version-1
    file is streamed in chunks (small here, so the running top list merges many)."""
    monkeypatch.setattr(profile_mod, "_CHUNK", 1000)
    monkeypatch.setattr(profile_mod, "_PAIRS", 1000)
    for n in (10, 4321, 100_000):
        c = _zipf_counts(n, n)
        (save_v1_profile if version == 1 else save_profile)(tmp_path, "t", c)
        assert np.array_equal(load_profile(tmp_path, "t"), c)
        nonzero = int(np.count_nonzero(c))
        for k in (1, 5, 39, 41, 999, 5000, nonzero):
            tp = load_profile(tmp_path, "t", top=k)
            assert isinstance(tp, TopProfile) and tp.n_rows == n and tp.complete == (nonzero <= k)
            assert tp.rows.tolist() == hot_rows(c, k).tolist(), (n, k)
            assert np.array_equal(tp.counts, c[tp.rows])
            assert hot_rows(tp, k // 2 + 1).tolist() == hot_rows(c, k // 2 + 1).tolist()
            if tp.complete:
                assert hot_rows(tp, k + 77, fill=True).tolist() == hot_rows(c, k + 77, fill=True).tolist()
            elif k < n:
                with pytest.raises(TierStoreError, match="top="):
                    hot_rows(tp, k + 1)


def test_sparse_profile_file_is_sized_by_the_rows_read(tmp_path):
    """A version-2 file holds the rows read: a table of 2**30 rows with 1,000 read saves and
    loads (top and dense-free) without a count per table row."""
    n_rows = 1 << 30
    rows = np.random.default_rng(0).choice(n_rows, 1000, replace=False)
    counts = np.arange(1, 1001)
    data = save_profile(tmp_path, "t", (rows, counts), n_rows=n_rows)
    assert data.stat().st_size < 64 << 10
    tp = load_profile(tmp_path, "t", n_rows=n_rows, top=10)
    assert tp.rows.tolist() == rows[::-1][:10].tolist() and not tp.complete
    assert profile_info(tmp_path, "t")["nonzero"] == 1000
    with pytest.raises(TierStoreError, match="n_rows="):
        save_profile(tmp_path, "t", (rows, counts))


def test_sparse_profile_damage_is_caught(tmp_path):
    """A changed row id keeps every total: the file's own SHA-256 catches it."""
    import io

    import zstandard

    save_profile(tmp_path, "t", np.array([0, 3, 0, 5, 1]))
    data, meta = profile_paths(tmp_path, "t")
    raw = bytearray(zstandard.ZstdDecompressor().decompress(data.read_bytes()))
    pairs = np.load(io.BytesIO(bytes(raw[:-40])))
    assert pairs.tolist() == [[1, 3, 4], [3, 5, 1]]
    buf = io.BytesIO()
    pairs[0, 0] = 2  # rows 1, 3, 4 -> 2, 3, 4: sorted, in range, same counts
    np.save(buf, pairs)
    raw[: len(buf.getvalue())] = buf.getvalue()
    data.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(bytes(raw)))
    for top in (None, 2):
        with pytest.raises(CorruptDataError, match="checksum"):
            load_profile(tmp_path, "t", top=top)


def test_a_save_torn_between_its_two_files_loads_the_new_counts(tmp_path):
    """New counts file, old JSON (the process died in between): the counts load whole."""
    old, new = np.array([5, 0, 1, 0]), np.array([0, 9, 9, 2])
    save_profile(tmp_path, "t", old)
    data, meta = profile_paths(tmp_path, "t")
    old_meta = meta.read_bytes()
    save_profile(tmp_path, "t", new)
    meta.write_bytes(old_meta)
    assert load_profile(tmp_path, "t").tolist() == new.tolist()
    assert load_profile(tmp_path, "t", top=2).rows.tolist() == [1, 2]


def _whole_top(data, info, k):
    """The top-k load written plainly: the whole file, then a full sort."""
    rows, counts = profile_mod._load_sparse(data, info)
    order = np.lexsort((rows, -counts))[:k]  # count descending, then row id
    return TopProfile(rows[order], counts[order], info["rows"], complete=rows.size <= k)


def _same_top(a: TopProfile, b: TopProfile) -> bool:
    return (a.rows.dtype == b.rows.dtype == a.counts.dtype == b.counts.dtype == np.int64
            and np.array_equal(a.rows, b.rows) and np.array_equal(a.counts, b.counts)
            and a.n_rows == b.n_rows and a.complete == b.complete)


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
@pytest.mark.parametrize("seed", range(6))
def test_streamed_sparse_top_equals_the_whole_load(tmp_path, monkeypatch, seed, chunk):
    """A version-2 top-k load streams the file (memory O(k + chunk)) and keeps exactly
    what the whole load + _keep_top kept: same rows, counts, order (ties by row id) and
    ``complete``, for every k (0, inside runs of equal counts, n, past n) and chunk size."""
    monkeypatch.setattr(profile_mod, "_PAIRS", chunk)
    rng = np.random.default_rng(seed)
    n_rows = int(rng.integers(1, 5000))
    n = int(rng.integers(1, n_rows + 1)) if seed else 0  # seed 0: an empty profile
    rows = rng.choice(n_rows, n, replace=False)
    counts = rng.integers(1, int(rng.integers(2, 6)), n)  # few distinct counts: long runs of ties
    save_profile(tmp_path, "t", (rows, counts), n_rows=n_rows)
    data, _ = profile_paths(tmp_path, "t")
    info = profile_info(tmp_path, "t")
    srt = np.sort(counts)[::-1]
    inside_runs = [int(i) for i in np.flatnonzero(srt[1:] == srt[:-1])[:: max(1, n // 7)] + 1]  # k mid-run
    for k in sorted({0, 1, 2, n // 2, max(0, n - 1), n, n + 1, n + 100, *inside_runs}):
        got = load_profile(tmp_path, "t", top=k)
        assert _same_top(got, _whole_top(data, info, k)), (seed, chunk, k)
        want = sorted(zip(rows.tolist(), counts.tolist()), key=lambda rc: (-rc[1], rc[0]))[:k]
        assert list(zip(got.rows.tolist(), got.counts.tolist())) == want, (seed, chunk, k)
        assert got.complete == (n <= k)


def test_streamed_top_of_a_recorded_profile(tmp_path, monkeypatch):
    """A profile as `tierstore profile` saves it (count_rows of a Zipf trace, sparse), in
    chunks of many sizes: the streamed top k equals the whole load's, for k around the
    cache sizes a store asks for."""
    n_rows = 200_000
    trace = np.random.default_rng(3).zipf(1.1, 400_000) % n_rows
    save_profile(tmp_path, "t", count_rows(trace, n_rows, sparse=True), n_rows=n_rows, meta={"source": "trace"})
    data, _ = profile_paths(tmp_path, "t")
    info = profile_info(tmp_path, "t")
    for chunk in (999, 1 << 14, 1 << 20):
        monkeypatch.setattr(profile_mod, "_PAIRS", chunk)
        for k in (0, 1, 100, 4096, 30_000, info["nonzero"] - 1, info["nonzero"], n_rows):
            assert _same_top(load_profile(tmp_path, "t", n_rows=n_rows, top=k), _whole_top(data, info, k)), (chunk, k)


def _rewrite_body(data, edit, *, rehash=True, cut=0):
    """Decompress a version-2 counts file, ``edit(pairs, n_rows) -> (npy bytes, n_rows)``,
    and write it back with a valid SHA-256 (``rehash``) and zstd frame: only the structure
    checks can catch it then. ``cut``: drop that many bytes of the body's end first."""
    import hashlib
    import io

    import zstandard

    raw = zstandard.ZstdDecompressor().decompress(data.read_bytes())
    pairs = np.load(io.BytesIO(raw[:-40]))
    npy, n_rows = edit(pairs, int.from_bytes(raw[-40:-32], "little"))
    body = npy + int(n_rows).to_bytes(8, "little")
    body = body[: len(body) - cut]
    digest = hashlib.sha256(body).digest() if rehash else raw[-32:]
    data.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(body + digest))


def _npy(a) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _swap_rows(p, n):
    p[0, [0, 1]] = p[0, [1, 0]]
    return _npy(p), n


def _set(i, j, v):
    def edit(p, n):
        p[i, j] = v
        return _npy(p), n
    return edit


_DAMAGE = {
    "rows out of order": lambda d: _rewrite_body(d, _swap_rows),
    "row repeated": lambda d: _rewrite_body(d, _set(0, 1, 1)),
    "row negative": lambda d: _rewrite_body(d, _set(0, 0, -1)),
    "row out of range": lambda d: _rewrite_body(d, _set(0, 2, 5)),
    "count zero": lambda d: _rewrite_body(d, _set(1, 1, 0)),
    "count negative": lambda d: _rewrite_body(d, _set(1, 2, -4)),
    "another table's rows": lambda d: _rewrite_body(d, lambda p, n: (_npy(p), n + 1)),
    "int32 pairs": lambda d: _rewrite_body(d, lambda p, n: (_npy(p.astype(np.int32)), n)),
    "one row of pairs": lambda d: _rewrite_body(d, lambda p, n: (_npy(p[:1]), n)),
    "fortran order": lambda d: _rewrite_body(d, lambda p, n: (_npy(np.asfortranarray(p)), n)),
    "body cut short": lambda d: _rewrite_body(d, lambda p, n: (_npy(p), n), cut=5),
    "body cut inside the rows": lambda d: _rewrite_body(d, lambda p, n: (_npy(p)[:-40], n)),
    "data past the body": lambda d: _rewrite_body(d, lambda p, n: (_npy(p) + b"x" * 8, n)),
    "bad checksum": lambda d: _rewrite_body(d, _set(1, 0, 4), rehash=False),
    "file truncated": lambda d: d.write_bytes(d.read_bytes()[:-7]),
    "file cut in half": lambda d: d.write_bytes(d.read_bytes()[: d.stat().st_size // 2]),
    "file empty": lambda d: d.write_bytes(b""),
    "file missing": lambda d: d.unlink(),
    "byte flipped": lambda d: d.write_bytes(d.read_bytes()[:20] + bytes([d.read_bytes()[20] ^ 0x5A])
                                            + d.read_bytes()[21:]),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_sparse_profile_damage_raises_the_typed_error(tmp_path, monkeypatch, damage):
    """Every damage to a version-2 file raises CorruptDataError from the whole load and
    from the streamed top-k load (chunks of 1 and of 1M pairs), never a numpy or zstd error
    or a wrong ranking. The rows are 1, 3, 4 of 5, counts 3, 5, 1."""
    save_profile(tmp_path, "t", np.array([0, 3, 0, 5, 1]))
    data, _ = profile_paths(tmp_path, "t")
    _DAMAGE[damage](data)
    for chunk in (1, 1 << 20):
        monkeypatch.setattr(profile_mod, "_PAIRS", chunk)
        for top in (None, 0, 2, 10):
            with pytest.raises(CorruptDataError):
                load_profile(tmp_path, "t", top=top)


def test_streamed_top_load_memory_is_o_k_plus_chunk(tmp_path, monkeypatch):
    """A top-k load of a version-2 profile 50x larger than k allocates O(k + chunk), not
    the whole file: before streaming it decompressed all 16 B per pair (32 MB here) and
    held them at once (+425 MiB at a static store's open over a 13.1M-row profile)."""
    import tracemalloc

    n, k, chunk = 2_000_000, 40_000, 1 << 16
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(50_000_000, n, replace=False))
    save_profile(tmp_path, "t", (rows, rng.integers(1, 1000, n)), n_rows=50_000_000)
    monkeypatch.setattr(profile_mod, "_PAIRS", chunk)
    tracemalloc.start()
    try:
        tp = load_profile(tmp_path, "t", top=k)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tp.rows.size == k and not tp.complete
    bound = 64 * (k + chunk)  # ~6.9 MB: the kept (row, count) pairs and a chunk's temporaries
    assert peak <= bound, f"a top-{k} load of {n} pairs peaked at {peak / 2**20:.1f} MiB (bound {bound / 2**20:.1f})"
