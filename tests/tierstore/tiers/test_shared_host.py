"""One host tier shared by several processes: one copy (PSS), exact rows, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tierstore
from tierstore.tiers.shared_host import SHM_DIR, segment_prefix

from ...conftest import bits, one_table_store

REPO = Path(__file__).resolve().parents[3]
NAME = "big.engram.memory.weight"
ROWS, DIM = 1 << 16, 256  # 64 MiB of float32

WORKER = """
import sys, time, numpy as np, psutil, torch, tierstore
path, budget, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ref = np.load(sys.argv[4], mmap_mode="r")
with tierstore.open(path, device="cpu", device_budget=0, host_budget=budget, host_shared=True) as store:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        ids = rng.integers(0, ref.shape[0], 4096)
        got = store.lookup("big.engram.memory.weight", ids).numpy()
        if not np.array_equal(got.view(np.uint32), ref[ids].view(np.uint32)):
            print("MISMATCH", flush=True); sys.exit(3)
    print("READY", store.stats()["host"]["hits"], flush=True)
    sys.stdin.readline()  # every worker is up: measure
    pss = sum(m.pss for m in psutil.Process().memory_maps() if "tierstore-" in m.path)
    print("PSS", pss, flush=True)
    sys.stdin.readline()  # hold the tier until told to go
    ids = rng.integers(0, ref.shape[0], 4096)
    ok = np.array_equal(store.lookup("big.engram.memory.weight", ids).numpy().view(np.uint32), ref[ids].view(np.uint32))
    print("DONE" if ok else "MISMATCH", flush=True)
"""


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shared")
    path, w = one_table_store(tmp, NAME, ROWS, DIM, seed=7)
    ref = tmp / "ref.npy"
    np.save(ref, w.numpy())
    return path, ref, w


def _spawn(path: Path, budget: int, seed: int, ref: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(WORKER), str(path), str(budget), str(seed), str(ref)],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _shm_files(store: Path) -> set[str]:
    """Shared tiers of this store (other processes on the machine may hold their own)."""
    return {p.name for p in SHM_DIR.glob(f"{segment_prefix(store, NAME)}*") if not p.name.endswith(".fill")}


@pytest.mark.slow
@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_four_processes_share_one_copy_and_survive_a_crash(shared_store):
    path, ref, w = shared_store
    before = _shm_files(path)
    table_bytes = ROWS * DIM * 4
    procs = [_spawn(path, table_bytes, seed, ref) for seed in range(4)]
    try:
        lines = [p.stdout.readline().split() for p in procs]
        assert all(line and line[0] == "READY" for line in lines), [(l, p.stderr.read()) for l, p in zip(lines, procs)]
        assert all(int(line[1]) > 0 for line in lines)  # every worker served rows from the shared tier
        for p in procs:  # PSS once all four map the tier (each process's share of the pages)
            p.stdin.write("measure\n")
            p.stdin.flush()
        pss = [int(p.stdout.readline().split()[1]) for p in procs]
        assert len(_shm_files(path) - before) == 1, "all four processes must map one shared file"
        # four processes together account for about one copy of the tier, not four
        assert sum(pss) < 1.25 * table_bytes, f"PSS of the shared tier: {[p >> 20 for p in pss]} MiB"
        assert max(pss) < 0.5 * table_bytes
        procs[0].send_signal(signal.SIGKILL)  # one worker crashes...
        procs[0].communicate()
        for p in procs[1:]:  # ...the others keep serving exact rows
            out, err = p.communicate("go\n", timeout=60)
            assert out.strip().endswith("DONE"), err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    time.sleep(0.1)
    assert _shm_files(path) - before == set(), "the last process to close removes the shared file"


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_filler_crash_is_refilled(shared_store, monkeypatch):
    """A process that dies while filling leaves a FILLING tier; the next opener refills it."""
    path, ref, w = shared_store
    budget = ROWS * DIM * 4
    crash = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, sys, tierstore
        from tierstore.tiers.disk import DiskTier
        real = DiskTier.read
        def dying(self, rows, out):
            half = len(rows) // 2
            real(self, rows[:half], out[:half])  # half of the tier is written...
            os._exit(9)  # ...then the filler is killed
        DiskTier.read = dying
        tierstore.open(sys.argv[1], device="cpu", host_budget=int(sys.argv[2]), host_shared=True)
    """), str(path), str(budget)], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert crash.returncode == 9, crash.stderr
    with tierstore.open(path, device="cpu", host_budget=budget, host_shared=True) as store:
        ids = np.random.default_rng(1).integers(0, ROWS, 5000)
        assert torch.equal(bits(store.lookup(NAME, ids)), bits(w[torch.from_numpy(ids)]))
        assert store.stats()["disk"]["rows_read"] == 0  # served from the refilled shared tier
        assert store.stats()["host"]["hits"] == 5000
    assert not _shm_files(path), "closing the last user removes the refilled tier"


def test_partial_shared_tier_needs_a_profile(shared_store):
    path, _, _ = shared_store
    with pytest.raises(tierstore.TierStoreError, match="--save-profile"):
        tierstore.open(path, device="cpu", host_budget=ROWS * DIM, host_shared=True)


@pytest.mark.slow
@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_segments_of_killed_users_are_removed_on_open_and_by_gc(tmp_path, capsys):
    """If every user of a shared tier was SIGKILLed, its segment stayed in /dev/shm forever
    after a rebuild. The next open of the store removes unused segments of earlier builds;
    `tierstore gc --shm` finds unused ones machine-wide."""
    from tierstore_cli.cli import main

    path, w = one_table_store(tmp_path, NAME, 500, 16, seed=3)
    script = "import os, sys, tierstore\n" \
             "s = tierstore.open(sys.argv[1], device='cpu', host_budget=10**6, host_shared=True)\n" \
             "os.kill(os.getpid(), 9)\n"
    run = subprocess.run([sys.executable, "-c", script, str(path)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == -signal.SIGKILL
    (left,) = _shm_files(path)  # the killed user's segment
    tierstore.build_store(tmp_path / "m.safetensors", path, force=True, progress=False)
    with tierstore.open(path, device="cpu", host_budget=10**6, host_shared=True) as store:
        assert left not in _shm_files(path), "open removes the unused segment of the earlier build"
        assert torch.equal(bits(store.lookup(NAME, np.arange(500))), bits(w))
        assert main(["gc", str(tmp_path), "--shm", "--dry-run"]) == 0
        assert str(SHM_DIR / left) not in capsys.readouterr().out
    run = subprocess.run([sys.executable, "-c", script, str(path)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    (left,) = _shm_files(path)
    assert main(["gc", str(tmp_path), "--shm", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert str(SHM_DIR / left) in [i["path"] for i in doc["items"] if i["kind"] == "shm"]
    assert not _shm_files(path)


# -- a filler that stops (SIGSTOP) or dies while others wait for it ----------------------------
FILLER = """
import os, signal, sys, tierstore
from tierstore.tiers.disk import DiskTier
def freeze(self, slab, progress=None):
    print("FILLING", os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen mid-fill, holding the fill lock
DiskTier.load_table = freeze
tierstore.open(sys.argv[1], device="cpu", host_budget=int(sys.argv[2]), host_shared=True)
"""

OPENER = """
import sys, numpy as np, torch, tierstore
path, budget, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    store = tierstore.open(path, device="cpu", host_budget=budget, host_shared=True, timeout=timeout)
except tierstore.LookupTimeoutError as e:
    print("TIMEOUT", e, flush=True)
    sys.exit(0)
with store:
    got = store.lookup("big.engram.memory.weight", np.arange(store.tables["big.engram.memory.weight"].rows))
    np.save(sys.argv[4], got.numpy())
    print("SERVED", store.stats()["host"]["hits"], store.stats()["disk"]["rows_read"], flush=True)
"""


def _stopped_filler(path: Path, budget: int) -> tuple[subprocess.Popen, int]:
    """A process that took the fill lock of ``path``'s shared tier and is now stopped."""
    filler = subprocess.Popen([sys.executable, "-c", textwrap.dedent(FILLER), str(path), str(budget)],
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    line = filler.stdout.readline().split()
    assert line[:1] == ["FILLING"], filler.stderr.read() if filler.poll() is not None else line
    pid = int(line[1])
    for _ in range(600):  # until the kernel has stopped it (it signalled itself)
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the filler did not stop")
    return filler, pid


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()  # SIGKILL ends a stopped process too
    proc.communicate()


@pytest.mark.slow
@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_stopped_filler_makes_a_waiter_time_out_with_the_fix_not_hang(tmp_path):
    """A filler frozen (SIGSTOP) holding the fill lock blocked every other opener forever (a
    blocking flock, issue 22). Now a waiter gives up after `timeout` seconds without progress
    with a LookupTimeoutError naming the segment, the filler and the fix. The opener runs in
    a subprocess killed after 60 s, so a regression fails here instead of hanging the suite."""
    path, w = one_table_store(tmp_path, NAME, 4096, 16, seed=5)
    budget = 4096 * 16 * 4
    filler, pid = _stopped_filler(path, budget)
    try:
        try:
            run = subprocess.run([sys.executable, "-c", textwrap.dedent(OPENER), str(path), str(budget), "1.5",
                                  str(tmp_path / "got.npy")], env=dict(os.environ, PYTHONPATH=str(REPO)),
                                 capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("open(host_shared=True, timeout=1.5) still waited for the stopped filler after 60 s")
        assert run.returncode == 0, run.stderr[-3000:]
        out = run.stdout
        assert out.startswith("TIMEOUT"), out
        assert f"process {pid} (state: stopped" in out and "kill" in out and "timeout=1.5s" in out, out
        assert str(SHM_DIR / segment_prefix(path, NAME)) in out, "the message names the segment"
    finally:
        _end(filler)
    # the stopped filler is gone: the next opener fills the tier itself and serves exact rows
    with tierstore.open(path, device="cpu", host_budget=budget, host_shared=True, timeout=5) as store:
        assert torch.equal(bits(store.lookup(NAME, np.arange(4096))), bits(w))
        assert store.stats()["disk"]["rows_read"] == 0
    assert not _shm_files(path)


@pytest.mark.slow
@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_waiter_fills_the_tier_itself_when_the_filler_it_waits_for_dies(tmp_path):
    """A waiter blocked on a stopped filler's lock takes over as soon as that filler dies
    (the kernel drops a dead process's flock): it fills the tier and serves exact rows."""
    path, w = one_table_store(tmp_path, NAME, 4096, 16, seed=6)
    budget = 4096 * 16 * 4
    filler, pid = _stopped_filler(path, budget)
    opener = None
    try:
        opener = subprocess.Popen([sys.executable, "-c", textwrap.dedent(OPENER), str(path), str(budget), "600",
                                   str(tmp_path / "got.npy")], env=dict(os.environ, PYTHONPATH=str(REPO)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        fill = f"{SHM_DIR / segment_prefix(path, NAME)}"
        for _ in range(1200):  # until the opener has the fill lock's file open: it is waiting on it
            fds = Path(f"/proc/{opener.pid}/fd")
            try:
                if any(os.readlink(f).startswith(fill) and os.readlink(f).endswith(".fill") for f in fds.iterdir()):
                    break
            except OSError:  # an fd closed while we listed them
                pass
            assert opener.poll() is None, opener.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError("the opener never reached the fill lock")
        _end(filler)  # the filler dies: its lock goes with it
        try:
            out, err = opener.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the waiter did not take over the fill after the filler died")
        assert opener.returncode == 0 and out.split()[:1] == ["SERVED"], err[-3000:]
        assert out.split()[1:] == ["4096", "0"], out  # every row from the shared tier it filled
        assert np.array_equal(np.load(tmp_path / "got.npy").view(np.uint32), w.numpy().view(np.uint32))
    finally:
        _end(filler)
        if opener is not None:
            _end(opener)
    assert not _shm_files(path)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "5", True])
def test_open_refuses_a_bad_timeout(shared_store, bad):
    path, _, _ = shared_store
    with pytest.raises(tierstore.TierStoreError, match="timeout="):
        tierstore.open(path, device="cpu", timeout=bad)
