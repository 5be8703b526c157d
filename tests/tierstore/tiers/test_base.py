"""Every tier class implements the one ``Tier`` protocol, and ``Table`` relies on nothing else."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch

import tierstore
import tierstore.serve.table
from tierstore import TierStoreError
from tierstore.tiers import CACHED, DISK, NONE, RESIDENT, CacheTier, DiskTier, SharedHostTier, Tier
from tierstore.format.profile import save_profile
from tierstore.tiers.shared_host import SHM_DIR

from ...conftest import bits, one_table_store

NAME = "t.engram.memory.weight"
ROWS, DIM = 500, 16  # 64-byte rows
ROW = DIM * 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path, w = one_table_store(tmp_path_factory.mktemp("tiers"), NAME, ROWS, DIM, seed=3)
    save_profile(path, NAME, np.arange(ROWS)[::-1].copy())  # a partial shared host tier needs one
    return path, w


# (device rows, host rows, shared host) -> (device kind, host kind, host class)
LAYOUTS = [
    ((0, 0, False), (NONE, NONE, CacheTier)),
    ((50, 200, False), (CACHED, CACHED, CacheTier)),
    ((ROWS, ROWS, False), (RESIDENT, RESIDENT, CacheTier)),
    ((0, ROWS, False), (NONE, RESIDENT, CacheTier)),
    ((50, ROWS, True), (CACHED, RESIDENT, SharedHostTier)),
    ((50, 200, True), (CACHED, CACHED, SharedHostTier)),
]


@pytest.mark.parametrize("layout, expected", LAYOUTS)
def test_every_tier_satisfies_the_protocol(built, layout, expected):
    path, w = built
    dev_rows, host_rows, shared = layout
    if shared and not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm")
    with tierstore.open(path, device="cpu", device_budget=dev_rows * ROW, host_budget=host_rows * ROW,
                        host_shared=shared, policy="lru") as store:
        table = store._tables[NAME]
        for tier, kind in ((table.dev, expected[0]), (table.host, expected[1]), (table.disk, DISK)):
            assert isinstance(tier, Tier), f"{type(tier).__name__} misses part of the Tier protocol"
            assert tier.kind == kind, tier.name
            assert (tier.index is not None) == (kind == CACHED), tier.name
            assert (tier.slab is None) == (kind == DISK), tier.name
            assert ("hits" in tier.stats()) == (kind != DISK), tier.name
        assert type(table.host) is expected[2]
        assert type(table.disk) is DiskTier
        ids = np.random.default_rng(0).integers(0, ROWS, 300)
        assert torch.equal(bits(store.lookup(NAME, ids)), bits(w[ids]))
        # the disk tier: gather is read; it is never written
        rows = np.array([3, 7, 499])
        assert torch.equal(bits(table.disk.gather(rows)), bits(w[rows]))
        with pytest.raises(TierStoreError):
            table.disk.write(rows, w[rows])
        if shared:  # read-only after its fill
            with pytest.raises(TierStoreError):
                table.host.write(np.array([0]), w[:1])
        # a resident tier's gather is by row id
        for tier in (table.dev, table.host):
            if tier.kind == RESIDENT:
                assert torch.equal(bits(tier.gather(rows)), bits(w[rows]))


def test_every_tier_class_declares_the_protocol_members():
    members = [n for n in Tier.__dict__.get("__annotations__", {})] + [
        n for n, v in vars(Tier).items() if callable(v) and not n.startswith("_")]
    assert {"name", "kind", "index", "gather", "write", "stats", "reset_stats", "close"} <= set(members)
    for cls in (CacheTier, SharedHostTier, DiskTier):
        for m in ("gather", "write", "preload", "stats", "reset_stats", "close"):
            assert callable(getattr(cls, m, None)), f"{cls.__name__}.{m}"
            params = list(inspect.signature(getattr(cls, m)).parameters)
            assert len(params) == len(inspect.signature(getattr(Tier, m)).parameters), f"{cls.__name__}.{m}{params}"


def test_table_never_branches_on_tier_classes():
    """Table builds its tiers by class, then uses only the protocol: no isinstance/issubclass/
    type() checks, and the tier classes appear only where they are constructed."""
    tree = ast.parse(inspect.getsource(tierstore.serve.table))
    classes = {"CacheTier", "DiskTier", "SharedHostTier"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"isinstance", "issubclass", "type"}, ast.unparse(node)
    uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in classes]
    calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert all(any(u is c for c in calls) for u in uses), "a tier class used other than to construct it"
