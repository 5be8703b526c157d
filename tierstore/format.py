"""On-disk store format, version 1 (documented in docs/format.md).

A store is a directory::

    STORE/manifest.json          format name + version, one entry per table, attachments
    STORE/tables/tNNNN.rows      header page + rows at a fixed stride, padded to whole 4 KiB pages
    STORE/tables/tNNNN.sum       one uint64 checksum per 4 KiB page of the .rows file
    STORE/attachments/...        files copied in at build time (model config, tokenizer, ...)
    STORE/profiles/...           access-frequency profiles (written by `tierstore profile --save-profile`)

Rows start at byte ``PAGE_SIZE`` (after the header page), so every read the disk tier issues
is page-aligned and O_DIRECT / GPUDirect Storage can serve it. Row ``r`` lives at byte
``PAGE_SIZE + r * row_stride``; ``row_stride`` is the row's byte size rounded up to 16.

Checksums ("mulsum64-v1"): page ``p`` viewed as 512 little-endian uint64 words ``w`` has
checksum ``sum(w[i] * K[i]) mod 2**64`` with fixed odd weights ``K``. Any change of a single
word changes the sum (an odd weight is invertible mod 2**64) and the position-dependent
weights catch swapped words. It is chosen over CRC32 because it vectorizes over a whole
batch of pages in numpy: the disk tier verifies every page it reads at memory speed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CorruptDataError, FormatVersionError, TierStoreError

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
    "read_manifest",
    "write_manifest",
    "ROWS_MAGIC",
]

FORMAT_NAME = "tierstore"
FORMAT_VERSION = 1
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
    # hotness-ordered layout: a .npy of int32/int64 giving each row's physical position in
    # the row file (hot rows first, sharing pages); None: row r is at position r
    order_file: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

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

    def to_json(self) -> str:
        doc = {
            "format": self.format,
            "version": self.version,
            "created": self.created,
            "checksum": self.checksum,
            "tables": [asdict(t) for t in self.tables.values()],
            "attachments": self.attachments,
        }
        return json.dumps(doc, indent=2) + "\n"


def read_manifest(store: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``STORE/manifest.json``."""
    path = Path(store) / MANIFEST
    if not Path(store).is_dir():
        raise TierStoreError(f"no store at {store!s}: not a directory (build one with `tierstore build`)")
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise TierStoreError(
            f"{store!s} is not a tierstore store: {MANIFEST} is missing "
            "(an interrupted build leaves no manifest; rerun `tierstore build`)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise FormatVersionError(f"{path}: format is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    if doc.get("version") != FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: store format version {doc.get('version')!r} is not supported by this tierstore "
            f"(reads version {FORMAT_VERSION}); rebuild the store or upgrade tierstore"
        )
    scheme = doc.get("checksum", {}).get("scheme")
    if scheme != CHECKSUM_SCHEME:
        raise FormatVersionError(f"{path}: checksum scheme {scheme!r} unknown (expected {CHECKSUM_SCHEME})")
    tables: dict[str, TableInfo] = {}
    try:
        for t in doc["tables"]:
            info = TableInfo(**t)
            if info.dtype not in DTYPES:
                raise FormatVersionError(f"{path}: table {info.name!r} has unknown dtype {info.dtype!r}")
            if info.file_bytes != TableInfo.expected_file_bytes(info.rows, info.row_stride):
                raise CorruptDataError(f"{path}: table {info.name!r} file_bytes inconsistent with rows/stride")
            tables[info.name] = info
    except (KeyError, TypeError) as e:
        raise CorruptDataError(f"{path}: malformed table entry ({e})") from None
    return Manifest(
        tables=tables,
        attachments=list(doc.get("attachments", [])),
        created=str(doc.get("created", "")),
        checksum=doc["checksum"],
    )


def write_manifest(store: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write the manifest durably (temp file, fsync, rename) inside ``store``."""
    path = Path(store) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _weights() -> np.ndarray:
    # splitmix64 of the word index, forced odd: fixed forever for scheme mulsum64-v1.
    x = np.arange(1, PAGE_SIZE // 8 + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return x | np.uint64(1)


_K = _weights()


def page_checksums(pages: np.ndarray) -> np.ndarray:
    """mulsum64-v1 checksum of each 4 KiB page: ``pages`` is uint8 (P, 4096) or a flat multiple."""
    words = np.ascontiguousarray(pages).reshape(-1, PAGE_SIZE // 8 * 8).view(np.uint64)
    # uint64 arithmetic wraps mod 2**64 in numpy array ops, which is what the scheme wants.
    return (words * _K).sum(axis=1, dtype=np.uint64)


def header_page(info: TableInfo) -> bytes:
    """The first page of a .rows file: magic, then the table's JSON description, zero padded."""
    meta = json.dumps(
        {"name": info.name, "rows": info.rows, "dim": info.dim, "dtype": info.dtype,
         "row_stride": info.row_stride, "version": FORMAT_VERSION}
    ).encode()
    body = ROWS_MAGIC + len(meta).to_bytes(4, "little") + meta
    if len(body) > PAGE_SIZE:
        raise TierStoreError(f"table name too long for the row-file header: {info.name[:80]!r}...")
    return body + b"\x00" * (PAGE_SIZE - len(body))
