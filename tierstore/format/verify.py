"""Recompute every page checksum of a store and report the first mismatches."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import CorruptDataError, StoreChangedError
from ..files import os_error, read_full
from .order import DenseOrder, load_order
from .spec import PAGE_SIZE, TableInfo, check_header_page, load_checksums, page_checksums, read_manifest

__all__ = ["Mismatch", "VerifyReport", "verify_store"]

_CHUNK_PAGES = 8192  # 32 MiB per read


@dataclass(frozen=True)
class Mismatch:
    table: str
    page: int  # page (checksum block) number in the row file
    offset: int  # byte offset of that page in the row file
    first_row: int  # first row whose bytes lie in the page (-1 for the header page)
    detail: str


@dataclass
class VerifyReport:
    tables: int = 0
    pages: int = 0
    bytes: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _first_row(info: TableInfo, page: int) -> int:
    return -1 if page == 0 else (page - 1) * PAGE_SIZE // info.row_stride


def verify_store(store: str | os.PathLike[str], *, progress: bool = True, max_report: int = 20) -> VerifyReport:
    """Read every row file of ``store`` sequentially and compare each page with its checksum;
    check each order file's checksum and that it is a permutation; and (version 3+) that
    every file carries the manifest's build id."""
    root = Path(store)
    manifest = read_manifest(root)
    build_id = manifest.pinned_build
    report = VerifyReport()
    total = sum(i.file_bytes for i in manifest.tables.values())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not progress) as bar:
        for info in manifest.tables.values():
            report.tables += 1
            path = root / info.file
            try:
                sums = load_checksums(root, info)
            except CorruptDataError as e:
                report.mismatches.append(Mismatch(info.name, -1, -1, -1, str(e)))
                continue
            if info.order_file:
                try:
                    order = load_order(root, info, build_id)  # a head form's hot ids are checked distinct and in range
                    pos = order.pos if isinstance(order, DenseOrder) else None
                    is_perm = pos is None or info.rows == 0 or (
                        int(pos.min()) >= 0 and int(pos.max()) < info.rows
                        and bool((np.bincount(pos, minlength=info.rows) == 1).all()))
                except (CorruptDataError, StoreChangedError) as e:  # damaged, or another build's file
                    is_perm, why = False, str(e)
                else:
                    why = f"{root / info.order_file}: row order is not a permutation of 0..{info.rows - 1}"
                if not is_perm:
                    report.mismatches.append(Mismatch(info.name, -1, -1, -1, why))
            size = path.stat().st_size if path.exists() else -1
            if size != info.file_bytes:
                report.mismatches.append(Mismatch(
                    info.name, size // PAGE_SIZE if size > 0 else 0, max(size, 0), -1,
                    f"{path}: file has {size} bytes, manifest says {info.file_bytes} (truncated or replaced)"))
                continue
            buf = np.empty((_CHUNK_PAGES, PAGE_SIZE), dtype=np.uint8)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise os_error(e, "opening a row file to verify", path) from e
            try:
                for p0 in range(0, info.n_pages, _CHUNK_PAGES):
                    n = min(_CHUNK_PAGES, info.n_pages - p0)
                    try:
                        got = read_full(fd, memoryview(buf[:n].reshape(-1)), p0 * PAGE_SIZE, path)
                    except OSError as e:
                        raise os_error(e, f"reading page {p0} to verify", path) from e
                    if got != n * PAGE_SIZE:
                        raise CorruptDataError(f"{path}: file ended inside page {p0 + got // PAGE_SIZE}")
                    if p0 == 0:
                        try:
                            check_header_page(buf[0], info, str(path), build_id)
                        except (CorruptDataError, StoreChangedError) as e:
                            report.mismatches.append(Mismatch(info.name, 0, 0, -1, str(e)))
                    bad = np.flatnonzero(page_checksums(buf[:n]) != sums[p0 : p0 + n])
                    for b in bad[: max(0, max_report - len(report.mismatches))]:
                        page = p0 + int(b)
                        report.mismatches.append(Mismatch(
                            info.name, page, page * PAGE_SIZE, _first_row(info, page),
                            "page checksum mismatch"))
                    report.pages += n
                    report.bytes += n * PAGE_SIZE
                    bar.update(n * PAGE_SIZE)
            finally:
                os.close(fd)
            del sums
    return report
