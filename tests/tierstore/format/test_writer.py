"""The build's I/O engine: O_DIRECT with a buffered fallback, fast checksums, the hot order
without per-row arrays, and an ordered build whose memory does not grow with the table."""

from __future__ import annotations

import errno
import os
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore import CorruptDataError
from tierstore.format import writer
from tierstore.format.hotorder import HotOrder, load_hot_order
from tierstore.format.profile import hot_rows, profile_paths, save_profile
from tierstore.format.quant import NanScaleWarning
from tierstore.format.spec import PAGE_SIZE, page_checksums, read_manifest

from ...conftest import bits, random_table
from .conftest import refuse_o_direct

NAME = "w.engram.memory.weight"


def test_fast_checksums_equal_the_scheme_bit_for_bit():
    pages = np.random.default_rng(0).integers(0, 256, 37 * PAGE_SIZE, dtype=np.uint8)
    pages[:PAGE_SIZE] = 255  # words with the top bit set: the int64 product must wrap like uint64
    assert np.array_equal(writer.fast_page_checksums(pages), page_checksums(pages))
    assert writer.fast_page_checksums(pages[:0]).size == 0


def _counts(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.zeros(n, dtype=np.int64)
    c[rng.choice(n, n // 7, replace=False)] = rng.integers(1, 5, n // 7)  # many ties
    return c


@pytest.mark.parametrize("n", [1, 100, 5000])
def test_hot_order_is_hot_rows_fill_and_its_inverse(n):
    counts = _counts(n, n)
    want = hot_rows(counts, n, fill=True)
    order = HotOrder(hot_rows(counts, n), n)  # only the accessed rows
    assert np.array_equal(order.ids(0, n), want)
    for step in (1, 7, 256):  # chunked, across the hot/cold boundary
        got = np.concatenate([order.ids(a, min(a + step, n)) for a in range(0, n, step)])
        assert np.array_equal(got, want)
    pos = np.concatenate([order.positions(a, min(a + 33, n)) for a in range(0, n, 33)])
    assert np.array_equal(pos[want], np.arange(n))


def test_hot_between_lists_the_hot_rows_of_an_id_range():
    n = 5000
    order = HotOrder(hot_rows(_counts(n, 2), n), n)
    pos = order.positions(0, n)
    for a, b in [(0, n), (0, 0), (17, 900), (4999, 5000), (2500, 2501)]:
        below, ids, at = order.hot_between(a, b)
        hot = np.sort(order.hot)
        assert below == int((hot < a).sum())
        assert np.array_equal(ids, hot[(hot >= a) & (hot < b)])
        assert np.array_equal(at, pos[ids])


def test_hot_order_holds_only_the_accessed_rows():
    """Nothing in the order is an array over the table (at 384M rows a dense permutation was
    3 GB): 100 accessed rows of a 10M-row table cost a few KB."""
    n, hot = 10_000_000, np.arange(0, 10_000_000, 100_000)
    order = HotOrder(hot, n)
    held = sum(v.nbytes for v in vars(order).values() if isinstance(v, np.ndarray))
    assert held <= 32 * hot.size, held
    assert np.array_equal(order.ids(n - 3, n), [n - 3, n - 2, n - 1])


def test_load_hot_order_streams_the_saved_profile(tmp_path):
    counts = _counts(3000, 1)
    save_profile(tmp_path, NAME, counts)
    order = load_hot_order(tmp_path, NAME, 3000)
    assert np.array_equal(order.ids(0, 3000), hot_rows(counts, 3000, fill=True))
    assert load_hot_order(tmp_path, "other", 3000) is None
    data, _ = profile_paths(tmp_path, NAME)
    data.write_bytes(data.read_bytes()[:-9])
    with pytest.raises(CorruptDataError, match="unreadable"):
        load_hot_order(tmp_path, NAME, 3000)


@pytest.fixture
def ckpt(tmp_path):
    w = random_table(3000, 24, torch.float16, seed=5)  # 48 B rows, stride 48: not a page divisor
    path = tmp_path / "m.safetensors"
    save_file({NAME: w}, str(path))
    return path, w


def _rows(store, w):
    s = tierstore.open(store, device="cpu", device_budget=0, host_budget=0)
    try:
        got = s.lookup(next(iter(s.tables)), torch.arange(w.shape[0]))
    finally:
        s.close()
    assert torch.equal(bits(got), bits(w))


def test_direct_io_by_default_and_the_manifest_says_so(tmp_path, ckpt):
    out = tierstore.build_store(ckpt[0], tmp_path / "s", progress=False)
    assert read_manifest(out).tables[NAME].source["write_path"] == writer.DIRECT  # ext4 takes O_DIRECT
    assert tierstore.verify_store(out).ok
    _rows(out, ckpt[1])


@pytest.mark.parametrize("where", ["open", "write"])
def test_buffered_fallback_where_o_direct_is_refused(tmp_path, ckpt, monkeypatch, where):
    """A filesystem that refuses O_DIRECT (EINVAL at open, or at the first transfer) gets
    buffered writes; the store is the same and the manifest says which path ran."""
    refuse_o_direct(monkeypatch, where)
    out = tierstore.build_store(ckpt[0], tmp_path / "s", progress=False)
    assert read_manifest(out).tables[NAME].source["write_path"] == writer.BUFFERED
    assert tierstore.verify_store(out).ok
    _rows(out, ckpt[1])


@pytest.mark.parametrize("nth", [1, 3])  # the first and the last of 3 chunks
def test_a_failing_chunk_read_stops_the_pipeline_with_a_typed_error(tmp_path, ckpt, monkeypatch, nth):
    """A read that fails in the read-ahead thread stops the filler and the writer, and the
    caller gets the typed error; nothing is left behind."""
    from tierstore import faults

    monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", 48 * 1024)  # several chunks
    with faults.inject(faults.FaultPlan(nth=nth, op="read", kind="EIO")) as plan:
        with pytest.raises(tierstore.StoreIOError):
            tierstore.build_store(ckpt[0], tmp_path / "s", progress=False)
    assert plan.fired is not None and plan.fired[1] == str(ckpt[0])
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp-*"))


def test_reads_fall_back_to_the_page_cache_where_o_direct_is_refused(tmp_path, ckpt, monkeypatch):
    from tierstore.format import prefetch

    real_open = os.open

    def fake_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *a)

    monkeypatch.setattr(prefetch.os, "open", fake_open)
    monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", 48 * 1024)
    out = tierstore.build_store(ckpt[0], tmp_path / "s", progress=False)
    assert tierstore.verify_store(out).ok
    _rows(out, ckpt[1])


def _ordered_build_peak(tmp_path, rows: int) -> int:
    """Peak numpy (tracemalloc) bytes of an ordered build of a ``rows``-row table."""
    d = tmp_path / str(rows)
    d.mkdir()
    w = torch.zeros(rows, 8, dtype=torch.float16)  # 16 B rows
    save_file({NAME: w}, str(d / "m.safetensors"))
    first = tierstore.build_store(d / "m.safetensors", d / "first", progress=False)
    counts = np.zeros(rows, dtype=np.int64)
    counts[np.arange(0, rows, rows // 1000)] = 3  # the same 1,000 accessed rows at every size
    save_profile(first, NAME, counts)
    del counts
    tracemalloc.start()
    try:
        tierstore.build_store(d / "m.safetensors", d / "ordered", order_by=first, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ordered_build_memory_does_not_grow_with_the_table(tmp_path, monkeypatch):
    """Regression: the ordered build held the counts, a dense int64 permutation and its
    inverse, ~15.5 B per table row (6 GB at V4.1's 384M rows). Now the growth between a 1M-
    and a 4M-row table must stay under 1 B per row (the per-page checksums are 0.03)."""
    monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", 1 << 20)  # both tables span many chunks
    monkeypatch.setattr("tierstore.format.hotorder.CHUNK", 1 << 16)
    monkeypatch.setattr("tierstore.format.order._CHUNK_PAGES", 64)
    small, large = _ordered_build_peak(tmp_path, 1 << 20), _ordered_build_peak(tmp_path, 4 << 20)
    per_row = (large - small) / (3 << 20)
    assert per_row < 1.0, f"{per_row:.2f} B per table row ({small} -> {large} bytes peak)"


def test_a_shard_whose_chunk_is_not_whole_pages(tmp_path, monkeypatch):
    """Regression: a shard's chunk is the table's chunk / world; with 272-byte rows (V4.1's
    stride) that is not a whole number of pages, and main's build died with an untyped
    ValueError (checksumming a partial page) on any V4.1 shard of more than one chunk."""
    monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", 272 * 256 * 3)  # 3 page units: world 2 gives 1.5
    w = random_table(5000, 136, torch.float16, seed=2)  # 272-byte rows
    save_file({NAME: w}, str(tmp_path / "m.safetensors"))
    out = tierstore.build_store(tmp_path / "m.safetensors", tmp_path / "s", shard=(1, 2), progress=False)
    assert tierstore.verify_store(out).ok
    _rows(out, w[1::2])


def test_streamed_order_file_equals_the_whole_array_one(tmp_path, monkeypatch):
    """The order file written a chunk at a time (header last) is byte for byte write_order's."""
    import io

    from tierstore.format import order as order_file
    from tierstore.format.spec import TableInfo

    monkeypatch.setattr(order_file, "_CHUNK_PAGES", 2)  # several chunks, the last ending inside a page
    n = 5000
    counts = _counts(n, 3)
    hot = HotOrder(hot_rows(counts, n), n)
    info = TableInfo(name=NAME, rows=n, dim=8, dtype="float16", row_stride=16, file="t.rows",
                     checksum_file="t.sum", file_bytes=TableInfo.expected_file_bytes(n, 16), order_file="t.order")
    whole, streamed = io.BytesIO(), io.BytesIO()
    order_file.write_order(whole, info, hot.positions(0, n).astype(np.int32), "b1")
    order_file.write_order_streamed(streamed, info, hot.positions, "b1")
    assert streamed.getvalue() == whole.getvalue()


def _hot_counts(n: int, kind: str) -> np.ndarray:
    """Profiles that put the head's edges in different places."""
    rng = np.random.default_rng(len(kind))
    c = np.zeros(n, dtype=np.int64)
    if kind == "sparse":  # 1%: the head is part of one chunk
        c[rng.choice(n, n // 100, replace=False)] = rng.integers(1, 9, n // 100)
    elif kind == "wide":  # 40%, the first and last rows among them: a head of several chunks
        c[rng.choice(n, 2 * n // 5, replace=False)] = rng.integers(1, 50, 2 * n // 5)
        c[[0, n - 1]] = 99
    elif kind == "all":  # every row is hot: no cold row at all
        c[:] = rng.integers(1, 1000, n)
    elif kind == "run":  # one dense run of hot ids (a read chunk holds only hot rows)
        c[n // 3 : n // 3 + n // 4] = 5
    return c


def _ordered(tmp_path, w, kind: str, name: str = NAME):
    path = tmp_path / "m.safetensors"
    save_file({name: w}, str(path))
    first = tierstore.build_store(path, tmp_path / "first", progress=False)
    counts = _hot_counts(w.shape[0], kind)
    save_profile(first, name, counts)
    return path, first, HotOrder(hot_rows(counts, w.shape[0]), w.shape[0])


def _checkpoint_reads(monkeypatch, path) -> list[int]:
    """Bytes of each read of ``path`` (every read passes the fault seam with its size)."""
    from tierstore import faults

    seen: list[int] = []
    real = faults.point

    def point(op, p, n=0):
        if op == "read" and str(p) == str(path):
            seen.append(n)
        return real(op, p, n)

    monkeypatch.setattr(faults, "point", point)
    return seen


@pytest.mark.parametrize("kind", ["sparse", "wide", "all", "run"])
@pytest.mark.parametrize("head_chunks", [1000, 2])  # the head in one sweep, or in groups of 2 chunks
def test_ordered_build_is_one_sweep_per_head_group_and_exact(tmp_path, monkeypatch, kind, head_chunks):
    """Regression: the ordered build gathered the head's rows by spans over the whole table,
    then read the cold rows again (the checkpoint read ~2x, buffered, in the filler's thread).
    Now it reads the checkpoint once per head group (once when the head fits HEAD_BYTES), and
    every row serves exactly, wherever the head's edges fall."""
    from tierstore.format import sweep

    chunk = 48 * 256  # 256 rows of 48 bytes (24 fp16): 12 pages
    monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", chunk)
    monkeypatch.setattr(sweep, "HEAD_BYTES", head_chunks * chunk)
    n = 5003  # 20 chunks, the last one partial
    w = random_table(n, 24, torch.float16, seed=3)
    path, first, order = _ordered(tmp_path, w, kind)
    reads = _checkpoint_reads(monkeypatch, path)
    out = tierstore.build_store(path, tmp_path / "s", order_by=first, progress=False)
    head_rows = min(n, -(-order.hot.size // 256) * 256)
    groups = max(1, -(-head_rows // (head_chunks * 256)))
    table_bytes = n * 48
    assert sum(reads) <= groups * (table_bytes + 2 * PAGE_SIZE * 20), (sum(reads), groups, table_bytes)
    assert tierstore.verify_store(out).ok
    _rows(out, w)
    m = np.memmap(out / read_manifest(out).tables[NAME].file, dtype=np.uint8, mode="r", offset=PAGE_SIZE)
    assert np.array_equal(m[: n * 48].reshape(n, 48), bits(w).view(torch.uint8).numpy()[order.ids(0, n)])
    del m


@pytest.mark.parametrize("kind", ["wide", "all"])
def test_ordered_build_reads_the_checkpoint_once_however_large_the_head(tmp_path, monkeypatch, kind):
    """Regression: a head larger than ``HEAD_BYTES`` was built in groups, one more sweep of the
    checkpoint per group (16 sweeps of a 189 GiB checkpoint for V4.1's 16 GiB head). Now it is
    spilled into the head's own region of the row file in buckets (``format.rankspill``) and
    the checkpoint is read once; the memory the head takes is one bucket and the staging,
    not the head, and the file is the same bit for bit."""
    from tierstore.format import rankspill, sweep

    chunk = 48 * 256  # 256 rows of 48 bytes: 12 pages
    monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", chunk)
    monkeypatch.setattr(sweep, "HEAD_BYTES", 8 * chunk)  # the head is 63-157 chunks: spilled
    monkeypatch.setattr(sweep, "BUCKET_BYTES", 8 * chunk)  # buckets of 8 chunks: 8-20 of them
    sizes: list[int] = []
    real = rankspill.aligned_buffer
    monkeypatch.setattr(rankspill, "aligned_buffer", lambda nbytes, populate=False: sizes.append(nbytes) or
                        real(nbytes, populate))
    n = 40_011
    w = random_table(n, 24, torch.float16, seed=6)
    path, first, order = _ordered(tmp_path, w, kind)
    reads = _checkpoint_reads(monkeypatch, path)
    out = tierstore.build_store(path, tmp_path / "s", order_by=first, progress=False)
    head_bytes = -(-order.hot.size // 256) * 256 * 48
    assert head_bytes >= 60 * chunk
    assert sum(reads) <= n * 48 + 2 * PAGE_SIZE * (n // 256 + 1), (sum(reads), n * 48)  # one sweep, not 8-20
    assert sum(sizes) < head_bytes / 2, (sizes, head_bytes)  # every buffer of the head's pass, together
    assert tierstore.verify_store(out).ok
    _rows(out, w)
    m = np.memmap(out / read_manifest(out).tables[NAME].file, dtype=np.uint8, mode="r", offset=PAGE_SIZE)
    assert np.array_equal(m[: n * 48].reshape(n, 48), bits(w).view(torch.uint8).numpy()[order.ids(0, n)])
    del m


@pytest.mark.parametrize("cap", ["bytes", "rows"])
def test_ordered_build_writes_the_head_sequentially(tmp_path, monkeypatch, cap):
    """Regression: the sweep scattered each hot row into the head buffer at its rank
    (``index_copy_`` at random rows of up to 1 GiB: ~5x the cost of a gather, 0.05-0.11x dd
    with every row hot). Now the hot rows are appended in id order and each head chunk is
    gathered in rank order: no indexed write anywhere in the build. The head groups are cut
    by ``HEAD_BYTES`` or by ``HEAD_ROWS`` (the gather index's cap), whichever binds."""
    from tierstore.format import sweep

    def refuse(*a, **k):
        raise AssertionError("an indexed scatter in the ordered build")

    for name in ("index_copy_", "index_put_", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", 48 * 256)
    monkeypatch.setattr(sweep, "HEAD_BYTES" if cap == "bytes" else "HEAD_ROWS", 3 * 256 * (48 if cap == "bytes" else 1))
    n = 5003
    w = random_table(n, 24, torch.float16, seed=4)
    path, first, order = _ordered(tmp_path, w, "all")
    out = tierstore.build_store(path, tmp_path / "s", order_by=first, progress=False)
    assert tierstore.verify_store(out).ok
    m = np.memmap(out / read_manifest(out).tables[NAME].file, dtype=np.uint8, mode="r", offset=PAGE_SIZE)
    assert np.array_equal(m[: n * 48].reshape(n, 48), bits(w).view(torch.uint8).numpy()[order.ids(0, n)])
    del m


def test_ordered_build_converts_dtype_and_reads_torch_checkpoints(tmp_path, monkeypatch):
    """The sweep's other inputs: a dtype conversion (float32 -> float16, round to nearest) and a
    torch checkpoint (no O_DIRECT read-ahead: read through a scratch buffer)."""
    from tierstore.format import sweep

    monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", 32 * 128)
    monkeypatch.setattr(sweep, "HEAD_BYTES", 3 * 32 * 128)
    n = 3001
    w = random_table(n, 16, torch.float32, seed=5)
    path, first, _ = _ordered(tmp_path, w, "wide")
    out = tierstore.build_store(path, tmp_path / "s", order_by=first, dtype="float16", progress=False)
    assert tierstore.verify_store(out).ok
    _rows(out, w.to(torch.float16))
    torch.save({NAME: w}, tmp_path / "m.pt")
    out = tierstore.build_store(tmp_path / "m.pt", tmp_path / "pt", order_by=first, progress=False)
    assert tierstore.verify_store(out).ok
    _rows(out, w)


def test_ordered_v41_build_keeps_scales_and_counts_nan_scales_once(tmp_path, monkeypatch):
    """A quantized table through the sweep: values and scales from two tensors land side by
    side; the NaN scales are counted once however many sweeps the head needs."""
    from tierstore.format import sweep

    from ...v41 import embed, write_v41_checkpoint

    monkeypatch.setattr("tierstore.format.build.CHUNK_BYTES", 272 * 64)  # 64 rows, 17 pages
    monkeypatch.setattr(sweep, "HEAD_BYTES", 2 * 272 * 64)
    layers = {1: 1001}
    write_v41_checkpoint(tmp_path / "ckpt", layers, scale_codes=(200, 256))  # some 0xFF (NaN) scales
    with pytest.warns(NanScaleWarning):
        plain = tierstore.build_store(tmp_path / "ckpt", tmp_path / "plain", progress=False)
    save_profile(plain, embed(1), _hot_counts(1001, "wide"))
    with pytest.warns(NanScaleWarning):
        ordered = tierstore.build_store(tmp_path / "ckpt", tmp_path / "ordered", order_by=plain, progress=False)
    a, b = read_manifest(plain).tables[embed(1)], read_manifest(ordered).tables[embed(1)]
    assert a.source["nan_scales"] == b.source["nan_scales"] > 0
    assert tierstore.verify_store(ordered).ok
    order = HotOrder(hot_rows(_hot_counts(1001, "wide"), 1001), 1001)
    rows = lambda s, t: np.memmap(s / t.file, dtype=np.uint8, mode="r", offset=PAGE_SIZE)[: 1001 * 272].reshape(1001, 272)  # noqa: E731
    assert np.array_equal(rows(ordered, b), rows(plain, a)[order.ids(0, 1001)])
