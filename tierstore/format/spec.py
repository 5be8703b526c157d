"""On-disk store format, version 4 (reads versions 1 to 3 too; documented in docs/format.md).

A store is a directory::

    STORE/manifest.json          format name + version, one entry per table, attachments
    STORE/tables/tNNNN.rows      header page + rows at a fixed stride, padded to whole 4 KiB pages
    STORE/tables/tNNNN.sum       one uint64 checksum per 4 KiB page of the .rows file
    STORE/tables/tNNNN.order     row -> position map of a hotness-ordered table (tierstore.format.order)
    STORE/attachments/...        files copied in at build time (model config, tokenizer, ...)
    STORE/profiles/...           access-frequency profiles (written by `tierstore profile --save-profile`)

A quantized table (``TableInfo.quant``, ``tierstore.format.quant``) stores each row as its
fp8/fp4 value bytes followed by its block-scale bytes, as ``uint8``.

Rows start at byte ``PAGE_SIZE`` (after the header page), so every read the disk tier issues
is page-aligned and O_DIRECT / GPUDirect Storage can serve it. Row ``r`` lives at byte
``PAGE_SIZE + r * row_stride``; ``row_stride`` is the row's byte size rounded up to 16.

Checksums ("mulsum64-v1"): page ``p`` viewed as 512 little-endian uint64 words ``w`` has
checksum ``sum(w[i] * K[i]) mod 2**64`` with fixed odd weights ``K``. Any change of a single
word changes the sum (an odd weight is invertible mod 2**64) and the position-dependent
weights catch swapped words. It is chosen over CRC32 because it vectorizes over a whole
batch of pages in numpy: the disk tier verifies every page it reads at memory speed.

One build (version 3): every file carries the build's random id. The row file's header page
records it (and the layout: hot-ordered or not), the checksum file's first entry is the
checksum of that header page, and the order file's header records it too. ``Store`` opens
the files, then checks each id against the manifest's, so files of two builds (a rebuild
racing an open) are never served together.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import errno
import numpy as np
import torch

from ..errors import CorruptDataError, FormatVersionError, StoreChangedError, TierStoreError
from ..files import atomic_write, check_versioned, is_json_int, os_error, read_json
from .quant import SCHEMES, Quant

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PAGE_SIZE",
    "CHECKSUM_SCHEME",
    "DTYPES",
    "TableInfo",
    "Manifest",
    "row_stride_for",
    "page_checksums",
    "page_checksums_torch",
    "read_manifest",
    "write_manifest",
    "ROWS_MAGIC",
    "check_header_page",
    "load_checksums",
    "manifest_digest",
    "read_header",
]

FORMAT_NAME = "tierstore"
# 2: manifest digest and build id; 3: every file carries the build id, order checksum; 4: a
# hot-ordered table's order file holds only its hot head (format.order; a store without an
# ordered table is still written as version 3)
FORMAT_VERSION = 4
READ_VERSIONS = (1, 2, 3, 4)
PINNED_VERSION = 3  # first version whose files carry the build id: opens check them against the manifest
PAGE_SIZE = 4096
CHECKSUM_SCHEME = "mulsum64-v1"
ROWS_MAGIC = b"TIERSTORE-ROWS\x00\x01"  # first 16 bytes of every .rows file
MANIFEST = "manifest.json"

# dtype name -> (torch dtype, element bytes). Stored as raw little-endian bytes.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "float8_e4m3fn": (torch.float8_e4m3fn, 1),
    "float8_e5m2": (torch.float8_e5m2, 1),
    # raw bytes: U8 checkpoint tensors, and the stored rows of a quantized table (``quant``)
    "uint8": (torch.uint8, 1),
}
_TORCH_TO_NAME = {v[0]: k for k, v in DTYPES.items()}
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def dtype_name(dtype: torch.dtype) -> str:
    """The format's name for a torch dtype; raises for dtypes the format cannot hold."""
    try:
        return _TORCH_TO_NAME[dtype]
    except KeyError:
        raise TierStoreError(
            f"dtype {dtype} is not supported; supported: {', '.join(DTYPES)}"
        ) from None


def row_stride_for(row_bytes: int) -> int:
    """Bytes between consecutive rows: the row size rounded up to 16 (aligned vector loads)."""
    return (row_bytes + 15) // 16 * 16


@dataclass(frozen=True)
class TableInfo:
    """One table of fixed-width rows, as recorded in the manifest."""

    name: str  # tensor name in the checkpoint, e.g. "blocks.1.engram.memory.weight"
    rows: int  # number of rows
    dim: int  # values per row
    dtype: str  # key of DTYPES
    row_stride: int  # bytes between rows in the row file (>= row_bytes)
    file: str  # row file, relative to the store directory
    checksum_file: str  # per-page checksums, relative to the store directory
    file_bytes: int  # exact size of the row file (header page + rows, padded to pages)
    source: dict[str, Any] = field(default_factory=dict)  # provenance (checkpoint path, source dtype)
    # hotness-ordered layout: the order file (tierstore.format.order: version 4, the hot rows'
    # ids in file order; version 3 and older, each row's position), hot rows first, sharing
    # pages; None: row r is at position r
    order_file: str | None = None
    # quantized table (docs/format.md, "Quantized tables"): each stored row is value bytes
    # then scale bytes (dtype "uint8", dim = quant.row_bytes); lookups return bf16 rows of
    # quant.values. None: rows are returned as stored. Written to the manifest only when set.
    quant: Quant | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        """dtype of the stored rows (what the tiers hold)."""
        return DTYPES[self.dtype][0]

    @property
    def lookup_dim(self) -> int:
        """Values per row a lookup returns: ``quant.values`` for a quantized table, else ``dim``."""
        return self.quant.values if self.quant is not None else self.dim

    @property
    def lookup_dtype(self) -> torch.dtype:
        """dtype a lookup returns: bfloat16 for a quantized table (dequantized), else the stored dtype."""
        return torch.bfloat16 if self.quant is not None else self.torch_dtype

    @property
    def raw_dtype(self) -> torch.dtype:
        """Integer dtype of the same width: tiers move rows as these, since CPU kernels
        (index_select, index_copy) do not exist for every float dtype (float8)."""
        return _RAW[DTYPES[self.dtype][1]]

    @property
    def row_bytes(self) -> int:
        return self.dim * DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        """Payload bytes (rows x row_bytes), what a tier needs to hold the whole table."""
        return self.rows * self.row_bytes

    @property
    def n_pages(self) -> int:
        return self.file_bytes // PAGE_SIZE

    @staticmethod
    def expected_file_bytes(rows: int, row_stride: int) -> int:
        data = rows * row_stride
        return PAGE_SIZE + (data + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE

    def to_json(self) -> dict[str, Any]:
        """The manifest entry. ``quant`` appears only on quantized tables, so manifests of
        other stores are byte-for-byte what earlier versions wrote and read."""
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "quant"}
        doc["source"] = dict(self.source)
        if self.quant is not None:
            doc["quant"] = self.quant.to_json()
        return doc


@dataclass
class Manifest:
    tables: dict[str, TableInfo]
    attachments: list[str] = field(default_factory=list)
    created: str = ""
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    checksum: dict[str, Any] = field(
        default_factory=lambda: {"scheme": CHECKSUM_SCHEME, "block_size": PAGE_SIZE}
    )
    # A fresh random id per build (version 2+): the identity of this store's content, e.g.
    # for shared-memory segments, which must never be confused with an earlier build's.
    build_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def pinned_build(self) -> str | None:
        """The build id every file must carry (version 3+); None for older stores, whose files
        carry none, so an open cannot tell their files from another build's."""
        return self.build_id if self.version >= PINNED_VERSION else None

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "build_id": self.build_id,
            "created": self.created,
            "checksum": self.checksum,
            "tables": [t.to_json() for t in self.tables.values()],
            "attachments": self.attachments,
        }
        doc["digest"] = manifest_digest(doc)
        return json.dumps(doc, indent=2) + "\n"


def manifest_digest(doc: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its ``digest`` field."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def _relative_file(v: Any) -> bool:
    """A file name inside the store: relative, no '..', no empty parts."""
    if not isinstance(v, str) or not v or v.startswith("/") or "\\" in v or "\x00" in v:
        return False
    return all(part not in ("", ".", "..") for part in v.split("/"))


def _table_info(t: Any, where: str) -> TableInfo:
    """One manifest table entry, every field type- and range-checked."""
    if not isinstance(t, dict):
        raise CorruptDataError(f"{where}: a table entry is {type(t).__name__}, expected an object")
    known = {f.name for f in fields(TableInfo)}
    missing = sorted(known - set(t) - {"source", "order_file", "quant"})
    if missing or set(t) - known:
        raise CorruptDataError(f"{where}: malformed table entry (missing {missing}, unknown {sorted(set(t) - known)})")
    name = t["name"]
    if not isinstance(name, str) or not name:
        raise CorruptDataError(f"{where}: table name {name!r} is not a non-empty string")
    if t["dtype"] not in DTYPES:
        raise FormatVersionError(f"{where}: table {name!r} has unknown dtype {t['dtype']!r}")
    for key in ("rows", "dim", "row_stride", "file_bytes"):
        if not is_json_int(t[key]) or t[key] < (1 if key == "dim" else 0):
            raise CorruptDataError(f"{where}: table {name!r} has {key}={t[key]!r}")
    for key in ("file", "checksum_file"):
        if not _relative_file(t[key]):
            raise CorruptDataError(f"{where}: table {name!r} has {key}={t[key]!r}, not a file inside the store")
    if t.get("order_file") is not None and not _relative_file(t["order_file"]):
        raise CorruptDataError(f"{where}: table {name!r} has order_file={t['order_file']!r}")
    if not isinstance(t.get("source", {}), dict):
        raise CorruptDataError(f"{where}: table {name!r} has a source that is not an object")
    quant = _quant(t.get("quant"), name, where)
    if quant is not None and (t["dtype"] != "uint8" or t["dim"] != quant.row_bytes):
        raise CorruptDataError(f"{where}: quantized table {name!r} must store uint8 rows of {quant.row_bytes} bytes "
                               f"({quant.scheme}, {quant.values} values), but has dim={t['dim']} {t['dtype']}")
    info = TableInfo(**{**t, "quant": quant})
    if info.row_stride != row_stride_for(info.row_bytes):
        raise CorruptDataError(f"{where}: table {name!r} row_stride {info.row_stride} does not match "
                               f"dim {info.dim} x {info.dtype} (expected {row_stride_for(info.row_bytes)})")
    if info.file_bytes != TableInfo.expected_file_bytes(info.rows, info.row_stride):
        raise CorruptDataError(f"{where}: table {name!r} file_bytes inconsistent with rows/stride")
    return info


def _quant(q: Any, name: str, where: str) -> Quant | None:
    """A table entry's ``quant`` field: absent/None, or exactly {scheme, block, values}."""
    if q is None:
        return None
    if not isinstance(q, dict) or set(q) != {"scheme", "block", "values"}:
        raise CorruptDataError(f"{where}: table {name!r} has quant={q!r}; expected "
                               '{"scheme": ..., "block": ..., "values": ...}')
    if q["scheme"] not in SCHEMES:
        raise FormatVersionError(f"{where}: table {name!r} is quantized with scheme {q['scheme']!r}, which this "
                                 f"tierstore does not know ({', '.join(SCHEMES)}); upgrade tierstore")
    if not (is_json_int(q["block"]) and is_json_int(q["values"])):
        raise CorruptDataError(f"{where}: table {name!r} has quant={q!r}: block and values must be integers")
    try:
        return Quant(q["scheme"], q["block"], q["values"])
    except TierStoreError as e:
        raise CorruptDataError(f"{where}: table {name!r}: {e}") from None


def read_manifest(store: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``STORE/manifest.json``: its format and version, its digest (version
    2+), and every field of every table. Raises ``CorruptDataError`` for a damaged manifest,
    ``FormatVersionError`` for another version, ``StoreIOError`` when it cannot be read."""
    if store is None or not isinstance(store, (str, os.PathLike)):
        raise TierStoreError(f"store path {store!r} must be a str or os.PathLike (the store directory)")
    root = Path(store)
    path = root / MANIFEST
    if not root.is_dir():
        raise TierStoreError(f"no store at {store!s}: not a directory (build one with `tierstore build`)")
    if not path.exists():
        raise TierStoreError(
            f"{store!s} is not a tierstore store: {MANIFEST} is missing "
            "(an interrupted build leaves no manifest; rerun `tierstore build`)"
        )
    doc = read_json(path, what="store manifest")
    doc = check_versioned(doc, fmt=FORMAT_NAME, version=READ_VERSIONS, where=str(path),
                          fix="rebuild the store with this tierstore, or upgrade tierstore")
    version = doc["version"]
    if version >= 2:
        if doc.get("digest") != manifest_digest(doc):
            raise CorruptDataError(f"{path}: manifest digest mismatch: the manifest was modified or damaged "
                                   "after the build; rebuild the store (`tierstore build --force`)")
        if not isinstance(doc.get("build_id"), str) or not doc["build_id"]:
            raise CorruptDataError(f"{path}: manifest has no build_id")
    checksum = doc.get("checksum")
    scheme = checksum.get("scheme") if isinstance(checksum, dict) else None
    if scheme != CHECKSUM_SCHEME or checksum.get("block_size") != PAGE_SIZE:
        raise FormatVersionError(f"{path}: checksum scheme {scheme!r} unknown (expected {CHECKSUM_SCHEME})")
    entries, attachments = doc.get("tables"), doc.get("attachments", [])
    if not isinstance(entries, list):
        raise CorruptDataError(f"{path}: 'tables' is {type(entries).__name__}, expected a list")
    if not isinstance(attachments, list) or not all(_relative_file(a) and "/" not in a for a in attachments):
        raise CorruptDataError(f"{path}: 'attachments' must be a list of file names")
    tables: dict[str, TableInfo] = {}
    for t in entries:
        info = _table_info(t, str(path))
        if info.name in tables:
            raise CorruptDataError(f"{path}: table {info.name!r} is listed twice")
        tables[info.name] = info
    files = [f for i in tables.values() for f in (i.file, i.checksum_file, i.order_file) if f]
    if len(set(files)) != len(files):
        raise CorruptDataError(f"{path}: two tables share a file")
    return Manifest(
        tables=tables,
        attachments=list(attachments),
        created=str(doc.get("created", "")),
        checksum=checksum,
        version=version,
        # version 1 had no build id: the manifest's own text stands in (it names every
        # table's size and layout; content changes of a v1 rebuild go unnoticed: rebuild)
        build_id=doc.get("build_id") or hashlib.sha256(path.read_bytes()).hexdigest()[:32],
    )


def write_manifest(store: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write the manifest durably (temp file, fsync, rename, fsync of the directory)."""
    atomic_write(Path(store) / MANIFEST, manifest.to_json().encode())


def load_checksums(store: Path, info: TableInfo) -> np.ndarray:
    """The table's per-page checksums (memory-mapped, shared through the page cache). The size
    is checked on the file that is mapped (one open), not on whatever the path names later."""
    path = store / info.checksum_file
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == info.n_pages * 8:
                return np.memmap(f, dtype="<u8", mode="r")  # the map keeps this file, not the path
    except FileNotFoundError:
        size = -1
    except OSError as e:
        raise os_error(e, "cannot read the checksum file", path) from e
    raise CorruptDataError(
        f"{path}: checksum file has {size} bytes, expected {info.n_pages * 8} "
        f"({info.n_pages} pages of table {info.name!r}); the store is damaged, rebuild it"
    )


def splitmix_odd(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each uint64 of ``x``, forced odd: the scheme's fixed weights."""
    x = x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return x | np.uint64(1)


_K = splitmix_odd(np.arange(1, PAGE_SIZE // 8 + 1, dtype=np.uint64))  # fixed forever for mulsum64-v1


def page_checksums(pages: np.ndarray) -> np.ndarray:
    """mulsum64-v1 checksum of each 4 KiB page: ``pages`` is uint8 (P, 4096) or a flat multiple."""
    words = np.ascontiguousarray(pages).reshape(-1, PAGE_SIZE // 8 * 8).view(np.uint64)
    # uint64 arithmetic wraps mod 2**64 in numpy array ops, which is what the scheme wants.
    return (words * _K).sum(axis=1, dtype=np.uint64)


_K_TORCH: dict[torch.device, torch.Tensor] = {}  # the weights as int64, one copy per device


def page_checksums_torch(pages: torch.Tensor) -> torch.Tensor:
    """mulsum64-v1 of each 4 KiB page of a uint8 tensor (P, 4096) on any device: the same
    values as :func:`page_checksums`, as int64 bit patterns (``.numpy().view(np.uint64)``).

    Why int64: torch has no uint64 multiply on CUDA. Two's-complement multiplication and
    addition keep the low 64 bits exactly as the unsigned ones do (wrap-around mod 2**64),
    so the bit patterns equal numpy's uint64 result; tests check it bit for bit against
    :func:`page_checksums`. The disk tier uses this to verify pages read straight into GPU
    memory (kvikio) without a copy back to the host: one elementwise multiply and one row
    sum, ~8 bytes of temporary per byte read.
    """
    if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] != PAGE_SIZE:
        raise TierStoreError(f"pages must be a uint8 tensor (P, {PAGE_SIZE}), got {pages.dtype} {tuple(pages.shape)}")
    if pages.shape[0] == 0:  # an empty tensor's strides do not allow the dtype view
        return torch.zeros(0, dtype=torch.int64, device=pages.device)
    k = _K_TORCH.get(pages.device)
    if k is None:  # benign race: two threads may both build it
        k = _K_TORCH[pages.device] = torch.from_numpy(_K.view(np.int64)).to(pages.device)
    words = pages.contiguous().view(torch.int64)  # (P, 512) little-endian words
    return (words * k).sum(dim=1, dtype=torch.int64)


def make_header(magic: bytes, head: dict[str, Any], what: str) -> bytes:
    """A header page: ``magic`` (16 bytes), a little-endian uint32 length, JSON, zero padding."""
    meta = json.dumps(head).encode()
    body = magic + len(meta).to_bytes(4, "little") + meta
    if len(body) > PAGE_SIZE:
        raise TierStoreError(f"table name too long for the {what} header: {str(head.get('name'))[:80]!r}...")
    return body + b"\x00" * (PAGE_SIZE - len(body))


def header_page(info: TableInfo, build_id: str) -> bytes:
    """The first page of a .rows file: magic, then the table's JSON description (with the build
    id and the layout), zero padded."""
    head: dict[str, Any] = {"name": info.name, "rows": info.rows, "dim": info.dim, "dtype": info.dtype,
                            "row_stride": info.row_stride, "version": FORMAT_VERSION,
                            "build_id": build_id, "ordered": info.order_file is not None}
    if info.quant is not None:
        head["quant"] = info.quant.to_json()
    return make_header(ROWS_MAGIC, head, "row-file")


def read_header(page: bytes | np.ndarray, magic: bytes, where: str, what: str) -> dict[str, Any]:
    """The JSON object of a header page written by :func:`make_header` (``CorruptDataError``)."""
    page = bytes(np.asarray(page, dtype=np.uint8).reshape(-1)[:PAGE_SIZE]) if isinstance(page, np.ndarray) else page
    if page[: len(magic)] != magic:
        raise CorruptDataError(f"{where}: bad magic in the header page: not a tierstore {what}")
    n = int.from_bytes(page[len(magic) : len(magic) + 4], "little")
    start = len(magic) + 4
    try:
        if start + n > PAGE_SIZE:
            raise ValueError(f"length {n} exceeds the page")
        head = json.loads(page[start : start + n])
        if not isinstance(head, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{where}: unreadable {what} header ({e})") from None
    return head


def check_build(head: dict[str, Any], build_id: str | None, where: str) -> None:
    """``StoreChangedError`` unless the file's header carries ``build_id`` (None: no check)."""
    if build_id is not None and head.get("build_id") != build_id:
        raise StoreChangedError(
            errno.ESTALE, f"this file belongs to build {head.get('build_id')!r}, the manifest to build {build_id!r}: "
            "files of two builds; open the store again, and if it persists rebuild it (`tierstore build --force`)",
            where)


def check_header_page(page: bytes | np.ndarray, info: TableInfo, where: str, build_id: str | None = None) -> None:
    """Compare a row file's header page with the manifest's description of the table.

    The header records name, rows, dim, dtype and row_stride at build time; a manifest
    edited afterwards (a flipped bit of ``dim`` re-slices every row) disagrees with it.
    Raises ``CorruptDataError`` naming the first field that differs. ``build_id`` (the
    manifest's, version 3+): the header must carry it (``StoreChangedError``, checked first)
    and say whether the rows are hot-ordered as the manifest does.
    """
    head = read_header(page, ROWS_MAGIC, where, "row file")
    check_build(head, build_id, where)
    want = {key: getattr(info, key) for key in ("name", "rows", "dim", "dtype", "row_stride")}
    if build_id is not None:
        want["ordered"] = info.order_file is not None
    want["quant"] = info.quant.to_json() if info.quant is not None else None
    for key, value in want.items():
        if head.get(key) != value:
            raise CorruptDataError(
                f"{where}: the row file says {key}={head.get(key)!r} but the manifest says "
                f"{key}={value!r} for table {info.name!r}: the manifest does not describe this "
                "file; rebuild the store")
