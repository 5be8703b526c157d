"""The disk tier's page-reader seam, run on the CPU.

The kvikio reader itself (coalescing, futures, errors, staging) runs here over a stand-in for
``kvikio.CuFile`` that reads with ``os.preadv`` into CPU tensors on a thread pool (reads really
are in flight together); the disk tier then verifies pages with ``page_checksums_torch`` and
cuts rows with torch, exactly the code a CUDA device would run. Every result is compared
with the POSIX reader's (numpy) and with the checkpoint. What never runs here: the real
``kvikio.CuFile`` and a CUDA device (tests/tierstore/serve/test_gpu.py, marked ``gpu``).
"""

from __future__ import annotations

import os
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore import CorruptDataError, ReaderParamError, StoreIOError, TierStoreError, faults
from tierstore.format.profile import save_profile
from tierstore.format.spec import PAGE_SIZE, page_checksums, page_checksums_torch, read_manifest
from tierstore.serve.table import Table
from tierstore.tiers import DiskTier
from tierstore.tiers import disk as disk_mod
from tierstore.tiers import kvikio_reader
from tierstore.tiers.disk import DevicePageSource, choose_device_reader
from tierstore.tiers.kvikio_reader import KvikioPageReader, kvikio_mode, load_kvikio

from ...conftest import bits, random_table

NAME = "p.engram.memory.weight"


# ----------------------------------------------------------------------------- stand-ins
class _Future:
    def __init__(self, fn):
        self._fn = fn

    def get(self) -> int:
        return self._fn()


class PosixCuFile:
    """``kvikio.CuFile`` on CPU tensors: ``pread`` queues an ``os.preadv`` on a pool and
    returns a future with ``get()``. ``fail_at``: the n-th pread's future raises (kvikio
    raises RuntimeError carrying the OS error)."""

    def __init__(self, path: str, fail_at: int = 0):
        self.fd = os.open(path, os.O_RDONLY)
        self.pool = ThreadPoolExecutor(4)
        self.calls = 0
        self.done = 0
        self.fail_at = fail_at

    def pread(self, buf: torch.Tensor, size: int, file_offset: int = 0) -> _Future:
        self.calls += 1
        assert buf.is_contiguous() and buf.numel() == size
        view = memoryview(buf.numpy().reshape(-1))
        fail = self.calls == self.fail_at

        def run() -> int:
            n = os.preadv(self.fd, [view], file_offset)
            self.done += 1
            if fail:
                raise RuntimeError("KvikIO failure: injected EIO")
            return n

        return _Future(self.pool.submit(run).result)

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)


def fake_reader(path: Path, **kw) -> KvikioPageReader:
    """The real KvikioPageReader on the CPU, its file a PosixCuFile."""
    return KvikioPageReader(path, torch.device("cpu"), open_file=lambda p: PosixCuFile(p, **kw))


def fake_kvikio(*, compat: bool, gds: bool = False, version: str = "26.10.00") -> types.ModuleType:
    """A stand-in kvikio module: defaults.get/set/is_compat_mode_preferred, cufile_driver, CuFile."""
    m = types.ModuleType("kvikio")
    m.__version__ = version
    conf = {"num_threads": 1, "compat_mode": 2}
    m.defaults = types.SimpleNamespace(get=conf.__getitem__, set=conf.__setitem__,
                                       is_compat_mode_preferred=lambda: compat)
    m.CuFile = lambda path, flags="r": PosixCuFile(path)
    m.conf = conf
    drv = types.ModuleType("kvikio.cufile_driver")
    drv.properties = types.SimpleNamespace(is_gds_available=gds)
    m.cufile_driver = drv
    return m


# ----------------------------------------------------------------------------- stores
def _store(tmp: Path, rows: int, dim: int, dtype: torch.dtype, *, ordered: bool = False) -> tuple[Path, torch.Tensor]:
    w = random_table(rows, dim, dtype, seed=rows + dim)
    save_file({NAME: w}, str(tmp / "m.safetensors"))
    path = tierstore.build_store(tmp / "m.safetensors", tmp / "store", progress=False)
    if ordered:  # a hotness-ordered layout: rows are not at their id's place in the file
        save_profile(path, NAME, np.random.default_rng(0).integers(0, 1000, rows))
        path = tierstore.build_store(tmp / "m.safetensors", tmp / "ordered", order_by=path, progress=False)
    return path, w


# rows, dim, dtype: 64-byte rows; 6-byte rows (not a multiple of 8); 16 KiB rows (4 pages each); float8
SHAPES = [(3000, 16, torch.float32, False), (2000, 3, torch.float16, False), (300, 4096, torch.float32, False),
          (5000, 32, torch.float8_e4m3fn, False), (4000, 32, torch.float32, True)]


@pytest.fixture(scope="module", params=SHAPES, ids=["f32x16", "f16x3", "wide", "fp8", "ordered"])
def built(request, tmp_path_factory):
    rows, dim, dtype, ordered = request.param
    path, w = _store(tmp_path_factory.mktemp("seam"), rows, dim, dtype, ordered=ordered)
    return path, w, read_manifest(path).tables[NAME]


# ----------------------------------------------------------------------------- checksums
@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_torch_checksums_equal_numpy_on_random_pages(n):
    rng = np.random.default_rng(n)
    pages = rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
    if n:
        pages[0] = 0xFF  # every word's top bit set: the sums wrap many times
        pages[-1, ::2] = 0x80
    got = page_checksums_torch(torch.from_numpy(pages)).numpy().view(np.uint64)
    want = page_checksums(pages)
    assert got.dtype == np.uint64 and np.array_equal(got, want), np.flatnonzero(got != want)[:5]


def test_torch_checksums_equal_the_stored_ones(built):
    """Every page of a real row file (header included) against the store's own .sum file."""
    path, _, info = built
    pages = np.fromfile(path / info.file, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    stored = np.fromfile(path / info.checksum_file, dtype="<u8")
    got = page_checksums_torch(torch.from_numpy(pages)).numpy().view(np.uint64)
    assert np.array_equal(got, stored)
    pages[1, 100] ^= 1  # negative control: one flipped bit changes that page's sum only
    got = page_checksums_torch(torch.from_numpy(pages)).numpy().view(np.uint64)
    assert np.flatnonzero(got != stored).tolist() == [1]


def test_torch_checksums_refuse_other_shapes():
    with pytest.raises(TierStoreError, match="uint8 tensor"):
        page_checksums_torch(torch.zeros((2, PAGE_SIZE), dtype=torch.int8))
    with pytest.raises(TierStoreError, match="uint8 tensor"):
        page_checksums_torch(torch.zeros((2, 100), dtype=torch.uint8))


# ----------------------------------------------------------------------------- the kvikio reader
def test_kvikio_reader_reads_pages_exactly(built):
    path, _, info = built
    data = np.fromfile(path / info.file, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    rng = np.random.default_rng(1)
    with_runs = np.unique(np.concatenate([rng.integers(0, len(data), 50), np.arange(min(600, len(data)))]))
    r = fake_reader(path / info.file)
    try:
        for pages in (np.array([0]), np.unique(rng.integers(0, len(data), 40)), with_runs):
            got = r.read_pages(pages)
            assert got.shape == (len(pages), PAGE_SIZE) and np.array_equal(got.numpy(), data[pages])
            r.release()
        assert r._file.calls <= len(pages)  # coalesced: one pread per run of adjacent pages, runs <= 256 pages
        out = torch.empty((3, PAGE_SIZE), dtype=torch.uint8)
        assert r.read_pages(np.array([0, 1, 2]), out) is out and np.array_equal(out.numpy(), data[:3])
        with pytest.raises(ReaderParamError, match="contiguous uint8"):
            r.read_pages(np.array([0, 1]), out)
    finally:
        r.close()
    with pytest.raises(StoreIOError, match="closed"):
        r.read_pages(np.array([0]))


def test_kvikio_reader_errors_are_typed_and_wait_for_every_read(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 10 * PAGE_SIZE + 100, dtype=np.uint8).tobytes())
    r = fake_reader(path, fail_at=2)
    with pytest.raises(StoreIOError, match="injected EIO"):
        r.read_pages(np.array([0, 2, 4, 6]))  # four runs: the second fails
    assert r._file.done == 4, "a read still in flight after the error would write into a reused buffer"
    r.close()
    r = fake_reader(path)
    with pytest.raises(CorruptDataError, match="truncated row file"):
        r.read_pages(np.array([9, 10]))  # page 10 is 100 bytes
    with faults.inject(faults.FaultPlan(nth=1, kind="EIO", op="read")):
        with pytest.raises(StoreIOError):
            r.read_pages(np.array([1]))
    with faults.inject(faults.FaultPlan(nth=1, kind="short", op="read")):
        with pytest.raises(CorruptDataError):
            r.read_pages(np.array([1]))
    r.close()


# ----------------------------------------------------------------------------- the disk tier through the seam
def _disks(path: Path, info) -> tuple[DiskTier, DiskTier]:
    posix = DiskTier(path, info, device=torch.device("cpu"))
    seam = DiskTier(path, info, device=torch.device("cpu"), device_reader=fake_reader)
    return posix, seam


def test_disk_tier_through_the_device_reader_equals_posix(built):
    path, w, info = built
    posix, seam = _disks(path, info)
    try:
        assert posix.device_reader is None and isinstance(seam.device_reader, DevicePageSource)
        rng = np.random.default_rng(2)
        batches = [np.arange(min(5, info.rows)), rng.permutation(info.rows)[:1500],  # out of file order
                   np.sort(rng.permutation(info.rows)[:1200]), np.arange(info.rows)]  # several chunks, two threads
        for rows in batches:
            rows = rows.astype(np.int64)
            a, b = posix.gather(rows), seam.gather(rows)
            assert torch.equal(bits(b), bits(a)), "device reader differs from the POSIX reader"
            assert torch.equal(bits(b.view(w.dtype)), bits(w[torch.from_numpy(rows)]))
        s = seam.stats()
        assert (s["reader"], s["reader_mode"]) == ("kvikio", "compat")
        assert s["device_pages_read"] == s["pages_read"] > 0 and s["staging_bytes"] > 0
        assert posix.stats()["reader"] == "posix" and posix.stats()["device_pages_read"] == 0
        assert posix.stats()["pages_read"] == s["pages_read"]  # the same pages, by either reader
    finally:
        posix.close()
        seam.close()


class MemmapPages:
    """A minimal DevicePageSource written from scratch (not kvikio's): pages from a memory
    map, on CPU tensors. Shows the disk tier needs nothing beyond the protocol, and calls
    ``release`` once per ``read_pages`` in each thread (the staging fence is per thread)."""

    kind, mode = "memmap", "test"

    def __init__(self, path: Path):
        self.device = torch.device("cpu")
        self.pages = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, PAGE_SIZE)
        self.reads = self.releases = 0
        self.unfenced = threading.local()  # per thread: a read whose gather was not fenced yet
        self.lock = threading.Lock()

    def read_pages(self, pages, out=None):
        assert not getattr(self.unfenced, "open", False), "read before this thread's last gather was fenced"
        self.unfenced.open = True
        with self.lock:
            self.reads += 1
        return torch.from_numpy(np.ascontiguousarray(self.pages[pages]))

    def release(self) -> None:
        self.unfenced.open = False
        with self.lock:
            self.releases += 1

    def staging_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.pages = None


def test_disk_tier_uses_only_the_protocol(built):
    path, w, info = built
    disk = DiskTier(path, info, device=torch.device("cpu"), device_reader=MemmapPages)
    try:
        src = disk.device_reader
        assert isinstance(src, DevicePageSource)
        rows = np.random.default_rng(4).permutation(info.rows)[:2500].astype(np.int64)
        assert torch.equal(bits(disk.gather(rows).view(w.dtype)), bits(w[torch.from_numpy(rows)]))
        assert src.reads == src.releases > 0
        assert (disk.stats()["reader"], disk.stats()["reader_mode"]) == ("memmap", "test")
    finally:
        disk.close()
    assert src.pages is None, "close() must close the device reader"


def test_device_reader_catches_a_corrupt_page(tmp_path):
    path, w = _store(tmp_path, 3000, 16, torch.float32)
    info = read_manifest(path).tables[NAME]
    page = 5
    with open(path / info.file, "r+b") as f:  # flip one bit of data page 5 (rows 256..319)
        f.seek(page * PAGE_SIZE + 17)
        b = f.read(1)
        f.seek(page * PAGE_SIZE + 17)
        f.write(bytes([b[0] ^ 1]))
    _, seam = _disks(path, info)
    try:
        with pytest.raises(CorruptDataError, match=f"page {page} "):
            seam.gather(np.array([1, 300, 2000]))
        assert torch.equal(bits(seam.gather(np.array([1, 2000]))), bits(w[[1, 2000]]))
    finally:
        seam.close()


def test_table_serves_cold_rows_through_the_device_reader(built):
    """The whole lookup (walk, staging, admission into both cache tiers) with the device
    reader plugged in: every row equals the checkpoint's, and the pages came through it."""
    path, w, info = built
    rows = info.rows
    table = Table(path, info, device=torch.device("cpu"), device_rows=rows // 10, host_rows=rows // 4,
                  policy="lru", disk_reader=fake_reader)
    try:
        rng = np.random.default_rng(3)
        for _ in range(6):
            ids = rng.integers(0, rows, 700)
            out = torch.empty((len(ids), info.dim), dtype=w.dtype)
            table.gather(ids, out)
            assert torch.equal(bits(out), bits(w[torch.from_numpy(ids)]))
        s = table.stats()
        assert s["disk"]["device_pages_read"] == s["disk"]["pages_read"] > 0
        assert s["device"]["hits"] > 0 and s["host"]["hits"] > 0
    finally:
        table.close()


# ----------------------------------------------------------------------------- choosing the reader
def test_reader_choice(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(2 * PAGE_SIZE))
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object; nothing is allocated on it
    assert choose_device_reader(path, cpu) is None
    assert choose_device_reader(path, cuda, "posix") is None
    with pytest.raises(TierStoreError, match="needs device='cuda'"):
        choose_device_reader(path, cpu, "kvikio")
    with pytest.raises(TierStoreError, match="must be one of"):
        choose_device_reader(path, cpu, "gds")
    monkeypatch.setattr(disk_mod, "load_kvikio", lambda: None)  # kvikio not installed
    assert choose_device_reader(path, cuda) is None
    with pytest.raises(TierStoreError, match="pip install"):
        choose_device_reader(path, cuda, "kvikio")
    fake = fake_kvikio(compat=False, gds=True)
    monkeypatch.setattr(disk_mod, "load_kvikio", lambda: fake)
    monkeypatch.setitem(sys.modules, "kvikio.cufile_driver", fake.cufile_driver)
    r = choose_device_reader(path, cuda)
    try:
        assert isinstance(r, KvikioPageReader) and isinstance(r, DevicePageSource)
        assert (r.kind, r.mode, r.device) == ("kvikio", "gds", cuda)
        assert fake.conf["num_threads"] == r.depth, "kvikio's one-thread default would keep one read in flight"
    finally:
        r.close()

    def no_cufile(path, flags="r"):
        raise RuntimeError("KvikIO failure: libcufile.so: cannot open shared object file")

    fake.CuFile = no_cufile  # kvikio imports but cannot open files here
    assert choose_device_reader(path, cuda) is None, "auto falls back to the POSIX reader"
    with pytest.raises(TierStoreError, match="use disk_reader='posix'"):
        choose_device_reader(path, cuda, "kvikio")


def test_kvikio_mode_and_version(monkeypatch):
    for compat, gds, mode in [(True, True, "compat"), (False, True, "gds"), (False, False, "cufile-compat")]:
        fake = fake_kvikio(compat=compat, gds=gds)
        monkeypatch.setitem(sys.modules, "kvikio.cufile_driver", fake.cufile_driver)
        assert kvikio_mode(fake) == mode
    monkeypatch.setitem(sys.modules, "kvikio", fake_kvikio(compat=True, version="24.12.00"))
    with pytest.raises(TierStoreError, match="too old"):
        load_kvikio()
    monkeypatch.setitem(sys.modules, "kvikio", None)  # not installed: import fails
    assert load_kvikio() is None


def test_real_kvikio_without_cuda_leaves_the_posix_reader(store_path_small):
    """Where kvikio is installed (the gpu extra) but there is no CUDA device, the store still
    reads with POSIX and says so."""
    pytest.importorskip("kvikio")
    assert kvikio_reader.load_kvikio() is not None  # importable and new enough
    with tierstore.open(store_path_small, device="cpu") as store:
        d = store.stats()["disk"]
        assert d["reader"] == "posix" and d["reader_mode"] in ("aio", "fadvise", "pread")


@pytest.fixture(scope="module")
def store_path_small(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("small"), 500, 16, torch.float32)[0]
