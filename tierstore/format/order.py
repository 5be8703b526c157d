"""The row-order file of a hotness-ordered table (``tables/tNNNN.order``).

Store format version 4 writes the *head* form: only the hot rows, the rest follows from them::

    page 0     magic ``TIERSTORE-ORDR\\0\\2``, a little-endian uint32 length, a JSON object
               {name, rows, dtype, hot, build_id, checksum}, zero padding
    page 1...  the ``hot`` row ids at file positions ``0..hot-1`` (hottest first; little-endian
               int32, int64 past 2**31 rows), zero padded to a whole page

Every other row follows them in ascending id (``format.hotorder``), so row ``x``'s position
is its rank among the hot ids if it is one, else ``hot + x - #{hot ids < x}``: a binary
search over the sorted hot ids (``HotOrder.of``). Open reads ``4096 + 4 x hot`` bytes and
keeps ~8-12 bytes per hot id, nothing per table row (the dense form below read ``4 x rows``
bytes at every open, 1.5 GiB at 384M rows).

Format version 3 wrote the *dense* form (still read, whole, as before)::

    page 0     magic ``TIERSTORE-ORDR\\0\\1``, a little-endian uint32 length, a JSON object
               {name, rows, dtype, build_id, checksum}, zero padding
    page 1...  each row's physical position in the row file: ``rows`` little-endian int32
               (int64 past 2**31 rows), zero padded to a whole page

Why a checksum: a position that is wrong by one bit, or two positions swapped, send a lookup
to another row's bytes, and those bytes pass their own page checksum. ``checksum`` is
``"mulsum64-pages-v1:"`` + 16 hex digits: each data page's mulsum64-v1 checksum (the rows'
scheme, ``spec.page_checksums``) times the odd weight ``splitmix64(page + 1) | 1``, summed
mod 2**64. A change confined to one 8-byte word (a flipped bit, two entries of one word
swapped) always changes it; other changes (entries swapped across words or pages) change it
but for a 2**-64-ish chance.

Why checked at open, in full: the positions (dense) or hot ids (head) are indexed by every
lookup, so there is no later read to check them on. The open streams the file once through
an 8 MiB buffer: the head form's ``hot x 4`` bytes; the dense form's ``rows x 4`` bytes,
1.5 GiB at 384M rows, per table, per open. Read and checksum together ran at 0.8-0.9 GB/s from the page
cache on the shared 2-vCPU VM (load ~12; write_order then load_order of a 64M-row file):
0.30 s for 64M rows, so ~1.8 s for a 384M-row table, or the disk's time to read 1.5 GiB
when it is not cached. The map and the check use the same opened file, so a rebuild that
replaces the store meanwhile cannot swap it.

Versions 1 and 2 stored a bare ``.npy`` (no checksum, no build id); it is still read.

Whatever the form, :func:`load_order` returns a :class:`RowOrder`: ``of(rows)`` (row ids ->
file positions) and ``ids(start, stop)`` (file positions -> row ids).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from ..errors import CorruptDataError
from ..files import is_json_int, os_error, read_full
from .hotorder import HotOrder
from .spec import PAGE_SIZE, TableInfo, check_build, make_header, page_checksums, read_header, splitmix_odd

__all__ = ["ORDER_MAGIC", "HEAD_MAGIC", "RowOrder", "DenseOrder", "write_order", "write_order_streamed",
           "write_order_head", "load_order", "order_checksum"]

ORDER_MAGIC = b"TIERSTORE-ORDR\x00\x01"  # the dense form (format version 3)
HEAD_MAGIC = b"TIERSTORE-ORDR\x00\x02"  # the head form (format version 4)
ORDER_SCHEME = "mulsum64-pages-v1"
_CHUNK_PAGES = 2048  # 8 MiB per read and checksum step
_DTYPES = {"int32": np.dtype("<i4"), "int64": np.dtype("<i8")}


def _fold(pages: np.ndarray, first: int) -> int:
    """Sum of the pages' checksums times their weights, mod 2**64 (pages: uint8, whole pages)."""
    weights = splitmix_odd(np.arange(first + 1, first + 1 + len(pages) // PAGE_SIZE, dtype=np.uint64))
    return int((page_checksums(pages) * weights).sum(dtype=np.uint64))


def order_checksum(raw: np.ndarray) -> str:
    """The checksum of position bytes ``raw`` (uint8, any length: the last page is zero padded)."""
    acc, step = 0, _CHUNK_PAGES * PAGE_SIZE
    for start in range(0, len(raw), step):
        chunk = raw[start : start + step]
        if len(chunk) % PAGE_SIZE:
            chunk = np.concatenate([chunk, np.zeros(PAGE_SIZE - len(chunk) % PAGE_SIZE, dtype=np.uint8)])
        acc = (acc + _fold(chunk, start // PAGE_SIZE)) % 2**64
    return f"{ORDER_SCHEME}:{acc:016x}"


def write_order(f: BinaryIO, info: TableInfo, pos: np.ndarray, build_id: str) -> None:
    """Write table ``info``'s order file into ``f``: header page, then ``pos`` (row -> position)."""
    name = "int32" if pos.dtype.itemsize == 4 else "int64"
    raw = np.ascontiguousarray(pos, dtype=_DTYPES[name]).reshape(-1).view(np.uint8)
    head = {"name": info.name, "rows": info.rows, "dtype": name, "build_id": build_id,
            "checksum": order_checksum(raw)}
    f.write(make_header(ORDER_MAGIC, head, "order-file"))
    step = _CHUNK_PAGES * PAGE_SIZE
    for start in range(0, len(raw), step):
        f.write(memoryview(raw[start : start + step]))
    f.write(b"\x00" * (-len(raw) % PAGE_SIZE))


def write_order_streamed(f: BinaryIO, info: TableInfo, positions: Callable[[int, int], np.ndarray],
                         build_id: str) -> None:
    """:func:`write_order` with the positions made a chunk at a time by ``positions(start, stop)``
    (rows start:stop -> their positions), so they are never all in memory (1.5 GiB at 384M
    rows): the header page, whose checksum covers them all, is written last, into its place.
    ``f`` must be seekable."""
    name = "int32" if info.rows < 2**31 else "int64"
    dtype = _DTYPES[name]
    f.write(b"\x00" * PAGE_SIZE)  # the header's place
    step = _CHUNK_PAGES * PAGE_SIZE // dtype.itemsize  # rows per chunk: whole pages
    acc = tail = 0
    for start in range(0, info.rows, step):
        raw = np.ascontiguousarray(positions(start, min(start + step, info.rows)), dtype=dtype).view(np.uint8)
        f.write(memoryview(raw))
        tail = -len(raw) % PAGE_SIZE  # only the last chunk can end inside a page
        if tail:
            raw = np.concatenate([raw, np.zeros(tail, dtype=np.uint8)])
        acc = (acc + _fold(raw, start * dtype.itemsize // PAGE_SIZE)) % 2**64
    f.write(b"\x00" * tail)
    head = {"name": info.name, "rows": info.rows, "dtype": name, "build_id": build_id,
            "checksum": f"{ORDER_SCHEME}:{acc:016x}"}
    end = f.tell()
    f.seek(0)
    f.write(make_header(ORDER_MAGIC, head, "order-file"))
    f.seek(end)


def write_order_head(f: BinaryIO, info: TableInfo, hot: np.ndarray, build_id: str) -> None:
    """Write table ``info``'s order file in the head form into ``f``: the header page, then
    ``hot``, the row ids at file positions ``0..len(hot)-1`` (every other row follows them in
    ascending id). Memory: one 8 MiB chunk besides ``hot``."""
    name = "int32" if info.rows < 2**31 else "int64"
    dtype = _DTYPES[name]
    step = _CHUNK_PAGES * PAGE_SIZE // dtype.itemsize
    acc = 0
    chunks = []
    for start in range(0, len(hot), step):
        raw = np.ascontiguousarray(hot[start:start + step], dtype=dtype).view(np.uint8)
        chunks.append(raw)
        if len(raw) % PAGE_SIZE:
            raw = np.concatenate([raw, np.zeros(-len(raw) % PAGE_SIZE, dtype=np.uint8)])
        acc = (acc + _fold(raw, start * dtype.itemsize // PAGE_SIZE)) % 2**64
    head = {"name": info.name, "rows": info.rows, "dtype": name, "hot": int(len(hot)), "build_id": build_id,
            "checksum": f"{ORDER_SCHEME}:{acc:016x}"}
    f.write(make_header(HEAD_MAGIC, head, "order-file"))
    for raw in chunks:
        f.write(memoryview(raw))
    f.write(b"\x00" * (-len(hot) * dtype.itemsize % PAGE_SIZE))


class DenseOrder:
    """A dense order file's map (format version 3 and older): each row's position, memory-mapped."""

    def __init__(self, pos: np.ndarray) -> None:
        self.pos = pos
        self.rows = len(pos)
        self._perm: np.ndarray | None = None

    def of(self, rows: np.ndarray) -> np.ndarray:
        """File positions of ``rows`` (int64)."""
        return self.pos[rows].astype(np.int64)

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Row ids at file positions ``start:stop``: through the inverse permutation, 4 bytes
        per table row, kept until :meth:`release` (a resident tier's load is its only user)."""
        if self._perm is None:
            perm = np.empty(self.rows, dtype=np.int32 if self.rows < 2**31 else np.int64)
            perm[self.pos] = np.arange(self.rows, dtype=perm.dtype)
            self._perm = perm
        return self._perm[start:stop].astype(np.int64)

    def release(self) -> None:
        self._perm = None

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (the mapped positions are the file's, not counted)."""
        return self._perm.nbytes if self._perm is not None else 0


RowOrder = Union[DenseOrder, HotOrder]


def load_order(store: Path, info: TableInfo, build_id: str | None = None) -> RowOrder:
    """The row order of a hotness-ordered table, checked: a :class:`HotOrder` from a head-form
    file (format version 4: only the hot ids are read), a :class:`DenseOrder` from a dense one
    (memory-mapped; read once whole for its checksum).

    build_id: the manifest's (version 3+): the file must carry it (``StoreChangedError``
    otherwise) and be a checksummed order file. None: a version 1-2 store's ``.npy`` is
    accepted too, and a version-3 file's id is not compared.
    Raises ``CorruptDataError`` for a missing, truncated or damaged file (checksum), and
    ``StoreIOError`` when reading fails.
    """
    path = store / str(info.order_file)
    try:
        f = open(path, "rb")
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise CorruptDataError(f"{path}: the row order of table {info.name!r} is missing; rebuild the store "
                                   "(`tierstore build --force`)") from None
        raise os_error(e, "opening the row order", path) from e
    with f:
        fd = f.fileno()
        buf = np.empty(_CHUNK_PAGES * PAGE_SIZE, dtype=np.uint8)
        try:
            got = read_full(fd, memoryview(buf[:PAGE_SIZE]), 0, path)
        except OSError as e:
            raise os_error(e, "reading the row order's header", path) from e
        if bytes(buf[:6]) == b"\x93NUMPY" and build_id is None:
            return DenseOrder(_load_npy(path, info))
        if got < PAGE_SIZE:
            raise CorruptDataError(f"{path}: row order of table {info.name!r} is truncated ({got} bytes); "
                                   "rebuild the store (`tierstore build --force`)")
        is_head = bytes(buf[:len(HEAD_MAGIC)]) == HEAD_MAGIC
        head = read_header(buf[:PAGE_SIZE], HEAD_MAGIC if is_head else ORDER_MAGIC, str(path), "order file")
        check_build(head, build_id, str(path))
        dtype = _DTYPES.get(head.get("dtype"))  # type: ignore[arg-type]
        n = head.get("hot") if is_head else info.rows
        if head.get("name") != info.name or head.get("rows") != info.rows or dtype is None \
                or not is_json_int(n) or not 0 <= n <= info.rows:
            raise CorruptDataError(f"{path}: the order file says name={head.get('name')!r} rows={head.get('rows')!r} "
                                   f"dtype={head.get('dtype')!r} hot={head.get('hot')!r}, the manifest {info.name!r} "
                                   f"with {info.rows} rows; rebuild the store (`tierstore build --force`)")
        data = n * dtype.itemsize
        size = os.fstat(fd).st_size
        if size != PAGE_SIZE + (data + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE:
            raise CorruptDataError(f"{path}: order file of table {info.name!r} has {size} bytes, expected "
                                   f"{PAGE_SIZE + -(-data // PAGE_SIZE) * PAGE_SIZE}; rebuild the store")
        acc = 0
        hot = np.empty(n if is_head else 0, dtype=dtype)
        hot_bytes = hot.view(np.uint8)
        for off in range(PAGE_SIZE, size, len(buf)):  # one streaming pass: the checksum over the file read
            m = min(len(buf), size - off)
            try:
                if read_full(fd, memoryview(buf[:m]), off, path) != m:
                    raise CorruptDataError(f"{path}: order file ended inside byte {off + m}; rebuild the store")
            except OSError as e:
                raise os_error(e, "reading the row order", path) from e
            acc = (acc + _fold(buf[:m], (off - PAGE_SIZE) // PAGE_SIZE)) % 2**64
            if is_head:
                at = off - PAGE_SIZE
                take = max(0, min(m, len(hot_bytes) - at))
                hot_bytes[at:at + take] = buf[:take]
        if head.get("checksum") != f"{ORDER_SCHEME}:{acc:016x}":
            raise CorruptDataError(f"{path}: the row order of table {info.name!r} fails its checksum "
                                   f"({head.get('checksum')!r} recorded, {ORDER_SCHEME}:{acc:016x} read): lookups "
                                   "would return other rows; rebuild the store (`tierstore build --force`)")
        if is_head:
            return _head_order(path, info, hot)
        # mapped from the file just checked (the map keeps it open), not from the path
        return DenseOrder(np.memmap(f, dtype=dtype, mode="r", offset=PAGE_SIZE, shape=(info.rows,)))


def _head_order(path: Path, info: TableInfo, hot: np.ndarray) -> HotOrder:
    """The map of a checked head-form file; ids out of range or repeated are a damaged file."""
    try:
        return HotOrder(hot, info.rows)
    except ValueError as e:
        raise CorruptDataError(f"{path}: row order of table {info.name!r} is not a permutation of 0..{info.rows - 1} "
                               f"({e}); rebuild the store (`tierstore build --force`)") from None


def _load_npy(path: Path, info: TableInfo) -> np.ndarray:
    """A version 1-2 order file: a bare .npy, checked for shape and dtype only."""
    try:
        pos = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"{path}: cannot read the row order of table {info.name!r} ({e}); rebuild the store") from None
    if pos.shape != (info.rows,) or pos.dtype.kind != "i":
        raise CorruptDataError(f"{path}: row order has shape {pos.shape} {pos.dtype}, expected ({info.rows},) ints")
    return pos
