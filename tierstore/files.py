"""Durable, versioned files: the one atomic writer and the one reader of versioned JSON.

Every small file tierstore writes (the manifest, saved profiles, traces) goes through
:func:`atomic_write`: the bytes go to a hidden temporary sibling, which is fsynced, renamed
over the target, and the directory is fsynced, so a crash at any point leaves either the
old file or the new one, never a torn mix, and a completed write survives a power cut.

Every versioned JSON document (the manifest, a profile's metadata, a trace's header) is
checked by :func:`check_versioned`, so they all fail the same way: a document that is not
a JSON object of the expected ``format`` raises ``CorruptDataError``; a known format of
another ``version`` raises ``FormatVersionError`` naming the fix.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from . import faults
from .errors import CapacityError, CorruptDataError, FormatVersionError, StoreIOError

__all__ = ["atomic_write", "write_durable", "read_full", "pwrite_all", "fsync_dir", "check_versioned", "is_json_int", "read_json", "os_error", "NO_SPACE"]

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def os_error(e: OSError, doing: str, path: str | os.PathLike[str] | None = None) -> StoreIOError | CapacityError:
    """The typed error for an OS failure while ``doing`` something: ``CapacityError`` when the
    disk or quota is full, ``StoreIOError`` (errno, strerror and path kept) otherwise."""
    where = f" {os.fspath(path)}" if path is not None else ""
    if e.errno in NO_SPACE:
        return CapacityError(f"no space left while {doing}{where} ({e.strerror}); free space and retry")
    hint = " (check the file's permissions and owner)" if e.errno in (errno.EACCES, errno.EPERM) else ""
    err = StoreIOError(e.errno, f"{doing}: {e.strerror or e}{hint}", os.fspath(path) if path is not None else None)
    return err


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        faults.point("fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_full(fd: int, view: memoryview, offset: int, path: str | os.PathLike[str]) -> int:
    """``preadv`` into all of ``view`` (a flat byte view) from ``offset``, retrying short reads;
    returns the bytes read, fewer only at end of file. Raises ``OSError``."""
    n = len(view)
    got = os.preadv(fd, [view[: faults.point("read", path, n)]], offset)
    while 0 < got < n:  # a short read means end of file, unless a retry makes progress
        more = os.preadv(fd, [view[got:]], offset + got)
        if more <= 0:
            break
        got += more
    return got


def pwrite_all(fd: int, data: bytes | memoryview, offset: int, path: str | os.PathLike[str]) -> None:
    """Write all of ``data`` at ``offset``; a short write means the disk is full (``OSError``
    ENOSPC)."""
    n = len(data)
    written = os.pwrite(fd, memoryview(data)[: faults.point("write", path, n)], offset)
    if written != n:
        raise OSError(errno.ENOSPC, f"short write ({written} of {n} bytes)", os.fspath(path))


def write_durable(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], None]) -> None:
    """Create ``path`` with ``data`` (bytes, or a function writing into a binary file) and
    fsync it: for files inside a directory that is published as a whole afterwards (a
    build's), where the directory's rename is what makes them appear. Raises ``OSError``."""
    with open(path, "wb") as f:
        if callable(data):
            data(f)
        else:
            faults.point("write", path, len(data))
            f.write(data)
        f.flush()
        faults.point("fsync", path)
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` with ``data`` (bytes, or a function that writes into a binary file)
    atomically and durably. Raises ``CapacityError`` on a full disk, ``StoreIOError`` on any
    other OS failure; the temporary file never outlives the call (a writer killed inside it
    leaves one behind: the next write of ``path`` removes it, once its PID is gone)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    _remove_dead_temps(path)
    try:
        write_durable(tmp, data)
        faults.point("rename", path)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(e, "writing", path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _remove_dead_temps(path: Path) -> None:
    """Delete the temporary siblings ``.NAME.tmp-PID-TID`` of ``path`` that killed writers
    left (a process killed inside :func:`atomic_write` cannot unlink its own): those whose PID
    no longer exists. A PID that exists, even reused by another process, keeps its file."""
    prefix = f".{path.name}.tmp-"
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid, _, tid = name[len(prefix):].partition("-")
        if not (pid.isdigit() and tid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass  # another writer removed it first, or it is not ours to remove
        except OSError:
            pass  # exists (another user's process): alive


def check_versioned(doc: Any, *, fmt: str, version: int | tuple[int, ...], where: str, fix: str) -> dict[str, Any]:
    """``doc`` as a dict after checking its ``format`` and ``version`` fields; ``version`` is
    the one version, or the versions, this reader understands.

    ``where`` names the file in messages; ``fix`` says what to do about another version
    (e.g. "rebuild the store").
    """
    versions = version if isinstance(version, tuple) else (version,)
    if not isinstance(doc, dict):
        raise CorruptDataError(f"{where}: expected a JSON object, found {type(doc).__name__}: not a {fmt} file")
    if doc.get("format") != fmt:
        raise CorruptDataError(f"{where}: format is {doc.get('format')!r}, expected {fmt!r}: not a {fmt} file")
    v = doc.get("version")
    if isinstance(v, bool) or v not in versions:
        raise FormatVersionError(
            f"{where}: {fmt} version {v!r} is not supported by this tierstore "
            f"(it reads version {', '.join(map(str, versions))}); {fix}")
    return doc


def is_json_int(v: Any) -> bool:
    """An integer in a parsed JSON document (``true``/``false`` parse as bools, which are ints)."""
    return isinstance(v, int) and not isinstance(v, bool)


def read_json(path: str | os.PathLike[str], *, what: str) -> Any:
    """Parse a JSON file; unreadable files raise ``StoreIOError``, bad JSON ``CorruptDataError``."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise os_error(e, f"reading {what}", path) from e
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptDataError(f"{os.fspath(path)}: {what} is not valid JSON ({e})") from None
