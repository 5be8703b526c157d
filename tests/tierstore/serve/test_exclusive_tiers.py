"""A CPU store with ``exclusive=True`` places each hot row in memory once (``StoreOptions.exclusive``).

On the CPU the device tier is plain memory like the host tier. Placed from rank 0 each, the
host tier held the device tier's rows again, rows the walk never reads below the device tier.
With ``exclusive`` the host tier places the ranks after the device tier's, so the two hold the
profile's top ``device + host`` rows. The oracle is the ranking computed here from the counts
(``np.lexsort``, not ``hot_rows``); ``exclusive=False`` is the negative control (the overlap
comes back and the same lookups read the disk). No timings.
"""

from __future__ import annotations

import numpy as np
import pytest

import tierstore
from tierstore.cache import POLICIES
from tierstore.cache.index import budget_for
from tierstore.serve.table import host_after_device
from tierstore.tiers import cache as cache_mod
from tierstore.tiers.early import EarlyLoad

from . import test_snapshot as snapshot_tests
from .test_snapshot import HOT, T, _check_rows

table, store = snapshot_tests.table, snapshot_tests.store  # a 10 MiB store with HOT profiled rows

DEV, HOST = 1024, HOT - 1024  # together the tiers hold every profiled row only if they share none
_B = {n: max(budget_for(n, 256, p) for p in POLICIES) for n in (DEV, HOST)}


def _ranking(counts: np.ndarray) -> np.ndarray:
    """The profiled rows, hottest first, ties by ascending row id (the oracle)."""
    rows = np.flatnonzero(counts)
    return rows[np.lexsort((rows, -counts[rows]))]


def _held(tier) -> np.ndarray:
    ros = tier.index.row_of_slot
    return ros[ros >= 0].astype(np.int64)


def _open(path, policy: str, exclusive: bool = True) -> tierstore.Store:
    return tierstore.open(path, device="cpu", device_budget=_B[DEV], host_budget=_B[HOST], policy=policy,
                          exclusive=exclusive)


@pytest.mark.parametrize("snapshot", [False, True], ids=["rows", "snapshot"])
@pytest.mark.parametrize("policy", ["static", "default"])
def test_a_cpu_store_holds_each_hot_row_once(store, policy, snapshot):
    """Exclusive: the device tier holds the top ranks, the host tier the next ones, none
    twice; the hot rows' lookup reads fewer rows from disk (none with ``static``) than with
    exclusive=False, where the host tier holds the device tier's rows again."""
    path, w, counts = store
    if snapshot:
        tierstore.save_snapshot(path)
    rank = _ranking(counts)
    with _open(path, policy) as s:
        t = s._tables[T]
        dev, host = _held(t.dev), _held(t.host)
        assert len(dev) > 0 and len(host) > 0
        assert np.intersect1d(dev, host).size == 0, "a row placed in both memory tiers"
        assert np.array_equal(np.sort(dev), np.sort(rank[: len(dev)]))
        assert np.array_equal(np.sort(host), np.sort(rank[len(dev): len(dev) + len(host)]))
        assert len(dev) + len(host) == HOT  # the budgets hold every profiled row
        o = s.stats()["open"]
        assert o["from_rows"] == (0 if snapshot else o["rows_loaded"]) and o["rows_loaded"] == HOT, o
        s.reset_stats()
        s.lookup(T, np.flatnonzero(counts))  # before other rows are admitted and evict some
        read_exclusive = s.stats()["disk"]["rows_read"]
        _check_rows(s, w, counts)  # exact rows: the profiled ones, then random ones
    with _open(path, policy, exclusive=False) as s:  # negative control: the overlap is back
        t = s._tables[T]
        assert np.intersect1d(_held(t.dev), _held(t.host)).size == len(_held(t.dev))
        s.lookup(T, np.flatnonzero(counts))
        read_inclusive = s.stats()["disk"]["rows_read"]
    # static never evicts a placed row: all from memory. default admits the host tier's hits
    # into the device tier, whose evicted rows are then below it only on disk (one batch of
    # every hot row here: 1,251 rows read against 2,096 from rank 0)
    assert read_exclusive < read_inclusive and (policy != "static" or read_exclusive == 0), \
        (read_exclusive, read_inclusive)


def test_the_early_load_reads_the_host_tier_s_ranks(store, monkeypatch):
    """The host tier's early snapshot read starts at the device tier's end (ranks DEV on),
    and what it read is kept: its placed rows need no second read."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    kept: list[tuple[int, int]] = []

    class Spy(EarlyLoad):
        def finish(self, rows, slots):
            n = super().finish(rows, slots)
            kept.append((self.first, n))
            return n

    monkeypatch.setattr(cache_mod, "EarlyLoad", Spy)
    with _open(path, "default") as s:
        t = s._tables[T]
        ndev, nhost = len(_held(t.dev)), len(_held(t.host))
        o = s.stats()["open"]
        assert kept == [(ndev, nhost)], kept
        assert o["host"]["from_snapshot"] == nhost and o["device"]["from_snapshot"] == ndev and o["from_rows"] == 0
        _check_rows(s, w, counts)


def test_only_plain_memory_tiers_can_be_exclusive_and_none_is_by_default():
    import torch

    assert tierstore.StoreOptions().exclusive is False
    assert host_after_device(torch.device("cpu"), False, True)
    assert not host_after_device(torch.device("cpu"), False, False)
    assert not host_after_device(torch.device("cuda", 0), False, True)  # the device tier loads from the host slab
    assert not host_after_device(torch.device("cpu"), True, True)  # a shared host tier serves every process
    assert not host_after_device(torch.device("cpu"), False, True, "background")  # its loader fills from the host slab
    with pytest.raises(tierstore.TierStoreError):
        tierstore.StoreOptions(exclusive="yes")
    for bad in (dict(warm="background"), dict(host_shared=True)):
        with pytest.raises(tierstore.TierStoreError, match="warm='open'"):
            tierstore.StoreOptions(exclusive=True, **bad)
    with pytest.raises(tierstore.TierStoreError, match="warm='open'|CUDA is not available"):
        tierstore.StoreOptions(exclusive=True, device="cuda")
    tierstore.StoreOptions(exclusive=True, device="cpu")
