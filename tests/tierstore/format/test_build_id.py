"""One build per open (issue 22, items 2-3): every file carries the build id, an open that
races a rebuild never mixes two builds' files, and the order file is checksummed."""

from __future__ import annotations

import gc
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
import tierstore.serve.store as store_module
from tierstore import CorruptDataError, StoreChangedError
from tierstore.format.order import load_order
from tierstore.format.profile import save_profile
from tierstore.format.spec import (PAGE_SIZE, ROWS_MAGIC, TableInfo, make_header, manifest_digest, page_checksums,
                                   read_header, read_manifest)
from tierstore.serve.store import OPEN_TRIES

from ...conftest import bits, random_table
from .legacy import as_version3

N = "blocks.1.engram.memory.weight"
ROWS = 4096


@pytest.fixture
def ckpt(tmp_path):
    """(checkpoint, its table, a store whose profile makes row 4095 the hottest, then 4094, ...)."""
    w = random_table(ROWS, 16, torch.float32, seed=7)  # 64 B rows: 64 per page
    path = tmp_path / "m.safetensors"
    save_file({N: w}, str(path))
    prof = tierstore.build_store(path, tmp_path / "prof", progress=False)
    save_profile(prof, N, np.arange(ROWS, dtype=np.int64))
    return path, w, prof


def _fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_a_rebuild_between_manifest_and_files_opens_one_build(tmp_path, monkeypatch, ckpt):
    """Store.__init__ read the manifest of a plain build, a `--force` hot-ordered rebuild then
    replaced OUT, and the row file opened was the new one: lookup(N, [0, 1]) returned rows
    4095 and 4094. The open now sees the new build's id in the row file, reads the manifest
    again and opens the new build whole."""
    path, w, prof = ckpt
    out = tierstore.build_store(path, tmp_path / "OUT", progress=False)
    real = store_module.read_manifest
    seen: list[str] = []

    def racing(p):
        m = real(p)
        if not seen:  # the first read only: a rebuild lands right after it
            tierstore.build_store(path, out, force=True, order_by=prof, progress=False)
        seen.append(m.build_id)
        return m

    monkeypatch.setattr(store_module, "read_manifest", racing)
    with tierstore.open(out, device="cpu") as st:
        got = st.lookup(N, [0, 1, ROWS - 1])
        assert torch.equal(bits(got), bits(w[[0, 1, ROWS - 1]])), "rows of a mix of two builds"
        assert st.manifest.build_id == real(out).build_id != seen[0]
        assert st.tables[N].order_file is not None  # the ordered build, manifest and files alike


def test_an_open_rebuilt_every_time_raises_store_changed(tmp_path, monkeypatch, ckpt):
    path, w, prof = ckpt
    out = tierstore.build_store(path, tmp_path / "OUT", progress=False)
    real = store_module.read_manifest
    builds = [0]

    def racing(p):
        m = real(p)
        builds[0] += 1  # alternate layouts, so every file of the next build differs
        tierstore.build_store(path, out, force=True, order_by=prof if builds[0] % 2 else None, progress=False)
        return m

    before = _fds()
    monkeypatch.setattr(store_module, "read_manifest", racing)
    with pytest.raises(StoreChangedError, match="rebuilt while it was opened") as e:
        tierstore.open(out, device="cpu")
    assert str(out) in str(e.value) and builds[0] == OPEN_TRIES + 1  # each open, then the check after it
    del e
    assert _fds() <= before, "a failed open kept files open"


def test_files_of_another_build_are_refused(tmp_path, ckpt):
    """The header page recorded neither the build id nor the layout, so a row file and its
    checksums from a hot-ordered build of the same checkpoint passed every check in a plain
    store, and lookups returned other rows."""
    path, w, prof = ckpt
    out = tierstore.build_store(path, tmp_path / "OUT", progress=False)
    other = tierstore.build_store(path, tmp_path / "other", order_by=prof, progress=False)
    info = read_manifest(out).tables[N]
    for f in (info.file, info.checksum_file):
        shutil.copyfile(other / f, out / f)
    with pytest.raises(CorruptDataError, match="belongs to build"):
        tierstore.open(out, device="cpu")
    report = tierstore.verify_store(out, progress=False)
    assert not report.ok and "belongs to build" in report.mismatches[0].detail


def _ordered(tmp_path, ckpt):
    path, w, prof = ckpt
    out = tierstore.build_store(path, tmp_path / "OUT", order_by=prof, progress=False)
    return out, out / read_manifest(out).tables[N].order_file, w


def _edit_entries(order, edit) -> None:
    """Apply ``edit`` to the int32 entries of an order file (its hot ids, padding included), in
    place (data from byte 4096)."""
    raw = bytearray(order.read_bytes())
    n = (len(raw) - PAGE_SIZE) // 4
    pos = np.frombuffer(raw, dtype="<i4", offset=PAGE_SIZE, count=n).copy()
    edit(pos)
    raw[PAGE_SIZE : PAGE_SIZE + 4 * n] = pos.tobytes()
    order.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["swap", "flip"])
def test_a_damaged_order_file_is_caught_at_open_and_by_verify(tmp_path, ckpt, damage):
    """The order file had no checksum: two entries swapped passed verify (still a permutation)
    and lookups of both rows returned each other's bytes; a flipped bit was caught by verify
    but open and lookups returned the wrong row."""
    out, order, w = _ordered(tmp_path, ckpt)
    if damage == "swap":
        _edit_entries(order, lambda p: p.__setitem__([3, 4000], p[[4000, 3]]))
    else:
        _edit_entries(order, lambda p: p.__setitem__(5, p[5] ^ 2))
    with pytest.raises(CorruptDataError, match="fails its checksum"):
        tierstore.open(out, device="cpu")
    report = tierstore.verify_store(out, progress=False)
    assert not report.ok and any("fails its checksum" in m.detail for m in report.mismatches)


def test_the_order_checksum_covers_every_page(tmp_path, ckpt):
    """Negative control and reach: the intact file opens; a change in its last (padded) page
    is caught too."""
    out, order, w = _ordered(tmp_path, ckpt)
    with tierstore.open(out, device="cpu") as st:
        assert torch.equal(bits(st.lookup(N, [0, 5, ROWS - 1])), bits(w[[0, 5, ROWS - 1]]))
    _edit_entries(order, lambda p: p.__setitem__(ROWS - 1, p[ROWS - 1] ^ (1 << 30)))
    with pytest.raises(CorruptDataError, match="fails its checksum"):
        tierstore.open(out, device="cpu")


def _as_version2(out) -> None:
    """Rewrite a store as a version-2 build wrote it: manifest version 2, row headers without
    build id or layout, a bare .npy order file (no checksum, no id)."""
    m = json.loads((out / "manifest.json").read_text())
    for t in m["tables"]:
        head = read_header((out / t["file"]).read_bytes()[:PAGE_SIZE], ROWS_MAGIC, "test", "row file")
        del head["build_id"], head["ordered"]
        head["version"] = 2
        page = make_header(ROWS_MAGIC, head, "row-file")
        with open(out / t["file"], "r+b") as f:
            f.write(page)
        sums = np.fromfile(out / t["checksum_file"], dtype="<u8")
        sums[0] = page_checksums(np.frombuffer(page, dtype=np.uint8))[0]
        sums.tofile(out / t["checksum_file"])
        if t.get("order_file"):
            pos = load_order(out, TableInfo(**t)).of(np.arange(t["rows"]))
            os.unlink(out / t["order_file"])
            t["order_file"] += ".npy"
            np.save(out / t["order_file"], pos)
    m["version"] = 2
    m["digest"] = manifest_digest(m)
    (out / "manifest.json").write_text(json.dumps(m))


def test_a_version3_ordered_store_still_opens_and_verifies(tmp_path, ckpt):
    """Version 3 wrote each row's position (the dense order file); version 4 writes the hot
    ids only. A version-3 store opens, looks rows up exactly and verifies."""
    path, w, prof = ckpt
    out = tierstore.build_store(path, tmp_path / "OUT", order_by=prof, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["version"] == 4
    as_version3(out)
    assert tierstore.verify_store(out, progress=False).ok
    for budget in (0, ROWS * 64):
        with tierstore.open(out, device="cpu", host_budget=budget) as st:
            ids = torch.tensor([0, 1, 77, 4000, ROWS - 1])
            assert torch.equal(bits(st.lookup(N, ids)), bits(w[ids]))


def test_a_plain_store_is_still_written_as_version_3(tmp_path, ckpt):
    """Only the order file changed in version 4: a store without an ordered table is what
    version 3 wrote, so older readers still open it."""
    path, w, prof = ckpt
    assert read_manifest(tierstore.build_store(path, tmp_path / "OUT", progress=False)).version == 3


@pytest.mark.parametrize("ordered", [False, True], ids=["plain", "ordered"])
def test_a_version2_store_still_opens_and_verifies(tmp_path, ckpt, ordered):
    """Stores built before version 3 carry no build id in their files: they open as before
    (without the pin) and verify."""
    path, w, prof = ckpt
    out = tierstore.build_store(path, tmp_path / "OUT", order_by=prof if ordered else None, progress=False)
    _as_version2(out)
    assert read_manifest(out).version == 2 and read_manifest(out).pinned_build is None
    assert tierstore.verify_store(out, progress=False).ok
    with tierstore.open(out, device="cpu") as st:
        ids = torch.tensor([0, 1, 77, ROWS - 1])
        assert torch.equal(bits(st.lookup(N, ids)), bits(w[ids]))
