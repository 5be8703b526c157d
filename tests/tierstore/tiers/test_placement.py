"""The CPU lookup path's placement (tierstore.tiers.placement.move_cpu): its compiled calls put
every row where the numpy/torch path (``serve.table._Placer``, kept for the shared host tier)
puts it: into ``out`` (identity, unique and repeated ids; device hits, host hits, rows from
disk in several chunks from the overlap threads), into the device and host slots the walk
admitted it to. Two tables over one store take the same lookups, one each way: outputs,
both slabs and counters must be equal, and equal to the checkpoint's rows. And the path is a
few calls per lookup, not a dozen numpy/torch calls per lookup and three per chunk."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tierstore.format.profile import save_profile
from tierstore.format.spec import read_manifest
from tierstore.serve.table import Table
from tierstore.tiers import disk as disk_mod

from ...conftest import bits, one_table_store

NAME = "p.engram.memory.weight"
ROWS, DIM = 3_000, 12

# (device rows, host rows): both caches; no host tier; a resident host tier; a host tier
# smaller than the device tier (rows bypass it)
LAYOUTS = [(ROWS // 10, ROWS // 4), (ROWS // 10, 0), (ROWS // 8, ROWS), (ROWS // 6, ROWS // 20)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path, w = one_table_store(tmp_path_factory.mktemp("placement"), NAME, ROWS, DIM, seed=9)
    save_profile(path, NAME, np.arange(ROWS)[::-1].copy())
    return path, w, read_manifest(path).tables[NAME]


def _lookups(rng: np.random.Generator) -> list[np.ndarray]:
    """Identity lookups (sorted, unique, none cached yet: read straight into ``out``),
    unique ones, repeated ids (Zipf), small and large (several disk chunks)."""
    fresh = rng.permutation(ROWS)
    return [np.sort(fresh[:700]), np.sort(fresh[700:760]), rng.permutation(ROWS)[:900],
            rng.zipf(1.2, 1_500) % ROWS, rng.zipf(1.4, 64) % ROWS, np.sort(fresh[760:1_600]),
            rng.integers(0, ROWS, 2_000), rng.zipf(1.1, 768) % ROWS, np.repeat(fresh[1_600:1_700], 3)]


def _bad_slots(table: Table, w: torch.Tensor) -> list[tuple[str, int]]:
    """Cached slots whose bytes are not their row's (every lookup has ended: all are written)."""
    bad = []
    for name, tier in (("device", table.dev), ("host", table.host)):
        if tier.index is None:
            continue
        slots = np.flatnonzero(tier.index.row_of_slot >= 0)
        rows = tier.index.row_of_slot[slots]
        same = (bits(tier.slab[torch.from_numpy(slots)]) == bits(w[torch.from_numpy(rows)])).all(dim=1)
        bad += [(name, int(s)) for s in slots[~same.numpy()]]
    return bad


@pytest.mark.parametrize("chunk_rows", [1024, 37])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["caches", "no-host", "host-resident", "host-small"])
@pytest.mark.parametrize("policy", ["lru", "default"])
def test_compiled_placement_equals_the_numpy_path(built, monkeypatch, layout, policy, chunk_rows):
    path, w, info = built
    monkeypatch.setattr(disk_mod, "CHUNK_ROWS", chunk_rows)  # 37: every large lookup in several chunks
    new = Table(path, info, device=torch.device("cpu"), device_rows=layout[0], host_rows=layout[1], policy=policy)
    old = Table(path, info, device=torch.device("cpu"), device_rows=layout[0], host_rows=layout[1], policy=policy)
    try:
        assert new._host_bytes is not None, "the compiled path must serve a CPU store with its own host tier"
        old._host_bytes = None  # the numpy/torch path (_Placer)
        for step, ids in enumerate(_lookups(np.random.default_rng(3))):
            got = [torch.full((len(ids), DIM), float("nan")) for _ in range(2)]
            new.gather(ids, got[0])
            old.gather(ids, got[1])
            assert torch.equal(bits(got[0]), bits(w[ids])), f"step {step}: compiled path's output"
            assert torch.equal(bits(got[1]), bits(w[ids])), f"step {step}: numpy path's output"
            assert not _bad_slots(new, w), f"step {step}: a slot the compiled path filled is wrong"
            for tier in ("dev", "host"):
                a, b = getattr(new, tier), getattr(old, tier)
                assert torch.equal(bits(a.slab), bits(b.slab)), f"step {step}: {tier} slabs differ"
        s_new, s_old = new.stats(), old.stats()
        for tier in ("device", "host", "disk"):
            for k in ("hits", "misses", "insertions", "evictions", "rows_read"):
                assert s_new[tier].get(k) == s_old[tier].get(k), (tier, k)
        assert (s_new["disk"]["rows_read"] > 0) == (layout[1] < ROWS) and s_new["device"]["hits"] > 0
        if layout[1]:
            assert s_new["host"]["hits"] > 0
    finally:
        new.close()
        old.close()


def test_the_slab_check_catches_a_wrong_slot(built):
    """Negative control for ``_bad_slots``: one flipped byte in a filled slot is reported."""
    path, w, info = built
    t = Table(path, info, device=torch.device("cpu"), device_rows=ROWS // 10, host_rows=ROWS // 4, policy="lru")
    try:
        ids = np.random.default_rng(1).integers(0, ROWS, 500)
        out = torch.empty((len(ids), DIM))
        t.gather(ids, out)
        assert not _bad_slots(t, w)
        s = int(np.flatnonzero(t.host.index.row_of_slot >= 0)[-1])
        t.host.slab.view(torch.uint8)[s, 0] ^= 1
        assert _bad_slots(t, w) == [("host", s)]
    finally:
        t.close()


PLACING = {"tierstore.serve.table", "tierstore.tiers.placement"}  # the disk tier's own reads are not counted


def _calls_in(fn) -> dict[str, int]:
    """Calls of numpy and torch functions (Python- or C-level) made by the lookup path's own
    code (``PLACING``) during ``fn()``, in this thread."""
    counts: dict[str, int] = {}

    def prof(frame, event, arg):
        if event == "c_call":
            caller = frame
            mod = getattr(arg, "__module__", None) or type(getattr(arg, "__self__", None)).__module__ or ""
        elif event == "call":
            caller = frame.f_back
            mod = frame.f_globals.get("__name__", "")
        else:
            return
        if caller is None or caller.f_globals.get("__name__") not in PLACING:
            return
        top = mod.split(".")[0]
        if top in ("numpy", "torch"):
            counts[top] = counts.get(top, 0) + 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counts


@pytest.mark.parametrize("fast", [True, False], ids=["compiled", "numpy-path"])
def test_a_lookup_below_the_device_tier_is_a_few_calls(built, fast):
    """One lookup with device hits, host hits and rows from disk: ``complete`` makes at most 10
    numpy/torch calls on the compiled path (8 measured; 53 with ``_Placer``: the numpy-path case
    is the negative control)."""
    path, w, info = built
    t = Table(path, info, device=torch.device("cpu"), device_rows=ROWS // 10, host_rows=ROWS // 4, policy="lru")
    try:
        if not fast:
            t._host_bytes = None
        rng = np.random.default_rng(5)
        warm = rng.permutation(ROWS)[:600]
        out = torch.empty((600, DIM))
        t.gather(warm, out)  # the device and host tiers hold some of these now
        t.gather(warm, out)  # (and every kernel is compiled)
        ids = np.concatenate([warm[:300], rng.integers(0, ROWS, 300)])
        out = torch.empty((len(ids), DIM))
        lk = t.begin(ids)
        assert not lk.done and lk.m > 0
        calls = _calls_in(lambda: t.complete(lk, out))
        assert torch.equal(bits(out), bits(w[ids]))
        stats = t.stats()
        assert stats["device"]["hits"] > 0 and stats["host"]["hits"] > 0 and stats["disk"]["rows_read"] > 0
        n = sum(calls.values())
        if fast:
            assert n <= 10, calls
        else:
            assert n > 8, calls  # the numpy path is what the bound excludes (53 calls)
    finally:
        t.close()
