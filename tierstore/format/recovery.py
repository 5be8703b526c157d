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
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import faults
from ..errors import StoreExistsError
from ..files import fsync_dir, os_error

__all__ = ["Orphan", "find_orphans", "recover", "publish", "leftover_tag"]

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


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Put the complete store ``tmp`` at ``out``. Without ``force`` an existing ``out`` (even
    one that appeared while this build ran) raises ``StoreExistsError``; with it, the store
    at ``out`` is moved to ``.NAME.old-TAG`` and deleted once the new one is in place."""
    if not force:
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            raise StoreExistsError(f"{out} already exists (another build may have finished first); "
                                   "pass --force (force=True) to replace it") from None
        fsync_dir(out.parent)
        return
    old = out.parent / f".{out.name}.old-{leftover_tag()}"
    for _ in range(8):  # more only if other builds keep publishing OUT between our two renames
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

    path: Path  # the hidden directory, .NAME.tmp-TAG or .NAME.old-TAG
    kind: str  # "tmp": an unfinished build; "old": a complete store moved aside by a --force build
    store: Path  # the store it belongs to (OUT)
    pid: int  # the process that left it
    action: str  # "restore": rename back to `store`, which is missing; "remove": delete it

    def clean(self) -> str:
        """Restore or remove this leftover; returns one line saying what was done. Raises
        ``StoreIOError`` if a restore fails; a failed removal is reported in the line."""
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
        shutil.rmtree(self.path, ignore_errors=True)
        if os.path.lexists(self.path):
            return f"could not remove {self.path} ({what} of dead process {self.pid}); remove it by hand"
        return f"removed {self.path} ({what} of dead process {self.pid})"


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
            if m is None or (name is not None and m["name"] != name) or not e.is_dir(follow_symlinks=False):
                continue
            if not _alive(int(m["pid"]), int(m["start"] or 0) or None):
                found.append((e, m))
    orphans: list[Orphan] = []
    for store_name in sorted({m["name"] for _, m in found}):
        store = parent / store_name
        group = [(e, m) for e, m in found if m["name"] == store_name]
        restore = None
        if not os.path.lexists(store):
            olds = [e for e, m in group if m["kind"] == "old" and os.path.isfile(os.path.join(e.path, _MANIFEST))]
            if olds:
                restore = max(olds, key=lambda e: (e.stat(follow_symlinks=False).st_ctime_ns, e.name)).name
        for e, m in sorted(group, key=lambda em: em[0].name):
            orphans.append(Orphan(path=parent / e.name, kind=m["kind"], store=store, pid=int(m["pid"]),
                                  action="restore" if e.name == restore else "remove"))
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
    leftovers of dead builds of ``out`` (``.NAME.tmp-TAG``, ``.NAME.old-TAG``) are removed.
    Leftovers of live builds are not touched. Called by ``build_store`` and by
    ``tierstore.open``; costs one listing of the parent directory when there is nothing to
    do, and does nothing if that cannot be listed.
    """
    out = Path(out).absolute()
    try:
        orphans = _scan(out.parent, out.name)
    except OSError:
        return []
    return [o.clean() for o in orphans]


