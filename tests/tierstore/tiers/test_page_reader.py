"""PageReader against plain reads of the same file, over every mechanism and I/O mode."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import shutil
import subprocess
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierstore.tiers import page_reader as rowio
from tierstore.errors import CorruptDataError, IdTypeError, InvalidIdError, ReaderParamError, StoreIOError
from tierstore.format.spec import PAGE_SIZE
from tierstore.tiers.page_reader import PageReader, aio_available, aligned_empty, evict_page_cache

HAVE_AIO = aio_available()

N_PAGES = 600  # 2.4 MiB: several runs per worker, fast to write


def _real_bytes(n: int) -> bytes:
    """n bytes of real text: the Python standard library's own source, file after file."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= n:
            break
    return b"".join(parts)[:n]


@pytest.fixture(scope="module")
def row_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("rowio") / "rows.bin"
    data = _real_bytes(N_PAGES * PAGE_SIZE)
    assert len(data) == N_PAGES * PAGE_SIZE, "stdlib too small for the test file"
    path.write_bytes(data)
    return path, np.frombuffer(data, dtype=np.uint8).reshape(N_PAGES, PAGE_SIZE)


def _supports_direct(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


BACKENDS = [  # (method, direct, drop_behind)
    ("auto", None, False),
    ("aio", None, False),
    ("aio", True, False),
    ("fadvise", False, False),
    ("fadvise", False, True),
    ("pread", False, False),
    ("pread", True, False),
    ("pread", None, False),
]


@pytest.fixture(params=BACKENDS, ids=[f"{m}-direct{d}" + ("-drop" if k else "") for m, d, k in BACKENDS])
def reader(request: pytest.FixtureRequest, row_file: tuple[Path, np.ndarray]) -> Iterator[PageReader]:
    method, direct, drop = request.param
    path, _ = row_file
    if (direct or method == "aio") and not _supports_direct(path):
        pytest.skip("filesystem of the temp dir has no O_DIRECT")
    if method == "aio" and not rowio.aio_available():
        pytest.skip("no native AIO on this platform")
    # Small windows and several threads so that even test-sized batches split across workers.
    with PageReader(path, method=method, direct=direct, threads=4, depth=8, drop_behind=drop) as r:
        yield r


def _check(got: np.ndarray, ref: np.ndarray, pages: np.ndarray) -> None:
    expect = ref[pages]
    assert got.shape == expect.shape, f"shape {got.shape} != {expect.shape}"
    diff = np.flatnonzero((got != expect).any(axis=1))
    assert len(diff) == 0, (f"{len(diff)} of {len(pages)} pages differ, first page {pages[diff[0]]}, "
                            f"max byte diff {np.abs(got.astype(int) - expect).max()}")


def _page_sets(rng: np.random.Generator) -> dict[str, np.ndarray]:
    runs = np.concatenate([np.arange(10, 40), np.arange(41, 43), np.arange(100, 400), [599]])
    return {
        "random": np.unique(rng.integers(0, N_PAGES, 150)),
        "adjacent_runs": runs,
        "all": np.arange(N_PAGES),
        "single_first": np.array([0]),
        "single_last": np.array([N_PAGES - 1]),
        "sparse": np.arange(0, N_PAGES, 7),
        "empty": np.array([], dtype=np.int64),
    }


def test_read_pages_equals_file(reader: PageReader, row_file: tuple[Path, np.ndarray]) -> None:
    path, ref = row_file
    assert reader.n_pages == N_PAGES
    evict_page_cache(path)
    for name, pages in _page_sets(np.random.default_rng(0)).items():
        got = reader.read_pages(pages)
        assert got.dtype == np.uint8, name
        _check(got, ref, pages)


def test_long_runs_are_split_and_still_exact(reader: PageReader, row_file: tuple[Path, np.ndarray],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, ref = row_file
    monkeypatch.setattr(rowio, "_MAX_RUN_PAGES", 7)
    pages = np.concatenate([np.arange(3, 60), np.arange(200, 216), [300]])
    _check(reader.read_pages(pages), ref, pages)


def test_runs_split_exactly() -> None:
    pages = np.array([1, 2, 3, 7, 8, 20, 21, 22, 23, 24])
    starts, lengths = rowio._runs(pages)
    assert starts.tolist() == [0, 3, 5] and lengths.tolist() == [3, 2, 5]


def test_out_is_filled_and_returned(reader: PageReader, row_file: tuple[Path, np.ndarray]) -> None:
    _, ref = row_file
    pages = np.unique(np.random.default_rng(1).integers(0, N_PAGES, 64))
    out = aligned_empty(len(pages))
    assert out.ctypes.data % PAGE_SIZE == 0
    assert reader.read_pages(pages, out=out) is out
    _check(out, ref, pages)
    with pytest.raises(ReaderParamError, match="shape"):
        reader.read_pages(pages, out=aligned_empty(len(pages) + 1))


def test_direct_rejects_misaligned_out(row_file: tuple[Path, np.ndarray]) -> None:
    path, _ = row_file
    if not _supports_direct(path):
        pytest.skip("no O_DIRECT")
    with PageReader(path, method="pread", direct=True) as r:
        assert r.direct
        raw = np.empty(3 * PAGE_SIZE + 64, dtype=np.uint8)
        shift = (-raw.ctypes.data) % PAGE_SIZE + 16  # deliberately 16 bytes past a page boundary
        bad = raw[shift:shift + 2 * PAGE_SIZE].reshape(2, PAGE_SIZE)
        with pytest.raises(ReaderParamError, match="aligned_empty"):
            r.read_pages(np.array([0, 5]), out=bad)


def test_concurrent_callers_get_correct_bytes(reader: PageReader, row_file: tuple[Path, np.ndarray]) -> None:
    _, ref = row_file
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(15):
            pages = np.unique(rng.integers(0, N_PAGES, int(rng.integers(1, 200))))
            got = reader.read_pages(pages)
            bad = np.flatnonzero((got != ref[pages]).any(axis=1))
            if len(bad):
                errors.append(f"thread {seed}: pages {pages[bad][:5].tolist()} differ")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("method,direct", [
    ("fadvise", False), ("pread", None),
    pytest.param("aio", None, marks=pytest.mark.skipif(not HAVE_AIO, reason="no native AIO"))])
def test_truncated_file_is_corrupt(tmp_path: Path, method: str, direct: bool | None) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(_real_bytes(5 * PAGE_SIZE + 100))  # 5 whole pages and a partial sixth
    with PageReader(path, method=method, direct=direct) as r:
        assert r.n_pages == 5
        assert r.read_pages(np.array([4])).shape == (1, PAGE_SIZE)
        with pytest.raises(CorruptDataError, match="truncated"):
            r.read_pages(np.array([5]))  # the partial page
        with pytest.raises(CorruptDataError, match="page 9"):
            r.read_pages(np.array([1, 9]))  # wholly past the end


@pytest.mark.parametrize("method,direct", [("fadvise", False), ("pread", None)])
def test_os_error_from_preadv_becomes_store_io_error(row_file: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch,
                                         method: str, direct: bool | None) -> None:
    path, _ = row_file
    real_preadv = os.preadv
    failing_offset = 450 * PAGE_SIZE  # in the last of 4 chunks: a pool worker reads it

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset <= failing_offset < offset + sum(len(b) for b in buffers):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_preadv(fd, buffers, offset)

    with PageReader(path, method=method, direct=direct, threads=4, depth=4) as r:
        monkeypatch.setattr(os, "preadv", preadv)
        pages = np.arange(0, N_PAGES, 3)
        with pytest.raises(StoreIOError) as info:
            r.read_pages(pages)
        assert info.value.errno == errno.EIO
        assert str(path) in str(info.value) and str(failing_offset) in str(info.value)
        monkeypatch.setattr(os, "preadv", real_preadv)
        assert r.read_pages(np.array([449, 450])).shape == (2, PAGE_SIZE)  # the reader still works


@pytest.mark.skipif(not HAVE_AIO, reason="no native AIO")
def test_os_error_from_aio_becomes_store_io_error(row_file: tuple[Path, np.ndarray],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reports EIO for one read in a batch: StoreIOError, and nothing is left in flight."""
    path, ref = row_file
    if not _supports_direct(path):
        pytest.skip("no O_DIRECT")
    real = rowio._io_getevents
    failing_offset = 450 * PAGE_SIZE

    def getevents(ctx: int, min_nr: int, events: np.ndarray) -> int:
        n = real(ctx, min_nr, events)
        iocbs_hit = [i for i in range(n) if ctypes_offset(events[i]) == failing_offset]
        for i in iocbs_hit:
            events["res"][i] = -errno.EIO
        return n

    def ctypes_offset(ev: np.void) -> int:  # the iocb this event completes: its offset field (bytes 40..48)
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * 64).from_address(int(ev["obj"])))
        return int(raw[40:48].view("<i8")[0])

    with PageReader(path, method="aio", depth=4) as r:
        monkeypatch.setattr(rowio, "_io_getevents", getevents)
        pages = np.arange(0, N_PAGES, 3)
        with pytest.raises(StoreIOError) as info:
            r.read_pages(pages)
        assert info.value.errno == errno.EIO
        assert str(path) in str(info.value) and str(failing_offset) in str(info.value)
        monkeypatch.setattr(rowio, "_io_getevents", real)
        _check(r.read_pages(pages), ref, pages)  # the reader, and its reused context, still work


def test_missing_file_and_closed_reader(tmp_path: Path, row_file: tuple[Path, np.ndarray]) -> None:
    with pytest.raises(StoreIOError) as info:
        PageReader(tmp_path / "nope.bin")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(StoreIOError):
        evict_page_cache(tmp_path / "nope.bin")
    r = PageReader(row_file[0])
    r.close()
    r.close()  # idempotent
    with pytest.raises(StoreIOError, match="closed"):
        r.read_pages(np.array([0]))


def test_bad_arguments(row_file: tuple[Path, np.ndarray]) -> None:
    path, _ = row_file
    with pytest.raises(ReaderParamError, match="method"):
        PageReader(path, method="mmap")
    with pytest.raises(ReaderParamError, match="direct=True"):
        PageReader(path, method="fadvise", direct=True)
    with pytest.raises(ReaderParamError, match="threads"):
        PageReader(path, threads=0)
    with pytest.raises(ReaderParamError, match="depth"):
        PageReader(path, depth=0)
    with pytest.raises(ReaderParamError, match="O_DIRECT"):
        PageReader(path, method="aio", direct=False)
    with PageReader(path) as r:
        with pytest.raises(InvalidIdError):
            r.read_pages(np.array([-1, 3]))
        with pytest.raises(IdTypeError):
            r.read_pages(np.array([1.0, 2.0]))


def test_aligned_empty() -> None:
    for n in (0, 1, 3, 100):
        buf = aligned_empty(n)
        assert buf.shape == (n, PAGE_SIZE) and buf.dtype == np.uint8
        if n:
            assert buf.ctypes.data % PAGE_SIZE == 0 and buf.flags.writeable


def _resident_pages(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "PAGES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore not installed")
def test_evict_page_cache_empties_the_cache(row_file: tuple[Path, np.ndarray]) -> None:
    path, _ = row_file
    path.read_bytes()  # warm
    if _resident_pages(path) == 0:
        pytest.skip("this filesystem keeps no page cache for the file")
    evict_page_cache(path)
    assert _resident_pages(path) == 0


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore not installed")
def test_drop_behind_leaves_nothing_cached(row_file: tuple[Path, np.ndarray]) -> None:
    path, ref = row_file
    pages = np.arange(0, N_PAGES, 2)
    evict_page_cache(path)
    with PageReader(path, method="fadvise", drop_behind=True, threads=2, depth=8) as r:
        _check(r.read_pages(pages), ref, pages)
    assert _resident_pages(path) == 0, "drop_behind left pages in the page cache"
    with PageReader(path, method="fadvise", drop_behind=False) as r:
        r.read_pages(pages)
    if _resident_pages(path) == 0:
        pytest.skip("this filesystem keeps no page cache for the file")
    assert _resident_pages(path) == len(pages)  # exactly the pages asked for: no readahead around them
    evict_page_cache(path)


@pytest.mark.parametrize("refuse_at", ["open", "read"])
def test_auto_falls_back_to_buffered_without_o_direct(row_file: tuple[Path, np.ndarray],
                                                      monkeypatch: pytest.MonkeyPatch, refuse_at: str) -> None:
    """A filesystem that refuses O_DIRECT (EINVAL at open, or at the first read, as some do):
    direct=None quietly reads buffered, direct=True raises StoreIOError saying so."""
    path, ref = row_file
    real_open, real_preadv = os.open, os.preadv
    direct_fds: set[int] = set()

    def fake_open(p: str | os.PathLike[str], flags: int, *args: int) -> int:
        if flags & os.O_DIRECT and refuse_at == "open":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        fd = real_open(p, flags, *args)
        (direct_fds.add if flags & os.O_DIRECT else direct_fds.discard)(fd)  # fd numbers are reused
        return fd

    def fake_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "preadv", fake_preadv)
    for method in ("auto", "pread"):
        direct_fds.clear()
        with PageReader(path, method=method) as r:
            assert not r.direct and r.method == ("fadvise" if method == "auto" else "pread"), repr(r)
            pages = np.arange(0, N_PAGES, 5)
            _check(r.read_pages(pages), ref, pages)
    with pytest.raises(StoreIOError) as info:
        PageReader(path, method="pread", direct=True)
    assert info.value.errno == errno.EINVAL


@pytest.mark.skipif(not HAVE_AIO, reason="no native AIO")
def test_aio_contexts_are_pooled_per_process(row_file: tuple[Path, np.ndarray]) -> None:
    """Calls reuse kernel AIO contexts from one process-wide pool: many readers (tables,
    stores) do not multiply them, and the idle ones stay bounded.

    Regression: each reader kept its own contexts (256 events each), so 40 tables x 12
    threads held half of the machine's fs.aio-max-nr, and readers never closed leaked them.
    """
    from tierstore.tiers import page_reader as rowio

    path, ref = row_file
    if not _supports_direct(path):
        pytest.skip("no O_DIRECT")
    rowio._CONTEXTS.clear()
    readers = [PageReader(path, method="aio", depth=16) for _ in range(40)]
    for _ in range(3):
        for r in readers:  # sequential calls over 40 readers: one context, reused by all
            r.read_pages(np.arange(0, N_PAGES, 11))
    assert rowio._CONTEXTS.idle() == 1
    threads = [threading.Thread(target=readers[k].read_pages, args=(np.arange(k, N_PAGES, 5),)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= rowio._CONTEXTS.idle() <= rowio._CONTEXTS.max_idle
    for r in readers:
        r.close()
    rowio._CONTEXTS.clear()
    assert rowio._CONTEXTS.idle() == 0


def test_reader_dropped_without_close_releases_its_file(row_file: tuple[Path, np.ndarray]) -> None:
    path, _ = row_file
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        r = PageReader(path, method="pread", threads=4)
        r.read_pages(np.arange(0, 64))
        del r
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
