"""The CUDA paths on a real GPU (marked ``gpu``: skipped without one; ``make gpu-check`` runs them).

Status: written without a GPU; none of these has run yet. Each compares against an
independent reference (the checkpoint's weights, indexed by torch) bit for bit.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tierstore
from tierstore import CapacityError
from tierstore.format.profile import save_profile
from tierstore.format.spec import PAGE_SIZE, page_checksums, page_checksums_torch, read_manifest
from tierstore.tiers import DiskTier
from tierstore.tiers.shared_host import SHM_DIR

from ...conftest import bits, one_table_store

pytestmark = pytest.mark.gpu

NAME = "g.engram.memory.weight"
ROWS, DIM = 20011, 64  # 256-byte rows, 5 MiB: small budgets force evictions
ROW = DIM * 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path, w = one_table_store(tmp_path_factory.mktemp("gpu"), NAME, ROWS, DIM, seed=11)
    save_profile(path, NAME, np.random.default_rng(0).zipf(1.3, ROWS).astype(np.int64))  # for the shared tier
    return path, w, read_manifest(path).tables[NAME]


def _kvikio_or_skip():
    return pytest.importorskip("kvikio", reason="the gpu extra (kvikio) is not installed")


# ----------------------------------------------------------------------------- checksums and the disk reader
def test_page_checksums_on_the_gpu_equal_numpy(built):
    path, _, info = built
    pages = np.fromfile(path / info.file, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    pages = np.concatenate([pages, np.random.default_rng(0).integers(0, 256, (64, PAGE_SIZE), dtype=np.uint8)])
    got = page_checksums_torch(torch.from_numpy(pages).cuda()).cpu().numpy().view(np.uint64)
    assert np.array_equal(got, page_checksums(pages))


@pytest.mark.parametrize("compat", [None, "ON"])  # None: kvikio's own choice (GDS where it can)
def test_kvikio_reader_equals_posix_reader(built, compat):
    kvikio = _kvikio_or_skip()
    path, w, info = built
    ctx = kvikio.defaults.set("compat_mode", getattr(kvikio.CompatMode, compat)) if compat else None
    if ctx is not None:
        ctx.__enter__()
    try:
        gds = DiskTier(path, info, device=torch.device("cuda"), device_reader="kvikio")
        posix = DiskTier(path, info, device=torch.device("cuda"), device_reader="posix")
        try:
            rng = np.random.default_rng(1)
            for rows in (np.arange(7), rng.permutation(ROWS)[:3000], np.sort(rng.permutation(ROWS)[:5000]),
                         np.arange(ROWS)):
                rows = rows.astype(np.int64)
                a = posix.gather(rows, torch.empty((len(rows), DIM), dtype=torch.int32, device="cuda"))
                b = gds.gather(rows, torch.empty((len(rows), DIM), dtype=torch.int32, device="cuda"))
                assert torch.equal(b, a), "kvikio reader differs from the POSIX reader"
                assert torch.equal(bits(b.cpu().view(torch.float32)), bits(w[torch.from_numpy(rows)]))
            s = gds.stats()
            print("kvikio reader:", s["reader"], s["reader_mode"])
            assert s["reader"] == "kvikio" and s["device_pages_read"] == s["pages_read"] > 0
            if compat == "ON":
                assert s["reader_mode"] == "compat"
        finally:
            gds.close()
            posix.close()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


# ----------------------------------------------------------------------------- many workers, many evictions
@pytest.mark.parametrize("zero_copy", [False, True])
@pytest.mark.parametrize("disk_reader", ["posix", "auto"])
def test_stress_workers_and_evictions_bit_exact(built, zero_copy, disk_reader):
    """8 caller threads, each on its own CUDA stream, mix synchronous lookups and prefetches
    (ids on the host and on the GPU) through small tiers (device 2%, host 8% of the table):
    every row of every result equals the reference, while slots are evicted and refilled by
    other streams all the time. A missing event between streams shows up as wrong rows."""
    path, w, info = built
    ref = w.cuda()
    errors: list[str] = []
    with tierstore.open(path, device="cuda", device_budget=ROWS * ROW // 50, host_budget=ROWS * ROW // 12,
                        threads=4, policy="lru", zero_copy=zero_copy, disk_reader=disk_reader) as store:

        def worker(k: int) -> None:
            rng = np.random.default_rng(k)
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for i in range(60):
                    n = int(rng.integers(1, 3000))
                    hot = rng.zipf(1.2, n) % ROWS  # skewed: hits, misses and evictions in every tier
                    ids = torch.from_numpy(hot.astype(np.int64))
                    if i % 3 == 0:
                        got = store.lookup(NAME, ids)
                    elif i % 3 == 1:
                        got = store.prefetch(NAME, ids).result()
                    else:
                        ids = ids.cuda()
                        got = store.prefetch(NAME, ids).result()
                    want = ref[ids.to(ref.device)]
                    if not torch.equal(bits(got), bits(want)):
                        bad = (bits(got) != bits(want)).any(-1).nonzero().flatten()[:5].tolist()
                        errors.append(f"thread {k} step {i}: rows at {bad} differ")
                        return

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = store.stats()
    assert not errors, errors[:3]
    assert s["device"]["evictions"] > 1000 and s["host"]["evictions"] > 100, (s["device"], s["host"])
    if disk_reader == "auto" and s["disk"]["reader"] == "kvikio":
        assert s["disk"]["device_pages_read"] > 0


# ----------------------------------------------------------------------------- pinned memory
@pytest.mark.parametrize("shared", [False, True])
def test_host_tier_pins_exactly_its_budget(built, shared):
    if shared and not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm")
    path, w, info = built
    host_rows = ROWS // 3 + 7  # not a power of two: the caching allocator would round it up
    stats_before = torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0)
    with tierstore.open(path, device="cuda", host_budget=host_rows * ROW, host_shared=shared) as store:
        host = store._tables[NAME].host
        assert host.slab.is_pinned(), "the host slab is not registered with CUDA"
        assert store.stats()["host"]["pinned_bytes"] == host_rows * ROW == host.slab.numel() * 4
        grown = torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0) - stats_before
        assert grown < host_rows * ROW, "the slab came from the rounding caching host allocator"
        ids = np.random.default_rng(0).integers(0, ROWS, 4000)
        assert torch.equal(bits(store.lookup(NAME, ids).cpu()), bits(w[ids]))


# ----------------------------------------------------------------------------- zero-copy
@pytest.mark.parametrize("budgets", [(ROWS * ROW // 50, ROWS * ROW // 5), (0, ROWS * ROW)])  # cached; host resident
def test_zero_copy_rows_equal_staged_rows(built, budgets):
    path, w, info = built
    ids = torch.from_numpy(np.random.default_rng(5).zipf(1.2, 30000) % ROWS)
    got = {}
    for zc in (False, True):
        with tierstore.open(path, device="cuda", device_budget=budgets[0], host_budget=budgets[1],
                            zero_copy=zc, policy="lru") as store:
            got[zc] = torch.cat([store.lookup(NAME, part).cpu() for part in ids.split(1000)])
            hits = store.stats()["host"]["hits"]
            assert hits > 0, "no host-tier hit: the zero-copy path was not exercised"
    assert torch.equal(bits(got[True]), bits(got[False]))
    assert torch.equal(bits(got[True]), bits(w[ids]))


# ----------------------------------------------------------------------------- GPU memory budget
def test_device_tier_that_cannot_fit_raises_capacity_error(built):
    path, w, info = built
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    hog = torch.empty(max(0, free - w.nbytes // 2 - (64 << 20)), dtype=torch.uint8, device="cuda")
    try:
        with pytest.raises(CapacityError, match="lower device_budget"):
            tierstore.open(path, device="cuda", device_budget=w.nbytes)
    finally:
        del hog
        torch.cuda.empty_cache()


def test_out_of_memory_inside_a_worker_is_a_capacity_error(built):
    path, w, info = built
    with tierstore.open(path, device="cuda", device_budget=ROWS * ROW // 50) as store:
        ids = np.random.default_rng(0).integers(0, ROWS, 200_000)
        out = torch.empty((len(ids), DIM), dtype=torch.float32, device="cuda")
        torch.cuda.empty_cache()
        hog = torch.empty(torch.cuda.mem_get_info()[0] - (4 << 20), dtype=torch.uint8, device="cuda")
        try:
            with pytest.raises(CapacityError, match="out of GPU memory"):
                store.prefetch(NAME, ids, out=out).result(timeout=60)
        finally:
            del hog
            torch.cuda.empty_cache()
        assert torch.equal(bits(store.lookup(NAME, ids[:100]).cpu()), bits(w[ids[:100]]))  # still serving


# ----------------------------------------------------------------------------- the caller's stream
def test_prefetch_of_cuda_ids_does_not_wait_for_the_callers_gpu_work(built):
    path, w, info = built
    with tierstore.open(path, device="cuda", device_budget=ROWS * ROW // 10, host_budget=ROWS * ROW // 4) as store:
        stream = torch.cuda.current_stream()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU cycles queued before the ids exist
        ids = torch.randint(0, ROWS, (4, 500), device="cuda")
        fut = store.prefetch(NAME, ids)
        assert not stream.query(), "prefetch synchronized the caller's stream"
        got = fut.result()
        assert torch.equal(bits(got.cpu()), bits(w[ids.cpu()]))
