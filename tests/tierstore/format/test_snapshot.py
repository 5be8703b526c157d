"""The hot-set snapshot file (tierstore.format.snapshot): layout, prefixes, checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierstore.errors import CorruptDataError, FormatVersionError, TierStoreError
from tierstore.format.snapshot import (SNAPSHOT_MAGIC, SnapshotLayout, parse_snapshot_header, read_snapshot,
                                       write_snapshot)
from tierstore.format.spec import PAGE_SIZE, TableInfo, make_header

from .conftest import refuse_o_direct


def _info(rows: int, dim: int, dtype: str = "uint8") -> TableInfo:
    stride = (dim + 15) // 16 * 16
    return TableInfo("t", rows, dim, dtype, stride, "tables/t0000.rows", "tables/t0000.sum",
                     TableInfo.expected_file_bytes(rows, stride))


def _table(rows: int, row_bytes: int) -> np.ndarray:
    return np.random.default_rng(rows).integers(0, 256, (rows, row_bytes), dtype=np.uint8)


@pytest.mark.parametrize("row_bytes", [264, 4096, 5000, 8])
def test_round_trip_and_every_prefix(tmp_path, row_bytes):
    """Rows of any width (a 264-byte V4.1 row straddles pages, a 5000-byte one spans two),
    written in small chunks, read back whole and as prefixes, bit for bit."""
    info, table = _info(3000, row_bytes), _table(3000, row_bytes)
    ids = np.random.default_rng(1).permutation(3000)[:1234]
    calls = []

    def fetch(chunk):
        calls.append(len(chunk))
        return table[chunk]

    head = write_snapshot(tmp_path / "t.hot", info, "b" * 32, ids, fetch, chunk_bytes=50 * row_bytes + 7)
    assert max(calls) <= 50 and sum(calls) == len(ids)
    lay = SnapshotLayout(len(ids), row_bytes, 4)
    assert (tmp_path / "t.hot").stat().st_size == lay.file_bytes == head["bytes"]
    for k in (None, 0, 1, 17, 1234, 5000):
        h, got_ids, rows = read_snapshot(tmp_path / "t.hot", k)
        n = len(ids) if k is None else min(k, len(ids))
        assert h["build_id"] == "b" * 32 and h["n"] == len(ids)
        assert np.array_equal(got_ids, ids[:n]) and np.array_equal(rows, table[ids[:n]])


def test_a_flipped_bit_anywhere_read_is_caught(tmp_path):
    info, table = _info(500, 264), _table(500, 264)
    ids = np.arange(499, -1, -1)
    write_snapshot(tmp_path / "t.hot", info, "x", ids, lambda c: table[c])
    raw = (tmp_path / "t.hot").read_bytes()
    lay = SnapshotLayout(500, 264, 4)
    for page in (0, lay.first_data_page, lay.first_data_page + lay.id_pages, lay.first_data_page + lay.data_pages - 1):
        bad = bytearray(raw)
        bad[page * PAGE_SIZE + 100] ^= 1
        (tmp_path / "bad.hot").write_bytes(bytes(bad))
        with pytest.raises(CorruptDataError):
            read_snapshot(tmp_path / "bad.hot")
    (tmp_path / "short.hot").write_bytes(raw[:-PAGE_SIZE])
    with pytest.raises(CorruptDataError, match="truncated"):
        read_snapshot(tmp_path / "short.hot")


def test_header_checks(tmp_path):
    info = _info(10, 16)
    head = {"format": "tierstore-hotset", "version": 2}
    with pytest.raises(FormatVersionError, match="profile --save-profile"):
        parse_snapshot_header(make_header(SNAPSHOT_MAGIC, head, "snapshot"), "x")
    with pytest.raises(CorruptDataError, match="magic"):
        parse_snapshot_header(b"\0" * PAGE_SIZE, "x")
    write_snapshot(tmp_path / "t.hot", info, "id", np.arange(10), lambda c: np.zeros((len(c), 16), np.uint8))
    page = (tmp_path / "t.hot").read_bytes()[:PAGE_SIZE]
    n = int.from_bytes(page[16:20], "little")
    doc = json.loads(page[20:20 + n])
    doc["n"] = 1000  # its page counts no longer match
    with pytest.raises(CorruptDataError, match="page counts"):
        parse_snapshot_header(make_header(SNAPSHOT_MAGIC, doc, "snapshot"), "x")
    with pytest.raises(TierStoreError, match="row ids"):
        write_snapshot(tmp_path / "u.hot", info, "id", np.array([10]), lambda c: c)


def test_rows_are_fetched_in_file_order(tmp_path):
    """The write asks for rows in row-id (file) order, whatever their ranks: the ranked rows
    are scattered over the row file, and fetched in rank order each chunk read a 4 KiB page
    per row at the disk's random-read rate (41 MB/s for an 8.2 GiB snapshot). The file is
    still in rank order, bit for bit, over several buckets of ranks."""
    info, table = _info(20000, 264), _table(20000, 264)
    ids = np.random.default_rng(5).permutation(20000)[:7000]  # ranks scattered over the table
    calls = []

    def fetch(chunk):
        calls.append(np.array(chunk))
        return table[chunk]

    write_snapshot(tmp_path / "t.hot", info, "b" * 32, ids, fetch, chunk_bytes=300 * 264)
    got = np.concatenate(calls)
    assert len(calls) > 1 and np.array_equal(got, np.sort(ids)), "rows were not fetched in file order"
    _, got_ids, rows = read_snapshot(tmp_path / "t.hot")
    assert np.array_equal(got_ids, ids) and np.array_equal(rows, table[ids])


@pytest.mark.parametrize("where", ["open", "write"])
def test_buffered_fallback_where_o_direct_is_refused(tmp_path, monkeypatch, where):
    """A filesystem that refuses O_DIRECT (EINVAL at open, or at the first transfer) gets
    buffered writes, in the rank pass's spill and in the ranked write alike; the snapshot is
    the same file, bit for bit, as the direct writes make."""
    info, table = _info(20000, 264), _table(20000, 264)
    ids = np.random.default_rng(7).permutation(20000)[:9000]
    spill = dict(memory=64 * 264, bucket_bytes=1000 * 264)  # several buckets spilled and read back
    write_snapshot(tmp_path / "direct.hot", info, "b" * 32, ids, lambda c: table[c], chunk_bytes=700 * 264, **spill)
    refused = refuse_o_direct(monkeypatch, where)
    write_snapshot(tmp_path / "buffered.hot", info, "b" * 32, ids, lambda c: table[c], chunk_bytes=700 * 264,
                   **spill)
    monkeypatch.undo()
    assert len(refused) >= 2, "both writers should have tried O_DIRECT and been refused"
    assert (tmp_path / "buffered.hot").read_bytes() == (tmp_path / "direct.hot").read_bytes()
    _, got_ids, rows = read_snapshot(tmp_path / "buffered.hot")
    assert np.array_equal(got_ids, ids) and np.array_equal(rows, table[ids])
