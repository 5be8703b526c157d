"""Build a store from a checkpoint: stream rows in chunks, checksum pages, commit atomically.

Crash safety (docs/format.md, "Crash safety"): everything is written into a hidden sibling
directory ``.NAME.tmp-TAG``; files are fsynced, the manifest is written last, then the
directory is renamed onto ``OUT`` without replacing anything (``renameat2`` with
``RENAME_NOREPLACE``), so of two builds racing for a new ``OUT`` exactly one wins and the
other raises ``StoreExistsError``. With ``force`` the previous store is first moved to
``.NAME.old-TAG`` and deleted only after the new one is in place. A crash at any point
leaves no store at ``OUT``, the previous one, or the new one, plus hidden leftovers that
:func:`recover` puts right: the next build of ``OUT`` and the next ``tierstore.open(OUT)``
call it, and ``tierstore gc`` runs it over whole directories.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import itertools
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, open_checkpoint
from .errors import CapacityError, CheckpointError, StoreExistsError, StoreIOError, TierStoreError
from .files import fsync_dir, os_error
from .format import (
    DTYPES,
    PAGE_SIZE,
    Manifest,
    TableInfo,
    header_page,
    page_checksums,
    row_stride_for,
    write_manifest,
)

__all__ = ["build_store", "recover", "find_orphans", "Orphan", "DEFAULT_TABLE_PATTERN", "CHUNK_BYTES"]

# Every Engram memory table the model names: "<prefix>.engram.memory.weight".
DEFAULT_TABLE_PATTERN = r"(^|\.)engram\.memory\.weight$"
CHUNK_BYTES = 32 * 1024 * 1024  # rows read and written per step; peak memory is a few of these
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _select_tables(ckpt: Checkpoint, pattern: str | None) -> list[str]:
    pat = re.compile(pattern or DEFAULT_TABLE_PATTERN)
    names = [n for n in ckpt.tensors if pat.search(n)]
    two_d = sorted(n for n, m in ckpt.tensors.items() if len(m.shape) == 2)
    if not names:
        listing = ", ".join(f"{n} {list(ckpt.tensors[n].shape)}" for n in two_d[:20]) or "none"
        how = "no tensor matches --tables" if pattern else "no Engram memory table (…engram.memory.weight)"
        raise CheckpointError(
            f"{how} {pat.pattern!r}; 2-D tensors found: {listing}. Select tables with --tables REGEX"
        )
    for n in names:
        meta = ckpt.tensors[n]
        if len(meta.shape) != 2:
            raise CheckpointError(f"tensor {n!r} has shape {list(meta.shape)}; a table must be 2-D (rows, dim)")
        if meta.dtype not in DTYPES:
            raise CheckpointError(f"tensor {n!r} has dtype {meta.dtype}; supported: {', '.join(DTYPES)}")
    return sorted(names)


def _convert(chunk: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert a (rows, row_bytes) uint8 chunk between dtypes via torch (round to nearest)."""
    if src == dst:
        return chunk
    t = torch.from_numpy(chunk).view(DTYPES[src][0]).to(DTYPES[dst][0])
    return t.view(torch.uint8).numpy()


def _chunk_rows(row_stride: int) -> int:
    # a multiple of the rows that fill whole pages, so each chunk checksums whole pages
    unit = PAGE_SIZE // math.gcd(row_stride, PAGE_SIZE)
    return max(unit, CHUNK_BYTES // row_stride // unit * unit)


def _read_rows(ckpt: Checkpoint, name: str, start: int, stop: int, shard: tuple[int, int] | None,
               perm: np.ndarray | None = None) -> np.ndarray:
    """Rows at file positions start:stop. For a shard (rank, world) position i holds global row
    rank + i * world; with a hotness order, position p holds row perm[p]."""
    if perm is not None:
        return ckpt.take_rows(name, perm[start:stop])
    if shard is None:
        return ckpt.read_rows(name, start, stop)
    rank, world = shard
    first, last = rank + start * world, rank + (stop - 1) * world
    return ckpt.read_rows(name, first, last + 1)[::world]  # one sequential read, keep every world-th row


def _write_table(ckpt: Checkpoint, name: str, info: TableInfo, src_dtype: str, tmp: Path, bar: tqdm,
                 shard: tuple[int, int] | None = None, perm: np.ndarray | None = None) -> None:
    rows_path, sums_path = tmp / info.file, tmp / info.checksum_file
    sums = np.empty(info.n_pages, dtype=np.uint64)
    head = np.frombuffer(header_page(info), dtype=np.uint8)
    sums[0] = page_checksums(head)[0]
    step = _chunk_rows(info.row_stride)
    if shard is not None:  # a shard reads world x its rows per chunk: keep the chunk bytes bounded
        step = max(PAGE_SIZE // math.gcd(info.row_stride, PAGE_SIZE), step // shard[1])
    buf = np.zeros(step * info.row_stride, dtype=np.uint8)
    fd = os.open(rows_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, head.tobytes(), 0)
        for start in range(0, info.rows, step):
            stop = min(start + step, info.rows)
            n = stop - start
            chunk = _convert(_read_rows(ckpt, name, start, stop, shard, perm), src_dtype, info.dtype)
            nbytes = n * info.row_stride
            padded = (nbytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE  # last chunk: pad to a page
            view = buf[:padded]
            view[nbytes:] = 0
            view[:nbytes].reshape(n, info.row_stride)[:, : info.row_bytes] = chunk
            first_page = 1 + start * info.row_stride // PAGE_SIZE
            sums[first_page : first_page + padded // PAGE_SIZE] = page_checksums(view)
            written = os.pwrite(fd, memoryview(view), PAGE_SIZE + start * info.row_stride)
            if written != padded:
                raise OSError(errno.ENOSPC, "short write")
            bar.update(n * info.row_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(sums_path, "wb") as f:
        f.write(sums.astype("<u8").tobytes())
        f.flush()
        os.fsync(f.fileno())
    if perm is not None:
        pos = np.empty(info.rows, dtype=np.int32 if info.rows < 2**31 else np.int64)
        pos[perm] = np.arange(info.rows, dtype=pos.dtype)  # row -> physical position
        with open(tmp / info.order_file, "wb") as f:
            np.save(f, pos)
            f.flush()
            os.fsync(f.fileno())


def _orders(order_by: str | os.PathLike[str], names: list[str], ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """Hottest-first row permutation per table that has a profile in ``order_by``."""
    from .profile import load_profile

    perms = {}
    for name in names:
        rows = ckpt.tensors[name].shape[0]
        counts = load_profile(order_by, name)
        if counts is None:
            continue
        if len(counts) != rows:
            raise CheckpointError(f"profile of {name!r} in {order_by} has {len(counts)} rows, the table {rows}")
        perms[name] = np.argsort(-np.asarray(counts, dtype=np.int64), kind="stable")
    if not perms:
        raise CheckpointError(f"order_by={str(order_by)!r} holds no profile for any selected table; "
                              "record one with `tierstore profile ... --save-profile`")
    return perms


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


def _tag() -> str:
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
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except BaseException:
        try:
            os.rmdir(dst)
        except OSError:
            pass
        raise


def _publish(tmp: Path, out: Path, force: bool) -> None:
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
    old = out.parent / f".{out.name}.old-{_tag()}"
    for _ in range(8):  # more only if other builds keep publishing OUT between our two renames
        try:
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
        fsync_dir(out.parent)
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


def _check_parent(out: Path) -> None:
    """Refuse an ``out`` whose nearest existing ancestor is not a directory (a file, say)."""
    for p in out.parents:
        if os.path.lexists(p):
            if not p.is_dir():
                raise StoreIOError(errno.ENOTDIR, f"cannot build {out}: {p} is not a directory", os.fspath(p))
            return


def _check_attachment(path: Path) -> None:
    """Fail before the build, not after it, on an attachment that cannot be copied."""
    if not path.exists():
        raise StoreIOError(errno.ENOENT, f"attachment {path} does not exist", os.fspath(path))
    if not path.is_file():
        raise StoreIOError(errno.EISDIR if path.is_dir() else errno.EINVAL,
                           f"attachment {path} is not a regular file", os.fspath(path))
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise os_error(e, f"reading attachment {path}", path) from e


def build_store(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    tables: str | None = None,
    force: bool = False,
    dtype: str | None = None,
    progress: bool = True,
    attach: Sequence[str | os.PathLike[str]] = (),
    shard: tuple[int, int] | None = None,
    order_by: str | os.PathLike[str] | None = None,
) -> Path:
    """Build a store at ``out`` from the 2-D tables of ``checkpoint``.

    tables: regex over tensor names (``re.search``); default ``DEFAULT_TABLE_PATTERN``.
    force: replace an existing store at ``out`` (the old one stays intact until the new one
        is complete). Without it an existing ``out`` raises ``StoreExistsError``.
    dtype: store rows in this dtype (e.g. "bfloat16", "float8_e4m3fn"), converted with
        round-to-nearest; default: keep the checkpoint's dtype, bit for bit.
    attach: files copied into ``out/attachments/`` (model config, tokenizer, ...).
    shard: ``(rank, world_size)``: store only rows ``rank::world_size`` of every table (one shard
        of a sharded store, see ``tierstore.distributed``); the manifest records the shard.
    order_by: a store directory holding access profiles (``tierstore profile --save-profile``),
        typically an earlier build of the same checkpoint: tables with a profile there are
        written hottest row first, so hot rows share 4 KiB pages (fewer cold page reads, a
        denser page cache). The permutation is kept in the store; lookups are unchanged.
    Returns the store path. Raises ``StoreExistsError`` when ``out`` exists, or when another
    build published it first, ``CapacityError`` when the disk is full (nothing is left
    behind), ``CheckpointError`` for unreadable input, ``StoreIOError`` for any other OS
    failure (an ``out`` whose parent is a file or not writable, an unreadable attachment).
    Leftovers of earlier builds of ``out`` that died are put right first (``recover``).
    """
    out = Path(out).absolute()
    if dtype is not None and dtype not in DTYPES:
        raise TierStoreError(f"dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    _check_parent(out)
    recover(out)  # a build of OUT that died mid-swap: bring the old store back first
    if out.exists() and not force:
        raise StoreExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    attach_paths = [Path(a) for a in attach]
    for a in attach_paths:
        _check_attachment(a)
    if shard is not None:
        rank, world = shard
        if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
            raise TierStoreError(f"shard={shard!r} must be (rank, world_size) with 0 <= rank < world_size")
    if order_by is not None and shard is not None:
        raise TierStoreError("order_by and shard cannot be combined: a shard's rows are fixed by row id")
    ckpt = open_checkpoint(checkpoint)
    names = _select_tables(ckpt, tables)
    perms = _orders(order_by, names, ckpt) if order_by is not None else {}
    infos: list[tuple[str, TableInfo, str]] = []
    for i, name in enumerate(names):
        meta = ckpt.tensors[name]
        rows, dim = meta.shape
        source = {"checkpoint": str(Path(checkpoint).absolute()), "dtype": meta.dtype}
        if shard is not None:
            source["shard"] = {"rank": shard[0], "world_size": shard[1], "global_rows": rows}
            rows = len(range(shard[0], rows, shard[1]))
        target = dtype or meta.dtype
        stride = row_stride_for(dim * DTYPES[target][1])
        info = TableInfo(
            name=name, rows=rows, dim=dim, dtype=target, row_stride=stride,
            file=f"tables/t{i:04d}.rows", checksum_file=f"tables/t{i:04d}.sum",
            file_bytes=TableInfo.expected_file_bytes(rows, stride),
            source=source,
            order_file=f"tables/t{i:04d}.order.npy" if name in perms else None,
        )
        infos.append((name, info, meta.dtype))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ckpt.close()
        raise os_error(e, f"creating the directory that will hold {out}", out.parent) from e
    need = sum(i.file_bytes + i.n_pages * 8 + (8 * i.rows if i.order_file else 0) for _, i, _ in infos) + sum(a.stat().st_size for a in attach_paths)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise CapacityError(f"the store needs {need} bytes but {out.parent} has {free} free; free space or pick OUT elsewhere")

    tmp = out.parent / f".{out.name}.tmp-{_tag()}"
    try:
        (tmp / "tables").mkdir(parents=True)
        total = sum(i.nbytes for _, i, _ in infos)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="build",
                  disable=not progress) as bar:
            for name, info, src_dtype in infos:
                bar.set_postfix_str(name[-40:])
                _write_table(ckpt, name, info, src_dtype, tmp, bar, shard, perms.get(name))
        if attach_paths:
            (tmp / "attachments").mkdir()
            for a in attach_paths:
                shutil.copyfile(a, tmp / "attachments" / a.name)
        manifest = Manifest(
            tables={info.name: info for _, info, _ in infos},
            attachments=[a.name for a in attach_paths],
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        fsync_dir(tmp / "tables")
        write_manifest(tmp, manifest)
        fsync_dir(tmp)
        _publish(tmp, out, force)
    except StoreExistsError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _NO_SPACE:
            raise CapacityError(f"disk full while building {out} ({e.strerror}); nothing was written, free space and rerun") from e
        raise os_error(e, f"building {out}", e.filename) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    return out
