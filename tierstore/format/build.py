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

import datetime as _dt
import errno
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, open_checkpoint
from ..errors import CapacityError, CheckpointError, StoreExistsError, StoreIOError, TierStoreError
from ..files import NO_SPACE, fsync_dir, os_error, write_durable
from .hotorder import HotOrder, load_hot_order
from .order import write_order_head
from .quant import FP4_SCHEME, FP8_SCHEME, NAN_SCALE, NanScaleWarning, Quant
from .spec import (
    DTYPES,
    FORMAT_VERSION,
    PAGE_SIZE,
    Manifest,
    TableInfo,
    header_page,
    row_stride_for,
    write_manifest,
)
from .recovery import check_replaceable, leftover_tag, new_work_dir, publish, recover
from .writer import one_torch_thread, table_filler, write_row_file

__all__ = ["build_store", "DEFAULT_TABLE_PATTERN", "CHUNK_BYTES"]

# Every Engram table: our model's "<prefix>.engram.memory.weight" and DeepSeek-V4.1's
# "layers.{L}.engram.embed.weight" (fp8 rows; its "...engram.embed.scale" travels with it).
DEFAULT_TABLE_PATTERN = r"(^|\.)engram\.(memory|embed)\.weight$"
V41_TABLE = re.compile(r"(^|\.)engram\.embed\.weight$")
WEIGHT_SUFFIX, SCALE_SUFFIX = ".weight", ".scale"
CHUNK_BYTES = 32 * 1024 * 1024  # rows read and written per step; peak memory is a few of these


def _select_tables(ckpt: Checkpoint, pattern: str | None) -> list[str]:
    try:
        pat = re.compile(pattern or DEFAULT_TABLE_PATTERN)
    except re.error as e:
        raise CheckpointError(f"--tables {pattern!r} is not a valid regular expression ({e}); "
                              r"pass a Python regex such as '\.emb$'") from None
    names = [n for n in ckpt.tensors if pat.search(n)]
    # a quantized table's scales travel with its rows; a regex that also matches them
    # (e.g. 'engram') must not make them tables of their own
    companions = {_scale_name(n) for n in names} & set(ckpt.tensors)
    names = [n for n in names if n not in companions]
    two_d = sorted(n for n, m in ckpt.tensors.items() if len(m.shape) == 2)
    if not names:
        listing = ", ".join(f"{n} {list(ckpt.tensors[n].shape)}" for n in two_d[:20]) or "none"
        how = "no tensor matches --tables" if pattern else "no Engram table (…engram.memory.weight or …engram.embed.weight)"
        raise CheckpointError(
            f"{how} {pat.pattern!r}; 2-D tensors found: {listing}. Select tables with --tables REGEX"
        )
    for n in ckpt.tensors:  # scales whose rows are missing: an incomplete download
        if n.endswith(SCALE_SUFFIX) and pat.search(n[: -len(SCALE_SUFFIX)] + WEIGHT_SUFFIX) \
                and n[: -len(SCALE_SUFFIX)] + WEIGHT_SUFFIX not in ckpt.tensors:
            raise CheckpointError(f"tensor {n!r} holds block scales but its rows "
                                  f"{n[: -len(SCALE_SUFFIX)] + WEIGHT_SUFFIX!r} are not in the checkpoint; "
                                  "download every shard model.safetensors.index.json names")
    for n in names:
        meta = ckpt.tensors[n]
        if len(meta.shape) != 2:
            raise CheckpointError(f"tensor {n!r} has shape {list(meta.shape)}; a table must be 2-D (rows, dim)")
        if meta.dtype not in DTYPES:
            raise CheckpointError(f"tensor {n!r} has dtype {meta.dtype}; supported: {', '.join(DTYPES)}")
        # A row of no values has no stride (the chunking divides by it). A table of no rows holds
        # nothing to look up, and its dim is bound by no data: a corrupt [0, 2**40] header would
        # size the build's buffers, so empty tables are refused rather than half-supported.
        if 0 in meta.shape:
            what = "at least one value per row" if meta.shape[1] == 0 else "at least one row"
            raise CheckpointError(f"tensor {n!r} has shape {list(meta.shape)}: a table needs {what}; "
                                  "leave it out with --tables REGEX")
    return sorted(names)


def _scale_name(name: str) -> str:
    """The block-scale companion of a table: ``X.weight`` -> ``X.scale`` (DeepSeek's naming)."""
    return name[: -len(WEIGHT_SUFFIX)] + SCALE_SUFFIX if name.endswith(WEIGHT_SUFFIX) else name + SCALE_SUFFIX


def _quantization(ckpt: Checkpoint, name: str) -> tuple[Quant, str] | None:
    """(Quant, scale tensor) of a table stored with block scales, None for a plain table.

    A table is quantized when its ``.scale`` companion is in the checkpoint. Values are
    F8_E4M3 ``[rows, V]`` or packed FP4 in U8 ``[rows, V/2]``; the scale is F8_E8M0
    ``[rows, V/block]``. A V4.1 embed table (``...engram.embed.weight``) in fp8 or U8 without
    its scale cannot be dequantized: refused, as is any shape or dtype disagreement.
    """
    meta, scale = ckpt.tensors[name], _scale_name(name)
    smeta = ckpt.tensors.get(scale)
    if smeta is None:
        if V41_TABLE.search(name) and meta.dtype in ("float8_e4m3fn", "uint8"):
            raise CheckpointError(f"table {name!r} ({meta.dtype} {list(meta.shape)}) has no block scales "
                                  f"{scale!r} in the checkpoint: its rows cannot be dequantized; download every "
                                  "shard model.safetensors.index.json names")
        return None
    rows, cols = meta.shape
    if meta.dtype == "float8_e4m3fn":
        scheme, values = FP8_SCHEME, cols
    elif meta.dtype == "uint8":
        scheme, values = FP4_SCHEME, 2 * cols
    else:
        raise CheckpointError(f"table {name!r} has block scales {scale!r} but dtype {meta.dtype}: quantized rows "
                              "must be F8_E4M3 values or packed FP4 E2M1 (U8, two values per byte); leave it out "
                              "with --tables REGEX")
    if smeta.dtype != "float8_e8m0fnu":
        raise CheckpointError(f"scales {scale!r} have dtype {smeta.dtype}; expected F8_E8M0 (UE8M0 powers of two) "
                              f"for table {name!r}")
    if len(smeta.shape) != 2 or smeta.shape[0] != rows or smeta.shape[1] < 1 or values % smeta.shape[1]:
        raise CheckpointError(f"shapes disagree: table {name!r} {list(meta.shape)} ({values} values per row) and "
                              f"its scales {scale!r} {list(smeta.shape)}: need [{rows}, k] with k dividing {values}; "
                              "the checkpoint is damaged or not in the DeepSeek-V4.1 layout")
    try:
        return Quant(scheme, values // smeta.shape[1], values), scale
    except TierStoreError as e:  # e.g. an odd fp4 block: name the tensors, not only the numbers
        raise CheckpointError(f"table {name!r} {list(meta.shape)} {meta.dtype} with scales {scale!r} "
                              f"{list(smeta.shape)}: {e}") from None


def _chunk_rows(row_stride: int) -> int:
    # a multiple of the rows that fill whole pages, so each chunk checksums whole pages
    unit = PAGE_SIZE // math.gcd(row_stride, PAGE_SIZE)
    return max(unit, CHUNK_BYTES // row_stride // unit * unit)


def _write_table(ckpt: Checkpoint, name: str, info: TableInfo, src_dtype: str, tmp: Path, bar: tqdm,
                 shard: tuple[int, int] | None = None, order: HotOrder | None = None,
                 scale: str | None = None, build_id: str = "") -> tuple[str, int]:
    """Write one table's row file, checksums and row order, each carrying ``build_id``; returns
    the write path that ran (``O_DIRECT`` or ``buffered``) and how many of a quantized table's
    block scales are NaN (UE8M0 0xFF, counted in each chunk as it is filled; 0 for a plain table). The rows go through the pipelined writer
    (``tierstore.format.writer``): the next chunk is read and checksummed while this one is
    written. A quantized table (``info.quant``) reads its values from ``name`` and its block
    scales from ``scale``, the same rows of each per chunk, and stores them side by side."""
    step = _chunk_rows(info.row_stride)
    if shard is not None:  # a shard reads world x its rows per chunk: keep the chunk bytes bounded
        unit = PAGE_SIZE // math.gcd(info.row_stride, PAGE_SIZE)  # chunks stay whole pages
        step = max(unit, step // shard[1] // unit * unit)
    sums = np.empty(info.n_pages, dtype=np.uint64)
    nan_scales = [0]
    filler = table_filler(ckpt, name, info, src_dtype, step, shard, order, scale, nan_scales=nan_scales,
                          path=tmp / info.file)
    try:
        with one_torch_thread():  # the build's own threads are its parallelism
            mode = write_row_file(tmp / info.file, header_page(info, build_id), info.rows, info.row_stride, step,
                                  filler.fill, sums, hint=filler.hint, starts=filler.starts,
                                  progress=lambda n: bar.update(n * info.row_bytes))
    finally:
        filler.close()
    write_durable(tmp / info.checksum_file, sums.astype("<u8").tobytes())
    if order is not None:
        write_durable(tmp / info.order_file, lambda f: write_order_head(f, info, order.hot, build_id))
    return mode, nan_scales[0]


def _warn_nan_scales(info: TableInfo, count: int) -> None:
    assert info.quant is not None
    warnings.warn(f"table {info.name!r}: {count:,} of {info.rows * info.quant.n_scales:,} block scales are NaN "
                  f"(UE8M0 0x{NAN_SCALE:X}); kept as they are, so those blocks of {info.quant.block} values "
                  "dequantize to NaN, as in the reference; `tierstore inspect` shows the count",
                  NanScaleWarning, stacklevel=3)


def _orders(order_by: str | os.PathLike[str], names: list[str], ckpt: Checkpoint) -> dict[str, HotOrder]:
    """Hottest-first row order per table that has a profile in ``order_by`` (held as the
    profile's accessed rows only: ``tierstore.format.hotorder``)."""
    orders = {}
    for name in names:
        order = load_hot_order(order_by, name, ckpt.tensors[name].shape[0])
        if order is not None:
            orders[name] = order
    if not orders:
        raise CheckpointError(f"order_by={str(order_by)!r} holds no profile for any selected table; "
                              "record one with `tierstore profile ... --save-profile`")
    return orders


def _check_parent(out: Path) -> None:
    """Refuse an ``out`` whose nearest existing ancestor is not a directory (a file, say)."""
    for p in out.parents:
        if os.path.lexists(p):
            if not p.is_dir():
                raise StoreIOError(errno.ENOTDIR, f"cannot build {out}: {p} is not a directory", os.fspath(p))
            return


def _check_writable(out: Path, ckpt: Checkpoint) -> None:
    """Raise ``StoreIOError`` (closing ``ckpt``) if nothing can be created beside ``out``."""
    probe = out.parent / f".{out.name}.tmp-{leftover_tag()}"
    try:
        os.mkdir(probe)
    except OSError as e:
        ckpt.close()
        raise os_error(e, f"cannot build {out}: creating an entry in {out.parent}", out.parent) from e
    os.rmdir(probe)


def _inputs(checkpoint: str | os.PathLike[str], ckpt: Checkpoint) -> tuple[list[Path], list[Path]]:
    """What a --force build must never replace: the files it reads, and the checkpoint's
    directory (a directory given as the checkpoint, or the one holding a sharded index)."""
    p = Path(checkpoint).absolute()
    files = {Path(m.file).absolute() for m in ckpt.tensors.values()} | ({p} if p.is_file() else set())
    dirs = {p} if p.is_dir() else ({p.parent} if p.name.endswith(".index.json") else set())
    return sorted(files), sorted(dirs)


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
        is complete). Without it an existing ``out`` raises ``StoreExistsError``. It replaces
        only a tierstore store (or an empty directory): user files, a plain file, a symlink,
        or the checkpoint itself (``out`` being, holding or inside it) raise
        ``ReplaceRefusedError`` and nothing is touched.
    dtype: store rows in this dtype (e.g. "bfloat16", "float8_e4m3fn"), converted with
        round-to-nearest; default: keep the checkpoint's dtype, bit for bit. Quantized tables
        (a ``.scale`` companion, below) cannot be converted: combining them with ``dtype`` raises.

    Quantized tables (DeepSeek-V4.1): a table ``X.weight`` whose ``X.scale`` is in the
    checkpoint (F8_E4M3 or packed-FP4 U8 values, F8_E8M0 scales, one per block of values) is
    stored as rows of value bytes then scale bytes, and the manifest records the scheme
    (docs/format.md, "Quantized tables"); lookups return bfloat16. A missing companion of a
    V4.1 ``...engram.embed.weight``, or shapes that disagree, raise ``CheckpointError``.
    attach: files copied into ``out/attachments/`` (model config, tokenizer, ...).
    shard: ``(rank, world_size)``: store only rows ``rank::world_size`` of every table (one shard
        of a sharded store, see ``tierstore.serve.distributed``); the manifest records the shard.
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
    targets = [d for d in DTYPES if DTYPES[d][0].is_floating_point]  # uint8 holds bytes, not converted values
    if dtype is not None and dtype not in targets:
        raise TierStoreError(f"dtype={dtype!r} is not supported; choose one of {', '.join(targets)}")
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
    inputs = _inputs(checkpoint, ckpt)
    if force:
        try:
            check_replaceable(out, *inputs)
        except BaseException:
            ckpt.close()
            raise
    names = _select_tables(ckpt, tables)
    quants = {n: q for n in names if (q := _quantization(ckpt, n)) is not None}
    if dtype is not None and quants:
        ckpt.close()
        raise TierStoreError(f"dtype={dtype!r} cannot convert quantized table(s) {sorted(quants)[:3]}: they are stored "
                             "as their fp8/fp4 bytes and scales and dequantized to bfloat16 by lookups; drop --dtype "
                             "or leave them out with --tables REGEX")
    perms = _orders(order_by, names, ckpt) if order_by is not None else {}
    infos: list[tuple[str, TableInfo, str]] = []
    for i, name in enumerate(names):
        meta = ckpt.tensors[name]
        rows, dim = meta.shape
        source: dict[str, object] = {"checkpoint": str(Path(checkpoint).absolute()), "dtype": meta.dtype}
        if shard is not None:
            source["shard"] = {"rank": shard[0], "world_size": shard[1], "global_rows": rows}
            rows = len(range(shard[0], rows, shard[1]))
        quant = None
        if name in quants:
            quant, source["scale"] = quants[name]
            target, dim = "uint8", quant.row_bytes  # a stored row: value bytes, then scale bytes
        else:
            target = dtype or meta.dtype
        stride = row_stride_for(dim * DTYPES[target][1])
        info = TableInfo(
            name=name, rows=rows, dim=dim, dtype=target, row_stride=stride,
            file=f"tables/t{i:04d}.rows", checksum_file=f"tables/t{i:04d}.sum",
            file_bytes=TableInfo.expected_file_bytes(rows, stride),
            source=source,
            order_file=f"tables/t{i:04d}.order" if name in perms else None,
            quant=quant,
        )
        infos.append((name, info, meta.dtype))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ckpt.close()
        raise os_error(e, f"creating the directory that will hold {out}", out.parent) from e
    need = sum(i.file_bytes + i.n_pages * 8 + (4 * len(perms[n].hot) + 2 * PAGE_SIZE if i.order_file else 0) for n, i, _ in infos) + sum(a.stat().st_size for a in attach_paths)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        _check_writable(out, ckpt)  # read-only filesystems report 0 free: name the real problem
        raise CapacityError(f"the store needs {need} bytes but {out.parent} has {free} free; free space or pick OUT elsewhere")

    lock = None
    tmp = out.parent / f".{out.name}.tmp-{leftover_tag()}"
    build_id = uuid.uuid4().hex  # every file carries it: an open never mixes two builds' files
    try:
        tmp, lock = new_work_dir(out, tmp)  # locked from its creation: the build's liveness
        (tmp / "tables").mkdir()
        total = sum(i.nbytes for _, i, _ in infos)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="build",
                  disable=not progress) as bar:
            for name, info, src_dtype in infos:
                bar.set_postfix_str(name[-40:])
                # provenance: which write path ran (O_DIRECT, or buffered where the filesystem refused
                # it), and a quantized table's NaN scales; the manifest, written below, records them
                info.source["write_path"], nan_scales = _write_table(
                    ckpt, name, info, src_dtype, tmp, bar, shard, perms.get(name),
                    quants[name][1] if name in quants else None, build_id)
                if info.quant is not None:
                    info.source["nan_scales"] = nan_scales
        if attach_paths:
            (tmp / "attachments").mkdir()
            for a in attach_paths:
                shutil.copyfile(a, tmp / "attachments" / a.name)
        manifest = Manifest(
            tables={info.name: info for _, info, _ in infos},
            attachments=[a.name for a in attach_paths],
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            build_id=build_id,
            # an ordered table's order file is the head form (version 4): older readers refuse it
            # by the manifest's version; a store without one stays version 3, byte for byte
            version=FORMAT_VERSION if perms else 3,
        )
        fsync_dir(tmp / "tables")
        write_manifest(tmp, manifest)
        publish(tmp, out, force, *inputs)
    except StoreExistsError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in NO_SPACE:
            raise CapacityError(f"disk full while building {out} ({e.strerror}); nothing was written, free space and rerun") from e
        raise os_error(e, f"building {out}", e.filename) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)  # the build lock: released only once the work directory is published or gone
        ckpt.close()
    for _, info, _ in infos:  # once the store is in place: a failed build warns of nothing
        if info.source.get("nan_scales"):
            _warn_nan_scales(info, info.source["nan_scales"])
    return out
