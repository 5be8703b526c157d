"""What ``--force`` may replace, which leftovers recovery removes, and how it tells a running
build from a dead one (issue 22, items 4, 5 and 10): a checkpoint, user files and running
builds are never touched; a real previous store still is replaced."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tierstore
from tierstore import ReplaceRefusedError, StoreExistsError, StoreIOError
from tierstore.format.recovery import LOCK_NAME, find_orphans, recover
from tierstore_cli.cli import main

from ...conftest import bits, random_table

REPO = Path(__file__).resolve().parents[3]
NAME = "blocks.1.engram.memory.weight"


def _ckpt(path: Path, seed: int = 1) -> torch.Tensor:
    table = random_table(257, 16, torch.float32, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({NAME: table}, str(path))
    return table


def _tree(root: Path) -> list[tuple[str, int, int]]:
    """Every path under ``root`` with its size and inode: what a refused build must leave as is."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            out.append((os.path.relpath(os.path.join(dirpath, n), root), st.st_size, st.st_ino))
    return sorted(out)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- --force replaces only a store ---------------------------------------------------------


def _case(tmp_path: Path, case: str) -> tuple[Path, Path, str]:
    """(checkpoint, OUT, what the refusal must say) for each thing --force must not replace."""
    ckdir = tmp_path / "data" / "ckpt"
    ckpt = ckdir / "model.safetensors"
    _ckpt(ckpt)
    if case == "out_is_checkpoint_dir":  # `tierstore build ckpt ckpt --force`
        return ckdir, ckdir, "is the checkpoint directory"
    if case == "out_is_checkpoint_file":
        return ckpt, ckpt, "is the checkpoint file"
    if case == "out_is_parent_of_checkpoint":
        return ckpt, tmp_path / "data", "holds the checkpoint"
    if case == "out_is_sharded_checkpoint_dir":  # an index JSON: its directory is the checkpoint
        (ckdir / "model.safetensors.index.json").write_text(f'{{"weight_map": {{"{NAME}": "model.safetensors"}}}}')
        return ckdir / "model.safetensors.index.json", ckdir, "is the checkpoint directory"
    if case == "out_inside_checkpoint_dir":  # even a real store: never inside the checkpoint
        tierstore.build_store(ckdir, ckdir / "store", progress=False)
        return ckdir, ckdir / "store", "lies inside the checkpoint directory"
    if case == "out_via_symlink_to_checkpoint_dir":
        (tmp_path / "link").symlink_to(ckdir)
        return ckpt, tmp_path / "link", "link holds the checkpoint file"  # resolved, not "a symlink"
    if case == "out_is_user_dir":
        user = tmp_path / "mywork"
        (user / "notes").mkdir(parents=True)
        (user / "notes" / "todo.txt").write_text("keep me")
        (user / "thesis.tex").write_text("keep me too")
        return ckpt, user, "not a store"
    if case == "out_is_plain_file":
        f = tmp_path / "results.csv"
        f.write_text("a,b\n1,2\n")
        return ckpt, f, "is a file, not a tierstore store"
    if case == "out_is_symlink_to_store":
        tierstore.build_store(ckpt, tmp_path / "real", progress=False)
        (tmp_path / "s").symlink_to(tmp_path / "real")
        return ckpt, tmp_path / "s", "symbolic link"
    if case == "out_is_dir_with_foreign_manifest":
        d = tmp_path / "other"
        d.mkdir()
        (d / "manifest.json").write_text('{"format": "something-else", "version": 1}')
        return ckpt, d, "not a store"
    raise AssertionError(case)


CASES = ["out_is_checkpoint_dir", "out_is_checkpoint_file", "out_is_parent_of_checkpoint",
         "out_is_sharded_checkpoint_dir", "out_inside_checkpoint_dir", "out_via_symlink_to_checkpoint_dir",
         "out_is_user_dir", "out_is_plain_file", "out_is_symlink_to_store", "out_is_dir_with_foreign_manifest"]


@pytest.mark.parametrize("case", CASES)
def test_force_refuses_what_is_not_a_store(tmp_path, case, capsys):
    """Each of these was deleted (or renamed to a hidden .old file) by --force on main, rc 0."""
    ckpt, out, why = _case(tmp_path, case)
    before = _tree(tmp_path)
    with pytest.raises(ReplaceRefusedError, match=why) as e:
        tierstore.build_store(ckpt, out, force=True, progress=False)
    assert isinstance(e.value, StoreExistsError) and str(out) in str(e.value)
    assert _tree(tmp_path) == before, "a refused --force changed files"
    capsys.readouterr()
    assert main(["build", str(ckpt), str(out), "--force", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force refused" in err[0] and str(out) in err[0], err
    assert _tree(tmp_path) == before, "a refused --force changed files"


def test_force_still_replaces_a_store_and_an_empty_dir(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _ckpt(a, seed=1)
    new = _ckpt(b, seed=2)
    out = tierstore.build_store(a, tmp_path / "s", progress=False)
    tierstore.build_store(b, out, force=True, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    tierstore.build_store(b, empty, force=True, progress=False)
    damaged = tierstore.build_store(a, tmp_path / "damaged", progress=False)  # a store whose manifest was cut
    text = (damaged / "manifest.json").read_bytes()
    (damaged / "manifest.json").write_bytes(text[: len(text) // 3])
    tierstore.build_store(b, damaged, force=True, progress=False)
    for store in (out, empty, damaged):
        assert tierstore.verify_store(store, progress=False).ok
        with tierstore.open(store, device="cpu") as st:
            assert torch.equal(bits(st.lookup(NAME, [0, 256])), bits(new[[0, 256]]))
        assert not (store / LOCK_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "damaged", "empty", "s"]


def test_force_refuses_user_files_that_appear_during_the_build(tmp_path, monkeypatch):
    """The check is made again where the swap happens: OUT turned into user files meanwhile."""
    import tierstore.format.build as build

    ckpt = tmp_path / "a.safetensors"
    _ckpt(ckpt)
    out = tmp_path / "s"
    attach = tmp_path / "config.json"
    attach.write_text("{}")
    real = build._check_attachment

    def sneak(path):  # runs after the up-front checks
        out.mkdir(exist_ok=True)
        (out / "mine.txt").write_text("user data")
        real(path)

    monkeypatch.setattr(build, "_check_attachment", sneak)
    with pytest.raises(ReplaceRefusedError, match="not a store"):
        tierstore.build_store(ckpt, out, force=True, progress=False, attach=[attach])
    assert (out / "mine.txt").read_text() == "user data" and sorted(os.listdir(out)) == ["mine.txt"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- recovery removes every leftover it made, files included ------------------------------


def test_recovery_removes_leftover_files(tmp_path):
    """An older --force moved a plain file at OUT to .OUT.old-TAG and nothing ever removed it
    (recovery skipped non-directories)."""
    ckpt = tmp_path / "a.safetensors"
    _ckpt(ckpt)
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    pid = _dead_pid()
    (tmp_path / f".s.old-{pid}-5-0").write_text("moved aside by an older --force")
    (tmp_path / f".s.tmp-{pid}").write_text("a dead process's temporary file")
    (tmp_path / f".s.old-{os.getpid()}-5-1").write_text("ours: alive")
    tierstore.open(out, device="cpu").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".s.old-%d-5-1" % os.getpid(), "a.safetensors", "s"])


# -- a running build is the one that holds its lock -----------------------------------------

_HOLDER = """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_recovery_keeps_a_work_dir_whose_build_holds_the_lock(tmp_path):
    """A build in another PID namespace: its directory's name carries a PID that looks dead
    here. On main recovery judged it by that PID and deleted it under the running build."""
    ckpt = tmp_path / "a.safetensors"
    _ckpt(ckpt)
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    work = tmp_path / f".s.tmp-{_dead_pid()}-123-0"
    (work / "tables").mkdir(parents=True)
    (work / "tables" / "t0000.rows").write_bytes(b"x" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLDER), str(work / LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        tierstore.open(out, device="cpu").close()
        assert recover(out) == [] and find_orphans(tmp_path) == []
        assert main(["gc", str(tmp_path)]) == 0
        assert (work / "tables" / "t0000.rows").stat().st_size == 4096, "a running build's files were deleted"
    finally:
        holder.kill()
        holder.communicate()
    assert [o.path for o in find_orphans(tmp_path)] == [work]
    lines = recover(out)
    assert len(lines) == 1 and lines[0].startswith(f"removed {work}")
    assert not work.exists()


def test_a_new_work_dir_is_locked_from_its_creation(tmp_path):
    """new_work_dir: the directory is locked from its creation; recovery never claims it."""
    from tierstore.format.recovery import new_work_dir

    out = tmp_path / "s"
    work, fd = new_work_dir(out)
    try:
        probe = os.open(work / LOCK_NAME, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
        assert recover(out) == [] and work.is_dir()
    finally:
        os.close(fd)
    assert len(recover(out)) == 1 and not work.exists()  # released (as by death): removed


_PAUSED_BUILD = """
    import os, sys, time
    import tierstore
    ckpt, out, ready, go = sys.argv[1:5]
    real, calls = os.fsync, [0]
    def paused(fd):  # pause mid-write: after the first row file is written, before its fsync
        calls[0] += 1
        if calls[0] == 1:
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
        return real(fd)
    os.fsync = paused
    tierstore.build_store(ckpt, out, force=True, progress=False)
    print("built", flush=True)
"""


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("namespace", ["same", "unshare"])
def test_open_does_not_delete_a_paused_build(tmp_path, namespace):
    """A --force build paused mid-write; a reader opens OUT meanwhile. In its own PID namespace
    (`unshare --pid`) the build's PID means nothing here: on main the open deleted its work
    directory and the build then failed with ENOENT."""
    if namespace == "unshare" and not _unshare_works():
        pytest.skip("unshare --pid --fork --mount-proc is not available here (needs root or user namespaces)")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _ckpt(a, seed=1)
    new = _ckpt(b, seed=2)
    out = tierstore.build_store(a, tmp_path / "s", progress=False)
    ready, go = tmp_path / "ready", tmp_path / "go"
    cmd = [sys.executable, "-c", textwrap.dedent(_PAUSED_BUILD), str(b), str(out), str(ready), str(go)]
    if namespace == "unshare":
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", *cmd]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the build never reached its pause"
            time.sleep(0.01)
        [work] = [p for p in tmp_path.iterdir() if p.name.startswith(".s.tmp-")]
        with tierstore.open(out, device="cpu") as st:  # recovers first, as every open does
            st.lookup(NAME, [0])
        assert main(["gc", str(tmp_path)]) == 0
        assert work.is_dir() and (work / "tables").is_dir(), "the running build's work directory was deleted"
        go.touch()
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0 and stdout.strip() == "built", stderr
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with tierstore.open(out, device="cpu") as st:
        assert torch.equal(bits(st.lookup(NAME, [3, 200])), bits(new[[3, 200]]))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- messages --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["verify"], ["inspect"], ["inspect", "--json"]])
def test_verify_and_inspect_restore_a_store_left_mid_swap(tmp_path, capsys, command):
    """A --force build killed between its two renames: OUT missing, the old store in
    .OUT.old-TAG. On main verify and inspect said "build one"; now they restore it first."""
    ckpt = tmp_path / "a.safetensors"
    _ckpt(ckpt)
    out = tierstore.build_store(ckpt, tmp_path / "s", progress=False)
    os.rename(out, tmp_path / f".s.old-{_dead_pid()}")
    assert main([*command, str(out)]) == 0
    cap = capsys.readouterr()
    assert f"restored {out}" in cap.err
    assert (NAME in cap.out) if command[0] == "inspect" else cap.out.startswith("ok")
    assert tierstore.verify_store(out, progress=False).ok


def test_unwritable_out_is_a_permission_error_not_zero_free(read_only_dir, tmp_path, monkeypatch, capsys):
    """A read-only filesystem (squashfs, /proc, /sys) reports 0 bytes free; on main the build
    said "has 0 free" instead of naming the real problem."""
    ckpt = tmp_path / "a.safetensors"
    _ckpt(ckpt)
    Usage = type(shutil.disk_usage(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(0, 0, 0))  # as such filesystems report
    with pytest.raises(StoreIOError, match="permission|not permitted") as e:
        tierstore.build_store(ckpt, read_only_dir / "s", progress=False)
    assert e.value.errno in (errno.EACCES, errno.EPERM) and str(read_only_dir) in str(e.value)
    assert "free" not in str(e.value)
    monkeypatch.undo()
    if os.path.isdir("/sys/kernel") and shutil.disk_usage("/sys").free == 0:  # a real one, where there is
        assert main(["build", str(ckpt), "/sys/kernel/tierstore-test-store", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "0 free" not in err and "/sys/kernel" in err and len(err.strip().splitlines()) == 1


def test_without_flock_builds_run_unlocked_and_recovery_judges_by_pid(tmp_path, monkeypatch):
    """A filesystem without flock (ENOLCK): the build still succeeds, and its work directory
    is judged by PID as before (kept while the PID lives, removed once it is dead)."""
    import tierstore.format.recovery as recovery

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(recovery.fcntl, "flock", no_flock)
    a = tmp_path / "a.safetensors"
    table = _ckpt(a)
    out = tierstore.build_store(a, tmp_path / "s", progress=False)
    with tierstore.open(out, device="cpu") as st:
        assert torch.equal(bits(st.lookup(NAME, [7])), bits(table[[7]]))
    work, fd = recovery.new_work_dir(out)
    try:
        assert not (work / LOCK_NAME).exists() and recover(out) == [] and work.is_dir()  # our PID lives
    finally:
        os.close(fd)
    dead = tmp_path / f".s.tmp-{_dead_pid()}-1-0"
    os.rename(work, dead)
    assert len(recover(out)) == 1 and not dead.exists()
