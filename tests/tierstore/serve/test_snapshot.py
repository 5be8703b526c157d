"""Open in O(hot set): a saved hot-set snapshot lets open read ~the hot bytes, not the table.

Bytes are counted by wrapping every ``PageReader.read_pages`` (the row file's and the
snapshot's readers: every byte open reads goes through one), not by the store's own counters;
no timings. Each bound has its negative control: the same open without a snapshot (the
row-file path) reads several times the hot bytes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore.cache import POLICIES
from tierstore.cache.index import budget_for
from tierstore.errors import CorruptDataError
from tierstore.format.profile import save_profile
from tierstore.format.snapshot import read_snapshot, snapshot_path
from tierstore.tiers import hotset as hotset_mod
from tierstore.tiers import disk as disk_module
from tierstore.tiers.page_reader import PageReader

from ...conftest import bits, random_table

T = "blocks.1.engram.memory.weight"
N, DIM = 40_000, 128  # float16: 256-byte rows, 16 to a page; a 10 MiB table
HOT = 4096  # scattered profiled rows (1 MiB): the host budget holds them (and, with the policies
# that keep less state per slot, a few empty slots more: only HOT rows are profiled)
# budgets pay for the index's state too (cache.index.budget_for): the most any policy needs
_BUDGET = {n: max(budget_for(n, 256, p) for p in POLICIES) for n in (1024, HOT)}
# the host tier from rank 0, as on CUDA (the device tier's rows loaded from the host slab):
# test_exclusive_tiers.py has a CPU store's own placement
BUDGETS = dict(device="cpu", device_budget=_BUDGET[1024], host_budget=_BUDGET[HOT], exclusive=False)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> tuple[Path, torch.Tensor, np.ndarray]:
    d = tmp_path_factory.mktemp("snap")
    w = random_table(N, DIM, torch.float16, seed=7)
    save_file({T: w}, str(d / "m.safetensors"))
    store = tierstore.build_store(d / "m.safetensors", d / "store", progress=False)
    rng = np.random.default_rng(3)
    hot = rng.choice(N, size=HOT, replace=False)  # scattered over every page of the table
    counts = np.zeros(N, np.int64)
    counts[hot] = rng.integers(1, 50, HOT)  # many ties: the ranking breaks them by row id
    save_profile(store, T, counts)
    return store, w, counts


@pytest.fixture
def store(table, tmp_path) -> tuple[Path, torch.Tensor, np.ndarray]:
    src, w, counts = table
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst, w, counts


class ReadCounter:
    """Bytes read through every PageReader while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.bytes = 0
        real = PageReader.read_pages

        def counted(reader, pages, out=None):
            self.bytes += len(pages) * 4096
            return real(reader, pages, out)

        streamed = disk_module.read_streamed  # a large batch's pages, one AIO queue (tiers.aio_stream)

        def counted_streamed(reader, page_lists, *args, **kw):
            self.bytes += sum(len(p) for p in page_lists) * 4096
            return streamed(reader, page_lists, *args, **kw)

        monkeypatch.setattr(PageReader, "read_pages", counted)
        monkeypatch.setattr(disk_module, "read_streamed", counted_streamed)


def _open(path: Path, counter: ReadCounter, **kw) -> tuple[tierstore.Store, int]:
    before = counter.bytes
    s = tierstore.open(path, **{**BUDGETS, **kw})
    return s, counter.bytes - before


def _hot_bytes(s: tierstore.Store) -> int:
    """Bytes of the rows the budgets hold at open: the host tier's placed rows (the device
    tier's are a prefix of the same ranking, all among them: checked)."""
    t = s._tables[T]
    host = t.host.index.row_of_slot[t.host.index.row_of_slot >= 0]
    dev = t.dev.index.row_of_slot[t.dev.index.row_of_slot >= 0]
    assert np.isin(dev, host).all()
    return len(host) * t.info.row_bytes


def _check_rows(s: tierstore.Store, w: torch.Tensor, counts: np.ndarray) -> None:
    hot = np.flatnonzero(counts)
    for ids in (hot, np.random.default_rng(0).integers(0, N, 3000)):
        got = s.lookup(T, ids)
        assert torch.equal(bits(got), bits(w[torch.from_numpy(ids)])), "rows differ from the checkpoint"


@pytest.mark.parametrize("policy", ["static", "default"])
def test_open_reads_about_the_hot_bytes_with_a_snapshot(store, monkeypatch, policy):
    path, w, counts = store
    counter = ReadCounter(monkeypatch)
    s, without = _open(path, counter, policy=policy)  # negative control: the row-file path
    with s:
        hot = _hot_bytes(s)
        assert s.stats()["open"]["source"] == "host+rows" and s.stats()["open"]["snapshot"] == "none"
    assert without > 3 * hot, f"the row-file path read {without / hot:.2f}x the hot bytes: no scattering to fix?"

    head = tierstore.save_snapshot(path)[T]
    assert head["n"] == HOT
    s, with_snap = _open(path, counter, policy=policy)
    with s:
        o = s.stats()["open"]
        assert with_snap <= 1.2 * hot, f"open read {with_snap / hot:.3f}x the hot bytes ({with_snap} of {hot})"
        assert o["snapshot"] == "ok" and o["source"] == "host+snapshot" and o["from_rows"] == 0
        assert o["host"]["from_snapshot"] == hot // 256 and o["host"]["bytes_read"] >= hot
        # the device tier's rows all come from the host slab: nothing read for it
        assert o["device"]["source"] == "host" and o["device"]["bytes_read"] == 0
        assert o["bytes_read"] <= with_snap  # the store's own count (the row file's header page is not a tier's)
        _check_rows(s, w, counts)
    print(f"\n{policy}: open read {without / hot:.2f}x the hot bytes without a snapshot, {with_snap / hot:.3f}x with")


def test_hot_rows_served_from_the_tiers_after_a_snapshot_open(store):
    path, w, counts = store
    tierstore.save_snapshot(path)
    with tierstore.open(path, policy="static", **BUDGETS) as s:
        hot = np.flatnonzero(counts)
        got = s.lookup(T, hot)
        st = s.stats()
        assert torch.equal(bits(got), bits(w[torch.from_numpy(hot)]))
        assert st["disk"]["rows_read"] == 0 and st["device"]["hits"] + st["host"]["hits"] == HOT


def test_a_snapshot_of_another_build_is_ignored(store, tmp_path):
    """A rebuild (new build id, here new rows) keeps no snapshot of the old rows in use."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    keep = tmp_path / "kept"
    shutil.copytree(path / "profiles", keep)
    w2 = random_table(N, DIM, torch.float16, seed=8)
    save_file({T: w2}, str(tmp_path / "m2.safetensors"))
    tierstore.build_store(tmp_path / "m2.safetensors", path, force=True, progress=False)
    shutil.copytree(keep, path / "profiles")  # the old profile and snapshot, in the new store
    with tierstore.open(path, policy="static", **BUDGETS) as s:
        o = s.stats()["open"]
        assert o["snapshot"] == "stale" and o["from_snapshot"] == 0 and o["from_rows"] > 0
        assert "rebuilt since" in s.stats()["tables"][T]["open"]["snapshot"]
        _check_rows(s, w2, counts)


@pytest.mark.parametrize("where", ["row page", "id page", "header"])
def test_a_damaged_snapshot_is_ignored_and_rows_stay_exact(store, where):
    """A snapshot failing a check is ignored (the row file is the truth): open works, its
    rows come from the row file, stats say why; a direct read raises CorruptDataError."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    snap = snapshot_path(path, T)
    head, _, _ = read_snapshot(snap, 0)
    first_data = 1 + head["sum_pages"]
    page = {"row page": first_data + head["id_pages"] + 3, "id page": first_data, "header": 0}[where]
    with open(snap, "r+b") as f:
        f.seek(page * 4096 + 40)
        b = f.read(1)
        f.seek(page * 4096 + 40)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(CorruptDataError):
        read_snapshot(snap)
    with tierstore.open(path, policy="static", **BUDGETS) as s:
        o = s.stats()["open"]
        assert o["snapshot"] == "ignored" and o["from_rows"] > 0, o
        assert o["from_source"] + o["from_snapshot"] + o["from_rows"] == o["rows_loaded"]
        _check_rows(s, w, counts)


def test_hot_ordered_store_loads_in_file_order(tmp_path, monkeypatch):
    """A hot-ordered store (build --order-by-profile) holds its hot rows at the front of the
    row file; open loads them a step at a time in *file* order, reading each page once: at
    most 1.2x the hot bytes with small steps (in row-id order each step touched pages all over
    the hot region, and pages were read again by later steps)."""
    w = random_table(N, DIM, torch.float16, seed=7)
    save_file({T: w}, str(tmp_path / "m.safetensors"))
    prof = tierstore.build_store(tmp_path / "m.safetensors", tmp_path / "p", progress=False)
    counts = np.zeros(N, np.int64)
    rng = np.random.default_rng(3)
    counts[rng.choice(N, size=HOT, replace=False)] = rng.integers(1, 1000, HOT)  # rank order is not id order
    save_profile(prof, T, counts)
    path = tierstore.build_store(tmp_path / "m.safetensors", tmp_path / "store", order_by=prof, progress=False)
    save_profile(path, T, counts)
    monkeypatch.setattr(hotset_mod, "PRELOAD_BYTES", 64 * 256)  # 64 rows per step
    counter = ReadCounter(monkeypatch)
    s, got = _open(path, counter, policy="static")
    with s:
        hot = _hot_bytes(s)
        assert got <= 1.2 * hot, f"open read {got / hot:.2f}x the hot bytes of a hot-ordered store"
        _check_rows(s, w, counts)


def test_profile_command_writes_the_snapshot(store, tmp_path, capsys):
    from tierstore_cli.cli import main as cli

    path, w, counts = store
    trace = np.repeat(np.arange(N), counts)
    np.save(tmp_path / "t.npy", trace)
    assert cli(["profile", "--trace", str(tmp_path / "t.npy"), "--store", str(path), "--save-profile"]) == 0
    head, ids, _ = read_snapshot(snapshot_path(path, T))
    from tierstore.format.profile import hot_rows
    assert np.array_equal(ids, hot_rows(counts, N)), "the snapshot holds the profile's ranking"
    assert "hot-set snapshot" in capsys.readouterr().err
    assert cli(["profile", "--trace", str(tmp_path / "t.npy"), "--store", str(path), "--save-profile",
                "--snapshot", "64KiB"]) == 0
    assert read_snapshot(snapshot_path(path, T))[0]["n"] == 256
    assert cli(["profile", "--trace", str(tmp_path / "t.npy"), "--store", str(path), "--save-profile",
                "--snapshot", "0"]) == 0
    assert not snapshot_path(path, T).exists()


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    import tierstore
    from tierstore.format.profile import save_profile
    store, table, op, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    counts = np.zeros(tierstore.open(store, device="cpu").tables[table].rows, np.int64)
    counts[::7] = 1
    save_profile(store, table, counts)
    real, calls = getattr(os, op), [0]
    def killing(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    setattr(os, op, killing)
    tierstore.save_snapshot(store, [table], chunk_bytes="64KiB")
""")


@pytest.mark.parametrize("op,nth", [("pwrite", 1)] + [pytest.param(*c, marks=pytest.mark.slow)
                                                     for c in [("pwrite", 15), ("fsync", 1), ("replace", 1)]])
def test_a_snapshot_write_killed_leaves_the_old_one(store, op, nth):
    """SIGKILL in the middle of writing a snapshot (after the n-th write, at the fsync, at
    the rename): the old snapshot stays, whole, and the store opens and serves exact rows."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    snap = snapshot_path(path, T)
    old = snap.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(Path(tierstore.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), T, op, str(nth)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert snap.read_bytes() == old, "a killed write changed the snapshot"
    save_profile(path, T, counts)  # the killed process saved another profile first
    with tierstore.open(path, policy="static", **BUDGETS) as s:
        assert s.stats()["open"]["snapshot"] == "ok"
        _check_rows(s, w, counts)


def test_a_profile_saved_after_the_snapshot_loads_exact_rows(store):
    """A profile replaced without rewriting the snapshot (``save_profile`` alone): the rows
    both rank are taken from the snapshot wherever they sit in it, the others from the row
    file; every row is exact."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    rng = np.random.default_rng(11)
    counts2 = counts.copy()
    moved = rng.choice(np.flatnonzero(counts), size=HOT // 2, replace=False)
    counts2[moved] = 0  # half the old hot rows are cold now, others hot instead
    counts2[rng.choice(np.flatnonzero(counts == 0), size=HOT // 2, replace=False)] = rng.integers(1, 50, HOT // 2)
    save_profile(path, T, counts2)
    with tierstore.open(path, policy="static", **BUDGETS) as s:
        o = s.stats()["open"]
        assert o["snapshot"] == "ok" and o["from_snapshot"] > 0 and o["from_rows"] > 0, o
        assert o["from_source"] + o["from_snapshot"] + o["from_rows"] == o["rows_loaded"]
        _check_rows(s, w, counts2)


def test_the_shared_host_tier_fills_from_the_snapshot(store, monkeypatch):
    """host_shared=True: the process that fills the shared tier reads its rows from the
    snapshot too (the row-file path as the negative control)."""
    path, w, counts = store
    counter = ReadCounter(monkeypatch)
    budgets = dict(BUDGETS, host_shared=True)
    s, without = _open(path, counter, **budgets)
    with s:
        assert s.stats()["open"]["host"]["source"] == "rows"
    tierstore.save_snapshot(path)
    s, got = _open(path, counter, **budgets)
    with s:
        o = s.stats()["open"]
        assert o["host"]["source"] == "snapshot" and o["device"]["source"] == "host", o
        _check_rows(s, w, counts)
    hot = HOT * 256
    assert got <= 1.2 * hot < 3 * hot < without, (got / hot, without / hot)


def test_load_slots_reports_progress_per_step(store, monkeypatch):
    """``progress`` ticks once per bounded step, from every source (the shared host tier's
    fill uses it as its heartbeat to waiting processes)."""
    from tierstore.format.spec import read_manifest
    from tierstore.tiers.disk import DiskTier

    path, w, counts = store
    tierstore.save_snapshot(path, max_bytes=100 * 256)  # the first 100 ranked rows; the rest from the row file
    info = read_manifest(path).tables[T]
    build = read_manifest(path).build_id
    monkeypatch.setattr(hotset_mod, "PRELOAD_BYTES", 64 * 256)
    rows = np.flatnonzero(counts)[:300]  # some in the snapshot (wherever ranked), the rest not

    class Slab:
        def __init__(self):
            self.info, self.device = info, torch.device("cpu")
            self.slab = torch.zeros((len(rows), DIM), dtype=info.raw_dtype)

        def write(self, slots, got):
            self.slab.index_copy_(0, torch.from_numpy(slots), got)

    disk = DiskTier(path, info)
    snap, status = hotset_mod.TableSnapshot.open(path, info, build)
    ticks = []
    try:
        tier = Slab()
        st = hotset_mod.load_slots(tier, np.arange(len(rows)), rows, disk=disk, snapshot=snap,
                                   progress=lambda: ticks.append(1))
    finally:
        snap.close()
        disk.close()
    assert status == "ok" and st.from_snapshot > 0 and st.from_rows > 0
    assert len(ticks) == -(-st.from_snapshot // 64) + -(-st.from_rows // 64)
    assert torch.equal(bits(tier.slab.view(torch.float16)), bits(w[torch.from_numpy(rows)]))


@pytest.mark.parametrize("policy", ["static", "default"])
def test_snapshot_prefix_is_read_into_the_host_slab(store, monkeypatch, policy):
    """The host tier's hot set is the snapshot's prefix in slot order, so its pages are read
    straight into the slab (no staging buffer, no copy per step; O_DIRECT lines up because
    the slab starts on a page), a bounded step at a time, every page checked. Before, each
    64 MiB step was read into a fresh buffer (a page fault per 4 KiB), checked with numpy
    and copied into the slab, one after the other: open ran at ~143 MB/s of a 1.3-2 GB/s disk."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    monkeypatch.setattr(hotset_mod, "PRELOAD_BYTES", 64 * 256)  # 64 rows per step: many steps
    targets: list[tuple[int, int]] = []  # (address, bytes) each read of the snapshot landed in
    real = PageReader.read_pages

    def record(reader, pages, out=None):
        got = real(reader, pages, out)
        if reader.path.endswith(".hot"):
            targets.append((got.ctypes.data, got.nbytes))
        return got

    monkeypatch.setattr(PageReader, "read_pages", record)
    with tierstore.open(path, policy=policy, **BUDGETS) as s:
        host = s._tables[T].host
        lo = host.slab.data_ptr()
        hi = lo + host.slab.numel() * host.slab.element_size()
        assert lo % 4096 == 0, "the host slab does not start on a page"
        into = sum(n for a, n in targets if lo <= a and a + n <= hi)
        hot = _hot_bytes(s)
        assert into >= hot - 2 * 4096, f"only {into} of {hot} hot bytes were read into the slab itself"
        assert s.stats()["open"]["host"]["from_snapshot"] == hot // 256
        _check_rows(s, w, counts)


class ReadLog:
    """The page runs each PageReader.read_pages call on the row file asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, suffix: str = ".rows"):
        self.calls: list[np.ndarray] = []
        real = PageReader.read_pages

        def logged(reader, pages, out=None):
            if str(reader.path).endswith(suffix):
                self.calls.append(np.asarray(pages).copy())
            return real(reader, pages, out)

        monkeypatch.setattr(PageReader, "read_pages", logged)


@pytest.mark.parametrize("chunk", ["32MiB", "16KiB"], ids=["in-memory", "spilled"])
def test_snapshot_reads_the_row_file_once_in_file_order(store, monkeypatch, chunk):
    """Regression: the snapshot's rows were fetched through the store's lookup, 1,024 rows a
    step (26 MB/s, ~0.03x dd). Now the row file is swept once in file order in large reads
    (``DiskTier.sweep``): each page read at most once, the reads ascending, a few calls for
    the whole 10 MiB table. The rows are bit exact whether the rank pass holds them in memory
    or spills them in buckets (``chunk_bytes`` 16 KiB: 128 KiB buckets for 1 MiB of rows)."""
    from tierstore.format.profile import hot_rows

    path, w, counts = store
    log = ReadLog(monkeypatch)
    tierstore.save_snapshot(path, chunk_bytes=chunk)
    pages = np.concatenate(log.calls)
    assert len(log.calls) <= 2, f"{len(log.calls)} reads of the row file for a 10 MiB table"
    assert (np.diff(pages) > 0).all(), "the row file is read in file order, each page once"
    head, ids, rows = read_snapshot(snapshot_path(path, T))
    ranked = hot_rows(counts, N)
    assert np.array_equal(ids, ranked)
    want = bits(w[torch.from_numpy(ranked)]).view(torch.uint8).numpy().reshape(len(ranked), -1)
    bad = np.flatnonzero((rows != want).any(axis=1))
    assert not len(bad), f"{len(bad)} snapshot rows differ, first at rank {bad[:5]}"


def test_snapshot_of_a_hot_ordered_store_is_exact(tmp_path):
    """A hot-ordered store's rows are at other file positions than their ids: the sweep maps
    the ranked ids through the row order, and the snapshot holds the same rows."""
    w = random_table(N, DIM, torch.float16, seed=9)
    save_file({T: w}, str(tmp_path / "m.safetensors"))
    prof = tierstore.build_store(tmp_path / "m.safetensors", tmp_path / "p", progress=False)
    counts = np.zeros(N, np.int64)
    rng = np.random.default_rng(5)
    counts[rng.choice(N, size=HOT, replace=False)] = rng.integers(1, 1000, HOT)
    save_profile(prof, T, counts)
    path = tierstore.build_store(tmp_path / "m.safetensors", tmp_path / "store", order_by=prof, progress=False)
    other = np.zeros(N, np.int64)  # a later profile of another ranking: hot rows now scattered in the file
    other[rng.choice(N, size=3 * HOT, replace=False)] = rng.integers(1, 1000, 3 * HOT)
    save_profile(path, T, other)
    tierstore.save_snapshot(path, chunk_bytes="16KiB")
    _, ids, rows = read_snapshot(snapshot_path(path, T))
    assert len(ids) == 3 * HOT
    want = bits(w[torch.from_numpy(ids)]).view(torch.uint8).numpy().reshape(len(ids), -1)
    assert np.array_equal(rows, want)


def test_a_killed_spilled_snapshot_write_is_cleaned_by_the_next(store):
    """SIGKILL while the rank pass spills (the 6th of its ~18 writes): no snapshot appears torn; the dead
    writer's temporary file is removed by the next write, which succeeds."""
    path, w, counts = store
    snap = snapshot_path(path, T)
    env = {**os.environ, "PYTHONPATH": str(Path(tierstore.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path), T, "pwrite", "6"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not snap.exists(), "a killed first write left a snapshot"
    assert [p.name for p in snap.parent.iterdir() if ".tmp-" in p.name], "the kill came after the temp existed"
    save_profile(path, T, counts)
    tierstore.save_snapshot(path, chunk_bytes="16KiB")
    assert not [p.name for p in snap.parent.iterdir() if ".tmp-" in p.name]
    with tierstore.open(path, policy="static", **BUDGETS) as s:
        assert s.stats()["open"]["snapshot"] == "ok"
        _check_rows(s, w, counts)


def test_device_tier_fills_from_the_host_slab_by_slice(store, monkeypatch):
    """Both tiers place a prefix of the one ranking in slot order, so the device tier's rows
    are one run of the host slab's slots: copied as slices, never gathered into a fresh
    buffer per step (index_select into new memory: a page fault per 4 KiB, then a second copy)."""
    from tierstore.tiers.slab import SlabTier

    path, w, counts = store
    tierstore.save_snapshot(path)
    monkeypatch.setattr(hotset_mod, "PRELOAD_BYTES", 64 * 256)  # many steps
    gathers = []
    real = SlabTier.gather

    def counted(tier, slots, out=None):
        gathers.append(len(slots))
        return real(tier, slots, out)

    monkeypatch.setattr(SlabTier, "gather", counted)
    with tierstore.open(path, policy="default", **BUDGETS) as s:
        o = s.stats()["open"]
        assert o["device"]["source"] == "host" and o["device"]["from_source"] > 64, o
        assert gathers == [], f"open gathered {sum(gathers)} rows from the host slab in {len(gathers)} steps"
        monkeypatch.setattr(SlabTier, "gather", real)
        _check_rows(s, w, counts)


def test_snapshot_steps_are_read_ahead_while_one_is_checked(store, monkeypatch):
    """``read_into`` keeps ``READS_AHEAD`` (2) steps of reads in flight: the next step's reads
    are queued before the previous step's have finished, so the disk's queue does not drain
    at each step's boundary. Checked without timing: the first step's read waits until the
    second step's read has started (on main the second started only after the first
    returned: the wait ran out). Every step but the two partial end pages is one read call."""
    import threading

    path, w, counts = store
    tierstore.save_snapshot(path)
    step = 64 * 256
    monkeypatch.setattr(hotset_mod, "PRELOAD_BYTES", step)
    started = threading.Event()
    overlapped: list[bool] = []
    calls: list[int] = []  # pages per read call of a snapshot step
    real = PageReader.read_pages

    def gated(reader, pages, out=None):
        if reader.path.endswith(".hot") and threading.current_thread().name.startswith("tierstore-snapshot"):
            calls.append(len(pages))
            if len(calls) == 1:
                overlapped.append(started.wait(timeout=30))
            else:
                started.set()
        return real(reader, pages, out)

    monkeypatch.setattr(PageReader, "read_pages", gated)
    with tierstore.open(path, policy="default", **BUDGETS) as s:
        hot = _hot_bytes(s)
        assert s.stats()["open"]["host"]["from_snapshot"] == hot // 256
        _check_rows(s, w, counts)
    assert overlapped == [True], "the second step's read did not start while the first step's was in flight"
    assert len(calls) <= -(-hot // step) + 2, (len(calls), hot // step)
    assert sum(c < step // 4096 for c in calls) <= 3, calls  # a partial page at either end, a last short step


@pytest.mark.parametrize("policy", ["static", "default"])
def test_memory_tier_slabs_are_faulted_in_while_the_index_is_built(store, policy):
    """A tier that places rows at open has its slab's pages faulted in by a thread of its own
    (``cache.Prefault``: madvise MADV_POPULATE_WRITE) from its allocation on, while the index
    is built, instead of by the snapshot's O_DIRECT reads (a fault per 4 KiB inside the read:
    ~0.5 s of CPU per 792 MB here, the pace of the load on a busy machine). Every byte of
    both slabs that the profile's rows fill is populated (on a kernel with MADV_POPULATE_WRITE, Linux 5.14+), and the
    rows are exact: populating writes no byte."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    with tierstore.open(path, policy=policy, **BUDGETS) as s:
        for tier in (s._tables[T].host, s._tables[T].dev):
            assert tier.prefault is not None, f"the {tier.name} tier's slab is not faulted in ahead"
            tier.prefault.join()
            nbytes = min(tier.capacity, HOT) * 256  # as far as the profile's rows reach
            assert tier.prefault.bytes == nbytes, (tier.name, tier.prefault.bytes, nbytes)
        assert s.stats()["open"]["host"]["source"] == "snapshot"
        _check_rows(s, w, counts)

@pytest.mark.parametrize("policy", ["static", "default", "lru"])
def test_only_the_slots_the_profile_fills_are_faulted_in(store, policy):
    """A host tier 4x larger than the profile faults in, ahead of the load, only the slots the
    profile's rows go to (slots [0, rows): the first rows' bytes), not the whole slab: its
    other pages are touched only as misses are admitted, so a store opened with a large budget
    and a small profile does not commit the whole budget at open (the whole slab was populated
    before). Rows stay exact."""
    path, w, counts = store
    tierstore.save_snapshot(path)
    big = dict(BUDGETS, host_budget=max(budget_for(4 * HOT, 256, p) for p in POLICIES))
    with tierstore.open(path, policy=policy, **big) as s:
        host = s._tables[T].host
        assert host.capacity >= 2 * HOT
        assert host.prefault is not None
        host.prefault.join()
        slab = host.slab.numel() * host.slab.element_size()
        assert host.prefault.bytes == HOT * 256 < slab // 2, (host.prefault.bytes, HOT * 256, slab)
        _check_rows(s, w, counts)
