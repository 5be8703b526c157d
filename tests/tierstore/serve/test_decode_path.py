"""The decode path: a lookup whose every id the device tier holds is two compiled calls on
the CPU (the device policy's ``all_hits`` then ``walk.copy_rows``: the accesses, the copy, the end), for every policy; the
rows are exact, the counters are those of the walk the simulator replays, and no lease
or leftover state remains. Timing is benchmarks/bench_lookup.py's; this checks the path
is taken and is right."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from numba.core import types
from safetensors.torch import save_file

import tierstore
from tierstore.analysis.simulate import replay_events
from tierstore.cache import CacheIndex, policy_names
from tierstore.format.profile import load_profile, save_profile

NAME = "blocks.1.engram.memory.weight"
ROWS, DIM = 4_000, 24


@pytest.fixture(scope="module")
def store_and_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decode")
    w = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(3)).half()
    save_file({NAME: w}, str(tmp / "m.safetensors"))
    path = tierstore.build_store(tmp / "m.safetensors", tmp / "store", progress=False)
    counts = np.zeros(ROWS, np.int64)
    counts[:1_000] = np.arange(1_000, 0, -1)  # static and default place rows 0..capacity by it
    save_profile(path, NAME, counts)
    return path, w


def _refuse(*_args, **_kw):
    raise AssertionError("an all-hit lookup went past its compiled calls (all_hits, copy_rows)")


@pytest.mark.parametrize("policy", policy_names())
def test_all_hit_lookup_is_one_call_exact_and_leaves_no_lease(store_and_rows, policy, monkeypatch):
    path, w = store_and_rows
    ids = np.random.default_rng(0).permutation(np.resize(np.arange(64), 96))  # repeats too
    with tierstore.open(path, device="cpu", device_budget=400 * DIM * 2, policy=policy) as s:
        t = s._tables[NAME]
        t.events = []
        for _ in range(3):
            s.lookup(NAME, ids)  # admitted, then every id hits
        s.lookup(NAME, np.arange(2_000, 2_100))  # misses between: the walk with leases
        s.lookup(NAME, ids)
        before = s.stats()["device"]
        with monkeypatch.context() as m:  # from here every access is a hit: nothing but begin may run
            m.setattr(t, "complete", _refuse)
            m.setattr(t._walker, "end", _refuse)
            for kind in (np.int64, np.int32):
                got = s.lookup(NAME, torch.from_numpy(ids.astype(kind)).view(8, 12))
                assert got.shape == (8, 12, DIM)
                assert torch.equal(got.view(-1, DIM).view(torch.int16), w[ids].view(torch.int16))
            fut = s.prefetch(NAME, ids)
            assert fut.done(), "an all-hit prefetch of a few ids completes in the caller's thread"
            assert torch.equal(fut.result().view(torch.int16), w[ids].view(torch.int16))
        dev = s.stats()["device"]
        assert dev["hits"] - before["hits"] == 3 * ids.size and dev["misses"] == before["misses"]
        index = t.dev.index
        assert (index.refcount == 0).all(), "a lease outlived the lookup"
        # the live counters are the simulator's for the same events (begin ended the all-hit
        # lookups at once; the others ran the walk with leases)
        fresh = CacheIndex(ROWS, index.capacity, policy, profile=load_profile(path, NAME))
        replay_events(fresh, t.events)
    assert (fresh.hits, fresh.misses, fresh.evictions, fresh.insertions) == \
        (index.hits, index.misses, index.evictions, index.insertions)


@pytest.mark.parametrize("policy", policy_names())
def test_all_hit_kernel_is_the_policys_own_with_no_hook_argument(store_and_rows, policy):
    """The decode path's accesses run in the device policy's own ``all_hits`` kernel, which
    names the module's ``hit`` as a global (numba inlines it), not in one kernel taking
    ``hit`` as an argument (called per row, not inlined: 33 against 18 us for wtinylfu at
    1,024 ids, docs/benchmarks.md)."""
    path, _ = store_and_rows
    ids = np.arange(64)
    with tierstore.open(path, device="cpu", device_budget=400 * DIM * 2, policy=policy) as s:
        for _ in range(2):
            s.lookup(NAME, ids)  # the second lookup is all hits: the kernel is compiled (or loaded)
        index = s._tables[NAME].dev.index
        kern = sys.modules[type(index.policy).__module__].all_hits
        assert index.all_hits is kern
        assert kern.signatures, "the all-hit lookup did not go through the policy's all_hits"
        for sig in kern.signatures:
            assert not any(isinstance(t, types.Dispatcher) for t in sig), f"a hook passed as an argument: {sig}"


@pytest.mark.parametrize("budget", ["all_hits", "misses", "resident"])
def test_lookup_and_prefetch_with_out_return_out_itself(store_and_rows, budget):
    """``out=`` is filled and returned, as torch's ``out=`` is: the very tensor, not a view
    of it (it was ``out.view(...)``, an equal-looking other object), for 1-D and N-D ids,
    on the one-call all-hit path, the walk with misses and a resident table."""
    path, w = store_and_rows
    dev = {"all_hits": 400 * DIM * 2, "misses": 50 * DIM * 2, "resident": ROWS * DIM * 2}[budget]
    with tierstore.open(path, device="cpu", device_budget=dev, policy="lru") as s:
        for ids in (np.arange(40), np.arange(40).reshape(5, 8)):
            for _ in range(2):  # the second time every id hits under the "all_hits" budget
                out = torch.empty(ids.shape + (DIM,), dtype=torch.float16)
                assert s.lookup(NAME, ids, out=out) is out
                assert torch.equal(out.view(-1, DIM).view(torch.int16), w[ids.reshape(-1)].view(torch.int16))
                out = torch.empty(ids.shape + (DIM,), dtype=torch.float16)
                assert s.prefetch(NAME, ids, out=out).result() is out
                assert torch.equal(out.view(-1, DIM).view(torch.int16), w[ids.reshape(-1)].view(torch.int16))


@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint64])
def test_hint_checks_ids_in_its_one_compiled_call_and_announces_nothing_on_a_bad_one(store_and_rows, kind):
    """``Store.hint`` checks the ids' range inside its announcing call (walk.announce_checked,
    not a separate check first): a bad id raises ``InvalidIdError`` naming its value and
    flat position, and no tier's state changes, wherever in the batch it is; a good batch
    of the same rows does change the hint table (the comparison can see it)."""
    path, _ = store_and_rows
    with tierstore.open(path, device="cpu", device_budget=400 * DIM * 2, host_budget=800 * DIM * 2,
                        policy="default") as s:
        t = s._tables[NAME]
        s.hint(NAME, np.arange(5))  # both hint tables allocated
        before = [tuple(a.copy() for a in tier.index.state) for tier in (t.dev, t.host)]
        good = np.arange(3_000, 3_040).astype(kind)
        for bad, pos in (([ROWS], 0), ([7, 9, ROWS + 5], 2), ([1, 2, -1, 3], 2)):
            if kind == np.uint64 and min(bad) < 0:
                continue
            ids = np.concatenate([good, np.asarray(bad)]).astype(kind)
            with pytest.raises(tierstore.InvalidIdError,
                               match=rf"id {bad[pos]} at flat position {good.size + pos} "
                                     rf"is out of range for table {NAME!r} with {ROWS} rows"):
                s.hint(NAME, torch.from_numpy(ids) if kind == np.int32 else ids)
            for b, tier in zip(before, (t.dev, t.host)):
                assert all(np.array_equal(x, y) for x, y in zip(b, tier.index.state)), "a refused hint changed a tier"
        s.hint(NAME, good)
        assert not np.array_equal(before[0][9], t.dev.index.state[9]), "a good hint changed nothing"
