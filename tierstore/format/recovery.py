"""Crash safety of a store directory: publishing a finished build, and putting right what
a build that died left behind (docs/format.md, "Crash safety").

A build writes into a hidden sibling ``.NAME.tmp-TAG`` and publishes it onto ``OUT``
without replacing anything (``renameat2`` with ``RENAME_NOREPLACE``), so of two builds
racing for a new ``OUT`` exactly one wins. With ``force`` the previous store is first moved
to ``.NAME.old-TAG`` and deleted once the new one is in place. :func:`recover` (called by
the next build of ``OUT`` and by ``tierstore.open``) restores a store left mid-swap and
removes leftovers of dead builds; :func:`find_orphans` lists them over a directory
(``tierstore gc``). This module is below both the builder and the store: opening a store
needs no part of the builder.

``force`` replaces only a tierstore store (:func:`check_replaceable`): what is at ``OUT``
must be absent, an empty directory or a directory holding a tierstore manifest, and must not
be, hold or lie inside the checkpoint the build reads; anything else raises
``ReplaceRefusedError`` and nothing is touched.

A build is alive while it holds the ``flock`` on ``.build.lock`` in its work directory
(:func:`new_work_dir`): flock is shared by every process that sees the file, whatever PID
namespace (container) it runs in, so a reader on the host never deletes the work directory
of a build running in a container.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import faults
from ..errors import ReplaceRefusedError, StoreExistsError, StoreIOError
from ..files import fsync_dir, os_error

__all__ = ["Orphan", "find_orphans", "recover", "publish", "leftover_tag", "new_work_dir", "check_replaceable",
           "LOCK_NAME"]

# -- publishing and crash recovery -------------------------------------------------------
#
# Hidden siblings of OUT are named ".NAME.tmp-TAG" (a build's work directory) and
# ".NAME.old-TAG" (the previous store, moved aside by a --force build during the swap).
# TAG is "PID-START-SEQ": the builder's process id, its start time (field 22 of
# /proc/PID/stat, clock ticks since boot; 0 where /proc is unavailable) and a per-process
# counter (two builds in one process never share a directory). A PID alone is not enough
# to tell a dead build from a live one: after PID reuse an unrelated process may hold it,
# and its leftovers would never be cleaned. The (pid, start time) pair names one process
# for the whole uptime of the machine. Names of older versions, ".NAME.tmp-PID", are still
# recognised and checked by PID alone.
#
# But a PID means nothing across PID namespaces: a build in a container has another PID (and
# start time) there than the host sees, so the pair alone would call a running build dead.
# The liveness of a work directory is therefore its lock (LOCK_NAME inside it), which the
# builder holds with flock(LOCK_EX) from right after creating the directory until the build
# is published or given up (new_work_dir). Recovery takes the same lock, non-blocking, and
# deletes the directory only while holding it: a held lock means a running build, whatever
# its PID. A work directory without a lock file is left by a build of an older tierstore (or
# by a new one in the instant between its mkdir and its lock): recovery then creates the lock
# file itself, takes it, and treats the directory as dead only if the PID check above also
# says dead; otherwise it unlinks the lock file it made and leaves the directory. A builder
# that meets that (its lock file unlinked or its directory gone once it holds the lock)
# starts over in a new directory, so no running build is ever deleted.
#
# ".NAME.old-TAG" directories (the previous store during a --force swap) are judged by PID
# as before: a wrong "dead" there only makes the running swap take one more turn (the
# restored store is moved aside again) or deletes a copy the builder deletes anyway.
# Leftovers that are not directories (a plain file an older --force moved aside, an atomic
# write's temporary file) are removed once their PID is gone (PID alone: a file carries no lock).
LOCK_NAME = ".build.lock"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-(?P<start>\d+)(?:-\d+)?)?$")
_SEQ = itertools.count()
_MANIFEST = "manifest.json"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks since boot) of process ``pid`` from
    /proc/PID/stat, None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # field 2 (comm) is in parentheses and may hold spaces: count fields after its last ")"
    fields = stat[stat.rindex(b")") + 2 :].split()
    try:
        return fields[0].decode(), int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def leftover_tag() -> str:
    """A name for this build, unique on this machine while the process lives (see above)."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return f"{pid}-{stat[1] if stat else 0}-{next(_SEQ)}"


def _alive(pid: int, start: int | None) -> bool:
    """Whether the process that wrote a leftover may still run. A zombie (killed, not yet
    reaped) is dead. Errs towards alive: a PID that exists but whose /proc entry cannot be
    read counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, now = stat
    if state in ("Z", "X"):
        return False
    return not start or now == start  # no start recorded: an old-style name, or no /proc then


def _open_lock(path: str, create: bool) -> int:
    flags = os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        return os.open(path, os.O_RDWR | flags, 0o644)
    except PermissionError:  # another user's build: flock needs no write access on Linux
        if create:
            raise
        return os.open(path, os.O_RDONLY | flags)


def _claim(work: str, pid: int, start: int | None) -> int | None:
    """Take the build lock of work directory ``work`` if its build is dead: returns the file
    descriptor that holds it (close it to release), None while a build holds it or may still
    run (see the comment above LOCK_NAME)."""
    lock = os.path.join(work, LOCK_NAME)
    created = False
    try:
        fd = _open_lock(lock, create=True)
        created = True
    except FileExistsError:
        try:
            fd = _open_lock(lock, create=False)
        except OSError:  # gone meanwhile (published, removed), or unreadable: leave it
            return None
    except OSError:  # the directory is gone, or we may not write in it (nor remove it then)
        return None
    by_pid = created  # no lock file: an older version's build, or a new one before its lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a running build holds it
        os.close(fd)
        return None
    except OSError:  # a filesystem without flock: builds there run unlocked, judge by the PID
        by_pid = True
    if by_pid and _alive(pid, start):
        if created:
            try:
                os.unlink(lock)  # while held: a builder that opened it finds it gone and starts over
            except OSError:
                pass
        os.close(fd)
        return None
    return fd


_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def new_work_dir(out: Path, first: Path | None = None) -> tuple[Path, int]:
    """Create the work directory ``.NAME.tmp-TAG`` of a build of ``out`` (``first``, if given,
    is the name to try first) and take its build lock. Returns (directory, descriptor): the
    build is alive for recovery until the descriptor is closed (or the process dies). Raises
    ``OSError`` if the directory cannot be created; leaves nothing behind then."""
    for _ in range(16):
        tmp = first or out.parent / f".{out.name}.tmp-{leftover_tag()}"
        first = None
        os.mkdir(tmp)
        lock = tmp / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except FileNotFoundError:  # a recovery removed the directory before we locked it
            continue
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a recovery looks at it
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            os.unlink(lock)  # this filesystem has no flock: run unlocked, judged by PID as before
            return tmp, fd
        try:
            ours = os.path.samestat(os.stat(lock, follow_symlinks=False), os.fstat(fd))
        except FileNotFoundError:
            ours = False
        if ours:
            return tmp, fd
        os.close(fd)  # a recovery removed the directory or unlinked the lock: start over
        shutil.rmtree(tmp, ignore_errors=True)
    raise StoreIOError(errno.EAGAIN, f"could not lock a work directory for {out} in 16 tries "
                                     "(other processes kept removing them)", os.fspath(out.parent))


# -- what --force may replace ----------------------------------------------------------------

def _holds_manifest(directory: str) -> bool:
    """Whether ``directory`` holds a manifest of ours: ``manifest.json`` whose ``format`` is
    tierstore's. A damaged manifest still counts if its text starts as ours does (so a
    corrupt store can be rebuilt with --force); its other fields are not checked."""
    from .spec import FORMAT_NAME  # here: spec imports torch, which `tierstore profile` must not

    try:
        fd = os.open(os.path.join(directory, _MANIFEST), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    try:
        doc = json.loads(head)
    except ValueError:
        return re.match(rb'\A\s*\{\s*"format"\s*:\s*"' + re.escape(FORMAT_NAME.encode()) + rb'"', head) is not None
    return isinstance(doc, dict) and doc.get("format") == FORMAT_NAME


def _checkpoint_relation(out: str, files: list[Path], dirs: list[Path]) -> str | None:
    """How ``out`` relates to the checkpoint read (its files, the directories holding a
    directory or sharded checkpoint), None if it does not; symlinks resolved."""
    outs = {os.path.abspath(out), os.path.realpath(out)}
    for kind, paths in (("directory", dirs), ("file", files)):
        for p in paths:
            for c in {os.path.abspath(p), os.path.realpath(p)}:
                for o in outs:
                    if o == c:
                        return f"is the checkpoint {kind} being read"
                    if c.startswith(o.rstrip("/") + "/"):
                        return f"holds the checkpoint {kind} {c} being read"
                    if kind == "directory" and o.startswith(c.rstrip("/") + "/"):
                        return f"lies inside the checkpoint directory {c}"
    return None


def check_replaceable(out: Path, files: list[Path] = (), dirs: list[Path] = ()) -> None:  # type: ignore[assignment]
    """Raise ``ReplaceRefusedError`` unless a --force build may replace what is at ``out``:
    nothing, an empty directory, or a tierstore store (a directory with our manifest) that
    is not, does not hold and does not lie inside the checkpoint (``files`` it reads,
    checkpoint ``dirs``). Changes nothing."""
    if not os.path.lexists(out):
        return
    why = _checkpoint_relation(os.fspath(out), list(files), list(dirs))
    fix = "pick an OUT outside the checkpoint"
    if why is None:
        fix = "remove or move it yourself if it should go, or pick another OUT"
        if os.path.islink(out):
            why = f"is a symbolic link (to {os.readlink(out)}), not a store directory"
        elif not os.path.isdir(out):
            why = "is a file, not a tierstore store"
        else:
            try:
                entries = sorted(os.listdir(out))
            except OSError as e:
                raise os_error(e, f"checking what --force would replace at {out}", out) from e
            if entries and not _holds_manifest(os.fspath(out)):
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                why = (f"is a directory of {len(entries)} entries ({shown}) with no tierstore {_MANIFEST}: "
                       "not a store")
    if why is not None:
        raise ReplaceRefusedError(f"--force refused: {out} {why}; --force replaces only a tierstore store, and "
                                  f"nothing was changed: {fix}")


def _libc_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or glibc < 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, atomically, raising ``FileExistsError`` if ``dst`` exists.

    A plain rename(2) of a directory silently replaces an empty ``dst`` and fails with
    ENOTEMPTY only for a non-empty one. Linux's renameat2(RENAME_NOREPLACE) refuses any
    existing ``dst`` in one step. Where it is missing (other systems, a filesystem without
    it), ``dst`` is first claimed with mkdir, which fails if it exists, and ``src`` renamed
    onto the empty claim: still exactly one winner, but a crash between the two steps
    leaves an empty ``dst`` (which does not open as a store; remove it by hand).
    """
    if _RENAMEAT2 is not None:
        faults.point("rename", dst)
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    os.mkdir(dst)
    try:
        faults.point("rename", dst)
        os.rename(src, dst)
    except BaseException:
        try:
            os.rmdir(dst)
        except OSError:
            pass
        raise


def _drop_lock(out: Path) -> None:
    """Remove the published store's copy of the build lock file (the lock itself is released
    when the builder closes it); one left by a crash here is harmless."""
    try:
        os.unlink(out / LOCK_NAME)
    except OSError:
        pass


def publish(tmp: Path, out: Path, force: bool, files: list[Path] = (), dirs: list[Path] = ()) -> None:  # type: ignore[assignment]
    """Put the complete store ``tmp`` at ``out``. Without ``force`` an existing ``out`` (even
    one that appeared while this build ran) raises ``StoreExistsError``; with it, the store
    at ``out`` is moved to ``.NAME.old-TAG`` and deleted once the new one is in place, if
    :func:`check_replaceable` (given the checkpoint's ``files`` and ``dirs``) allows it."""
    if not force:
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            raise StoreExistsError(f"{out} already exists (another build may have finished first); "
                                   "pass --force (force=True) to replace it") from None
        _drop_lock(out)
        fsync_dir(out.parent)
        return
    old = out.parent / f".{out.name}.old-{leftover_tag()}"
    for _ in range(8):  # more only if other builds keep publishing OUT between our two renames
        check_replaceable(out, files, dirs)  # again: something else may have appeared at OUT
        try:
            faults.point("rename", out)
            os.rename(out, old)
            moved = True
        except FileNotFoundError:
            moved = False
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:  # another build published OUT in between: replace that one too
            if moved:
                shutil.rmtree(old, ignore_errors=True)
            continue
        except BaseException:  # the new store did not go in: put the old one back at once
            if moved:
                try:
                    os.rename(old, out)
                except OSError:
                    pass  # left for recover(): the next open or build after this process ends
            raise
        _drop_lock(out)
        try:
            fsync_dir(out.parent)
        finally:  # the new store is in place either way: the old one must not linger
            if moved:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise StoreExistsError(f"{out} was replaced by other builds 8 times while this one tried to publish")


@dataclass(frozen=True)
class Orphan:
    """A hidden leftover beside a store, written by a build whose process is gone."""

    path: Path  # the hidden leftover, .NAME.tmp-TAG or .NAME.old-TAG (a directory, or a file)
    kind: str  # "tmp": an unfinished build; "old": a complete store moved aside by a --force build
    store: Path  # the store it belongs to (OUT)
    pid: int  # the process that left it
    action: str  # "restore": rename back to `store`, which is missing; "remove": delete it
    start: int | None = None  # that process's start time, from the name (None: not recorded)

    def clean(self) -> str:
        """Restore or remove this leftover; returns one line saying what was done. Raises
        ``StoreIOError`` if a restore fails; a failed removal is reported in the line. A work
        directory is removed only while holding its build lock: one a build took since the
        listing is skipped."""
        if self.action == "restore":
            try:
                _rename_noreplace(self.path, self.store)
                fsync_dir(self.store.parent)
                return f"restored {self.store} from {self.path.name} (a --force build died mid-swap)"
            except FileNotFoundError:  # another process restored it first
                return f"skipped {self.path}: already restored or removed by another process"
            except FileExistsError:  # a store appeared at OUT meanwhile: this copy is stale
                pass
            except OSError as e:
                raise os_error(e, f"restoring {self.store} from {self.path.name}", self.path) from e
        what = "unfinished build" if self.kind == "tmp" else "replaced store"
        lock = None
        if not os.path.isdir(self.path) or os.path.islink(self.path):
            what = "leftover file"
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # reported below
        else:
            if self.kind == "tmp":
                lock = _claim(os.fspath(self.path), self.pid, self.start)
                if lock is None:
                    if not os.path.lexists(self.path):
                        return f"skipped {self.path}: already removed or published by another process"
                    return f"skipped {self.path}: a running build holds it"
            try:
                shutil.rmtree(self.path, ignore_errors=True)
            finally:
                if lock is not None:
                    os.close(lock)
        if os.path.lexists(self.path):
            return f"could not remove {self.path} ({what} of dead process {self.pid}); remove it by hand"
        return f"removed {self.path} ({what} of dead process {self.pid})"


def _dead(e: os.DirEntry[str], m: re.Match[str]) -> bool:
    """Whether the build (or process) that left entry ``e`` is gone: a work directory by its
    build lock, anything else by its PID (see the comment above LOCK_NAME)."""
    pid, start = int(m["pid"]), int(m["start"] or 0) or None
    if not e.is_dir(follow_symlinks=False):
        return not _alive(pid, None)  # a file carries no lock; its name's "start" may be a thread id
    if m["kind"] == "tmp":
        fd = _claim(e.path, pid, start)
        if fd is None:
            return False
        os.close(fd)  # listing only: clean() takes it again before removing
        return True
    return not _alive(pid, start)


def _scan(parent: Path, name: str | None) -> list[Orphan]:
    """Leftovers of dead builds in ``parent`` (of store ``name`` only, if given), each with the
    action that puts things right: a store that is missing gets back its newest complete
    ``.old`` copy; everything else is removed. One directory listing."""
    prefix = f".{name}." if name is not None else "."
    found: list[tuple[os.DirEntry[str], re.Match[str]]] = []
    with os.scandir(parent) as entries:
        for e in entries:
            if not e.name.startswith(prefix):
                continue
            m = _LEFTOVER.match(e.name)
            if m is None or (name is not None and m["name"] != name):
                continue
            if _dead(e, m):
                found.append((e, m))
    orphans: list[Orphan] = []
    for store_name in sorted({m["name"] for _, m in found}):
        store = parent / store_name
        group = [(e, m) for e, m in found if m["name"] == store_name]
        restore = None
        if not os.path.lexists(store):
            olds = [e for e, m in group if m["kind"] == "old" and e.is_dir(follow_symlinks=False)
                    and os.path.isfile(os.path.join(e.path, _MANIFEST))]
            if olds:
                restore = max(olds, key=lambda e: (e.stat(follow_symlinks=False).st_ctime_ns, e.name)).name
        for e, m in sorted(group, key=lambda em: em[0].name):
            orphans.append(Orphan(path=parent / e.name, kind=m["kind"], store=store, pid=int(m["pid"]),
                                  action="restore" if e.name == restore else "remove",
                                  start=int(m["start"] or 0) or None))
    # restore first: a store that comes back is never left missing by a later failure
    return sorted(orphans, key=lambda o: o.action != "restore")


def find_orphans(directory: str | os.PathLike[str] = ".") -> list[Orphan]:
    """Leftovers of dead builds directly inside ``directory``, with the action ``clean()`` will
    take. Changes nothing. Raises ``StoreIOError`` if the directory cannot be listed."""
    directory = Path(directory).absolute()
    try:
        return _scan(directory, None)
    except OSError as e:
        raise os_error(e, "listing", directory) from e


def recover(out: str | os.PathLike[str]) -> list[str]:
    """Put the store ``out`` right after a build of it died; returns one line per action.

    If ``out`` is missing and a dead ``--force`` build left the previous store in
    ``.NAME.old-TAG``, it is renamed back (that store is complete: it was published). Other
    leftovers of dead builds of ``out`` (``.NAME.tmp-TAG``, ``.NAME.old-TAG``, directories or
    files) are removed. Leftovers of live builds (a work directory whose build lock is held)
    are not touched. Called by ``build_store`` and by
    ``tierstore.open``; costs one listing of the parent directory when there is nothing to
    do, and does nothing if that cannot be listed.
    """
    out = Path(out).absolute()
    try:
        orphans = _scan(out.parent, out.name)
    except OSError:
        return []
    return [o.clean() for o in orphans]


