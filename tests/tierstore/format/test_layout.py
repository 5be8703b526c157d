"""Hotness-ordered layout: hot rows first in the row file, lookups unchanged, fewer cold pages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore import CheckpointError
from tierstore.format.order import load_order, write_order, write_order_head
from tierstore.format.spec import PAGE_SIZE, read_manifest
from tierstore.format.profile import profile_info, save_profile
from tierstore_cli.cli import main

from ...conftest import bits, random_table

NAME = "l.engram.memory.weight"


@pytest.fixture(params=["safetensors", "torch"])
def profiled(tmp_path, request):
    w = random_table(20000, 32, torch.float32, seed=3)  # 128 B rows: 32 per page
    if request.param == "safetensors":
        ckpt = tmp_path / "m.safetensors"
        save_file({NAME: w}, str(ckpt))
    else:
        ckpt = tmp_path / "m.pt"
        torch.save({NAME: w}, ckpt)
    first = tierstore.build_store(ckpt, tmp_path / "first", progress=False)
    rng = np.random.default_rng(0)
    hot = rng.choice(20000, 64, replace=False)  # scattered over ~60 pages in id order
    counts = np.zeros(20000, dtype=np.int64)
    counts[hot] = 1000 - np.arange(64)
    counts[rng.integers(0, 20000, 500)] += 1
    save_profile(first, NAME, counts)
    return ckpt, first, w, hot


def test_ordered_build_is_exact_and_packs_hot_rows(tmp_path, profiled):
    ckpt, first, w, hot = profiled
    out = tierstore.build_store(ckpt, tmp_path / "ordered", order_by=first, progress=False)
    info = read_manifest(out).tables[NAME]
    assert info.order_file is not None
    assert tierstore.verify_store(out, progress=False).ok
    for budgets in [(0, 0), (20000 * 128 // 10, 20000 * 128 // 4), (20000 * 128, 0)]:
        with tierstore.open(out, device="cpu", device_budget=budgets[0], host_budget=budgets[1]) as store:
            ids = torch.from_numpy(np.random.default_rng(1).integers(0, 20000, (3, 700)))
            assert torch.equal(bits(store.lookup(NAME, ids)), bits(w[ids]))
            # the row order in memory is the hot ids (12 B each), nothing per table row, also once a
            # resident tier has loaded in file order (the cold rows' ids are computed per step)
            assert store.stats()["disk"]["meta_bytes"] == 12 * profile_info(first, NAME)["nonzero"]
    # the 64 hottest rows now sit in the first two data pages: a cold read of them reads 2 pages
    pages = {}
    for path in (first, out):
        with tierstore.open(path, device="cpu") as store:
            got = store.lookup(NAME, hot)
            assert torch.equal(bits(got), bits(w[torch.from_numpy(hot)]))
            pages[path.name] = store.stats()["disk"]["pages_read"]
    assert pages["ordered"] == 2 and pages["first"] > 30, pages
    raw = (out / info.file).read_bytes()[PAGE_SIZE : PAGE_SIZE + 128]  # physical row 0 = hottest row
    assert raw == w[int(hot[0])].numpy().tobytes()


def test_cli_and_errors(tmp_path, profiled, capsys):
    ckpt, first, w, hot = profiled
    assert main(["build", str(ckpt), str(tmp_path / "o"), "--order-by-profile", str(first), "--quiet"]) == 0
    with pytest.raises(CheckpointError, match="no profile"):
        tierstore.build_store(ckpt, tmp_path / "x", order_by=tmp_path / "o", progress=False)
    m = read_manifest(tmp_path / "o")
    info = m.tables[NAME]
    order = load_order(tmp_path / "o", info, m.build_id)
    hot = order.hot.copy()
    hot[0] = hot[1]  # no longer a permutation, though its checksum is right
    with open(tmp_path / "o" / info.order_file, "wb") as f:
        write_order_head(f, info, hot, m.build_id)
    assert main(["verify", str(tmp_path / "o"), "--quiet"]) == 1
    assert "not a permutation" in capsys.readouterr().err
    pos = order.positions(0, info.rows)  # a version-3 (dense) order file is still checked the same way
    pos[0] = pos[1]
    with open(tmp_path / "o" / info.order_file, "wb") as f:
        write_order(f, info, pos, m.build_id)
    assert main(["verify", str(tmp_path / "o"), "--quiet"]) == 1
    assert "not a permutation" in capsys.readouterr().err


@pytest.mark.parametrize("k", [0, 1, 37, 500, 1000])
def test_the_head_order_maps_ids_and_positions_both_ways(k):
    """HotOrder.of (a row's position from the sorted hot ids) inverts HotOrder.ids, at any
    hot-set size, and a head that repeats a row or leaves the table is refused."""
    from tierstore.format.hotorder import HotOrder

    n = 1000
    hot = np.random.default_rng(k).permutation(n)[:k]
    order = HotOrder(hot, n)
    ids = order.ids(0, n)
    assert sorted(ids.tolist()) == list(range(n)) and ids[:k].tolist() == hot.tolist()
    assert order.of(ids).tolist() == list(range(n))
    assert order.of(ids[::-1]).tolist() == list(range(n))[::-1]
    if k > 1:
        with pytest.raises(ValueError, match="distinct"):
            HotOrder(np.concatenate([hot, hot[:1]]), n)
    with pytest.raises(ValueError, match="distinct"):
        HotOrder(np.array([n]), n)
