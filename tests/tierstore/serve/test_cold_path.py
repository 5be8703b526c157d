"""The store's cold path: rows from disk are copied into the caches and the output chunk by
chunk, as each chunk's reads finish, while later chunks are still being read; results stay
bit-exact for every id pattern, layout and tier configuration, and a bad page mid-batch is
still a typed error that leaves nothing wrong cached."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore import CorruptDataError
from tierstore.format.profile import save_profile
from tierstore.format.spec import PAGE_SIZE, read_manifest
from tierstore.tiers.disk import CHUNK_ROWS

from ...conftest import bits, random_table

NAME = "blocks.1.engram.memory.weight"
ROWS = 5 * CHUNK_ROWS + 37  # five full chunks and a partial one


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], torch.Tensor]:
    """A plain and a hot-ordered store of one table of 256-byte rows, and the table."""
    tmp = tmp_path_factory.mktemp("cold")
    w = random_table(ROWS, 64, torch.float32, seed=7)
    ckpt = tmp / "m.safetensors"
    save_file({NAME: w}, str(ckpt))
    plain = tierstore.build_store(ckpt, tmp / "plain", progress=False)
    counts = np.zeros(ROWS, dtype=np.int64)
    rng = np.random.default_rng(3)
    counts[rng.choice(ROWS, 900, replace=False)] = 1 + rng.integers(0, 1000, 900)
    save_profile(plain, NAME, counts)
    ordered = tierstore.build_store(ckpt, tmp / "ordered", order_by=plain, progress=False)
    assert read_manifest(ordered).tables[NAME].order_file is not None
    return {"plain": plain, "ordered": ordered}, w


def _ids(pattern: str, rng: np.random.Generator) -> np.ndarray:
    if pattern == "sorted-unique":  # every row a miss, in order: read straight into the output
        return np.unique(rng.integers(0, ROWS, 4000))
    if pattern == "unsorted-dups":  # each row wanted at several positions
        return rng.integers(0, ROWS // 2, 6000)
    return rng.permutation(ROWS)[:4500]  # unique, shuffled


@pytest.mark.parametrize("layout", ["plain", "ordered"])
@pytest.mark.parametrize("budgets", [(0, 0), (8 << 10, 32 << 10), (64 << 10, 0), (0, 256 << 10),
                                     (256 << 10, 1 << 20)])
@pytest.mark.parametrize("policy", ["default", "lru"])
def test_cold_lookups_are_bit_exact(stores, layout, budgets, policy):
    """Multi-chunk lookups (sorted, shuffled, repeated ids) with every mix of device hits, host
    hits and disk reads, repeated so that later lookups hit what earlier ones admitted."""
    paths, w = stores
    rng = np.random.default_rng(hash((layout, budgets, policy)) % 2**32)
    with tierstore.open(paths[layout], device="cpu", device_budget=budgets[0], host_budget=budgets[1],
                        policy=policy) as store:
        for pattern in ("sorted-unique", "unsorted-dups", "shuffled", "unsorted-dups", "sorted-unique"):
            ids = _ids(pattern, rng)
            got = store.lookup(NAME, torch.from_numpy(ids))
            assert torch.equal(bits(got), bits(w[ids])), (pattern, budgets)
            out = torch.full((len(ids), 64), float("nan"))
            store.lookup(NAME, ids, out=out)
            assert torch.equal(bits(out), bits(w[ids])), (pattern, budgets, "out=")
        assert store.stats()["disk"]["rows_read"] > 0


def test_rows_are_cached_while_later_chunks_are_read(stores, monkeypatch):
    """The copies of a chunk's rows into the cache tiers start before the last chunk's reads
    are submitted. The seam is the AIO submission (the disk tier's one queue for the batch,
    tiers.aio_stream; or each chunk's ``read_pages`` with another method): each submission
    records whether rows had been written into a cache tier by then. Before the chunked
    overlap, every copy came after the last read, so no submission saw one."""
    from tierstore.tiers import aio_stream, placement

    paths, w = stores
    with tierstore.open(paths["plain"], device="cpu", device_budget=64 << 10, host_budget=256 << 10,
                        policy="lru", exclusive=False) as store:  # the misses this test was sized by
        table = store._tables[NAME]
        placed = threading.Event()
        seen: list[bool] = []  # per submission (or per read_pages call): had rows been cached by then?
        real_submit, real_read = aio_stream._io_submit, table.disk.reader.read_pages
        real_host, real_dev = table.host.write, table.dev.write

        def submit(ctx, n, ptrs):
            seen.append(placed.is_set())
            return real_submit(ctx, n, ptrs)

        def read_pages(pages, out=None):
            seen.append(placed.is_set())
            return real_read(pages, out=out)

        def host_write(slots, rows):
            placed.set()
            return real_host(slots, rows)

        def dev_write(slots, rows):
            placed.set()
            return real_dev(slots, rows)

        def entries(args_memory, args_arrived):  # the compiled path (tiers.placement): its chunk kernel
            memory, arrived = real_entries(args_memory, args_arrived)
            if arrived is None:
                return memory, None

            def placing(*a):
                placed.set()
                return arrived(*a)
            return memory, placing

        real_entries = placement._entries
        monkeypatch.setattr(placement, "_entries", entries)
        monkeypatch.setattr(aio_stream, "_io_submit", submit)
        table.disk.reader.read_pages, table.host.write, table.dev.write = read_pages, host_write, dev_write
        table.disk.reader.depth = 16  # a few reads in flight: the six chunks take many submissions
        ids = np.arange(ROWS)  # six chunks, all misses
        got = store.lookup(NAME, ids)
        assert torch.equal(bits(got), bits(w))
        # each chunk's pages are a few contiguous reads, and 3 page buffers serve the 6 chunks: the
        # first submission carries chunks 0-2; later ones follow as buffers come free, 1 to 3
        # chunks each, as the timing falls (a loaded machine gave [False, True]: still overlap)
        assert len(seen) >= 2, f"expected at least two submissions, got {len(seen)}"
        assert any(seen), "rows were cached only after the last chunk's reads were submitted (no overlap)"


def test_bad_page_mid_batch_is_typed_and_caches_nothing_wrong(stores, tmp_path):
    """A page of the fourth chunk fails its checksum: the lookup raises CorruptDataError naming
    it, the rows of the chunks already copied into the caches are dropped with the lookup, and
    the store serves the good rows bit-exactly afterwards (from disk or cache)."""
    import shutil

    paths, w = stores
    root = shutil.copytree(paths["plain"], tmp_path / "bad")
    info = read_manifest(root).tables[NAME]
    row = 3 * CHUNK_ROWS + 5
    offset = PAGE_SIZE + row * info.row_stride + 9
    with open(root / info.file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    with tierstore.open(root, device="cpu", device_budget=64 << 10, host_budget=256 << 10, policy="lru") as store:
        with pytest.raises(CorruptDataError, match=rf"page {offset // PAGE_SIZE}"):
            store.lookup(NAME, np.arange(ROWS))
        table = store._tables[NAME]
        for tier in (table.host, table.dev):  # the failed lookup's admissions are unmapped
            assert (tier.index.row_of_slot >= 0).sum() == 0, f"{tier.name}: rows of a failed lookup stayed cached"
        good = np.arange(0, 3 * CHUNK_ROWS, 7)
        for _ in range(2):  # a miss, then (what the tiers admitted) a hit
            assert torch.equal(bits(store.lookup(NAME, good)), bits(w[good]))


def test_a_large_lookup_keeps_at_most_the_readers_depth_in_flight(stores, monkeypatch):
    """A lookup of many chunks keeps the disk tier's reads in flight at its reader's depth,
    never above: what `benchmarks/bench_cold.py` compares with fio at the same queue depth.
    Before, two chunks were read at once, each with its own queue `depth` deep (2x)."""
    import importlib

    from tierstore.tiers import page_reader

    mods = [page_reader]
    try:
        mods.append(importlib.import_module("tierstore.tiers.aio_stream"))
    except ImportError:
        pass
    paths, w = stores
    with tierstore.open(paths["plain"], device="cpu", device_budget=64 << 10, host_budget=256 << 10) as store:
        disk = store._tables[NAME].disk
        if disk.reader.method != "aio":
            pytest.skip(f"no native AIO here ({disk.reader.method})")
        disk.reader.depth = 8
        monkeypatch.setattr(page_reader, "_MAX_RUN_PAGES", 1)  # one read per page: ~50 per chunk
        c = {"now": 0, "peak": 0}
        lock = threading.Lock()
        for m in mods:
            submit, getevents = m._io_submit, m._io_getevents

            def sub(ctx, n, ptrs, submit=submit):
                got = submit(ctx, n, ptrs)
                with lock:
                    c["now"] += got
                    c["peak"] = max(c["peak"], c["now"])
                return got

            def get(ctx, n, events, getevents=getevents):
                got = getevents(ctx, n, events)
                with lock:
                    c["now"] -= got
                return got

            monkeypatch.setattr(m, "_io_submit", sub)
            monkeypatch.setattr(m, "_io_getevents", get)
        ids = np.arange(ROWS)  # six chunks, all misses
        got = store.lookup(NAME, ids)
    assert torch.equal(bits(got), bits(w))
    assert c["peak"] == 8, f"peak reads in flight {c['peak']} for a reader depth of 8"
