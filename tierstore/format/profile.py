"""Per-table row access-count profiles, kept in the store for hot-set placement.

A profile counts how often each row of a table was read on real token streams
(``tierstore profile --save-profile``). The store ranks rows by it: the hottest fill the
device tier, the next the host tier, and the ``default`` policy keeps a ranked core.

On disk, per table, in ``STORE/profiles/``:

* ``<table>.npy.zst``: the counts as a zstd-compressed ``.npy`` (int32 when the largest
  count fits, else int64; zero runs of the cold tail compress to almost nothing);
* ``<table>.json``: ``{"format": "tierstore-profile", "version": 1, "table", "rows",
  "dtype", "total", "nonzero", "source", ...}`` (written last, so a present JSON means a
  complete profile).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np

from ..errors import CorruptDataError, IdTypeError, TierStoreError
from ..files import atomic_write, check_versioned, is_json_int, os_error, read_json
from ..ids import as_row_ids

__all__ = ["PROFILE_FORMAT", "profile_paths", "count_rows", "hot_rows", "save_profile", "load_profile",
           "profile_info", "has_profile", "zipf_fit"]

PROFILE_FORMAT = "tierstore-profile"
PROFILE_VERSION = 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def profile_paths(store: str | Path, table: str) -> tuple[Path, Path]:
    """(counts file, metadata file) of ``table``'s profile in a store directory."""
    if not table or table in (".", ".."):
        raise TierStoreError(f"table name {table!r} cannot name a profile file")
    stem = _SAFE.sub("_", table)
    d = Path(store) / "profiles"
    return d / f"{stem}.npy.zst", d / f"{stem}.json"


def count_rows(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Access count per row (int64, len ``n_rows``) of a trace of row ids. Ids are checked
    by the one id validator (``IdTypeError``, ``InvalidIdError``)."""
    flat, _ = as_row_ids(rows, n_rows, where="the trace", copy=False)
    return np.bincount(flat, minlength=n_rows).astype(np.int64)


_EMPTY = np.empty(0, dtype=np.int64)


def hot_rows(profile: np.ndarray | None, k: int, *, fill: bool = False) -> np.ndarray:
    """The ``k`` hottest rows of a profile, hottest first: the one ranking of rows by a profile.

    The rule, everywhere a profile places rows (the static and default policies' hot sets,
    the shared host tier's rows, a hot-ordered build): more accesses first; equal counts in
    ascending row id, so every process, run and machine picks the same rows. Rows never
    accessed (count 0) are not hot: they are left out, so a policy does not pin rows the
    profile knows nothing about. ``fill=True`` is for callers that must place exactly ``k``
    rows (a tier of fixed size, a full permutation of the table): the never-accessed rows
    then follow the hot ones, in ascending row id. Returns int64 row ids (at most ``k``).

    Cost: one partition over the accessed rows plus a sort of the ``k`` chosen (a full
    argsort only when ``k`` covers them all).
    """
    if profile is None or k <= 0:
        return _EMPTY
    counts = np.asarray(profile)
    if counts.dtype.kind == "u":  # -count of an unsigned count would wrap
        counts = counts.astype(np.int64)
    nz = np.flatnonzero(counts > 0)
    if nz.size > k:
        c = counts[nz]
        thresh = c[np.argpartition(-c, k - 1)[k - 1]]  # the k-th largest count
        above = nz[c > thresh]
        tied = nz[c == thresh][: k - above.size]  # the lowest ids among the tied
        nz = np.concatenate([above, tied])
    top = nz[np.lexsort((nz, -counts[nz]))]
    if fill and top.size < k:
        cold = np.flatnonzero(counts <= 0)[: k - top.size]
        top = np.concatenate([top, cold])
    return top.astype(np.int64, copy=False)


def save_profile(store: str | Path, table: str, counts: np.ndarray, *,
                 meta: dict | None = None, level: int = 3) -> Path:
    """Write ``counts`` (one non-negative integer per row) as ``table``'s profile; returns
    the counts file. Replaces an existing profile atomically (file by file)."""
    import zstandard

    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise IdTypeError(f"a profile is a 1-D integer array; got {counts.dtype} {counts.shape}")
    if counts.size and counts.min() < 0:
        raise TierStoreError("profile counts must be non-negative")
    dtype = np.int32 if (counts.size == 0 or counts.max() < 2**31) else np.int64
    data, meta_path = profile_paths(store, table)
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, "creating the profiles directory", data.parent) from e
    buf = io.BytesIO()
    np.save(buf, counts.astype(dtype, copy=False), allow_pickle=False)
    # write_checksum: zstd's frame checksum catches a damaged counts file on load
    payload = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True).compress(buf.getvalue())
    info = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "table": table,
            "rows": int(counts.size), "dtype": np.dtype(dtype).name,
            "total": int(counts.sum()), "nonzero": int(np.count_nonzero(counts)),
            **(meta or {})}
    atomic_write(data, payload)
    atomic_write(meta_path, json.dumps(info, indent=1).encode())  # last: its presence means complete
    return data


def has_profile(store: str | Path, table: str) -> bool:
    return profile_paths(store, table)[1].is_file()


def profile_info(store: str | Path, table: str) -> dict:
    """The metadata of ``table``'s profile (format-checked); raises if there is none."""
    _, meta_path = profile_paths(store, table)
    if not meta_path.is_file():
        raise TierStoreError(
            f"no profile for table {table!r} in {str(store)!r}; record one with "
            "`tierstore profile --trace T --store S --save-profile`")
    info = check_versioned(read_json(meta_path, what="profile metadata"), fmt=PROFILE_FORMAT,
                           version=PROFILE_VERSION, where=str(meta_path), fix="record the profile again")
    for key in ("rows", "total", "nonzero"):
        if not is_json_int(info.get(key)) or info[key] < 0:
            raise CorruptDataError(f"profile metadata {str(meta_path)!r} has {key}={info.get(key)!r}")
    return info


def load_profile(store: str | Path, table: str, *, n_rows: int | None = None,
                 missing_ok: bool = True) -> np.ndarray | None:
    """``table``'s access counts as int64, or None when the store has no profile for it
    (``missing_ok=False`` raises instead). ``n_rows`` checks the length. A damaged or
    mismatched profile raises: silently placing rows by garbage would be worse."""
    import zstandard

    data, meta_path = profile_paths(store, table)
    if not meta_path.is_file():
        if missing_ok:
            return None
        profile_info(store, table)  # raises with the fix
    info = profile_info(store, table)
    try:
        raw = zstandard.ZstdDecompressor().decompress(data.read_bytes(), max_output_size=1 << 38)
        counts = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # missing file, zstd or npy errors: the profile is damaged either way
        raise CorruptDataError(f"profile counts {str(data)!r} are unreadable: {e}") from e
    if not isinstance(counts, np.ndarray) or counts.shape != (info["rows"],) or counts.dtype.kind not in "iu":
        raise CorruptDataError(f"profile {str(data)!r} holds {getattr(counts, 'dtype', type(counts))} "
                               f"{getattr(counts, 'shape', '')}, metadata says {info['rows']} rows")
    if counts.size and counts.min() < 0 or int(counts.sum()) != info["total"] \
            or int(np.count_nonzero(counts)) != info["nonzero"]:
        raise CorruptDataError(f"profile {str(data)!r} does not match its metadata (total, nonzero): "
                               "damaged; record the profile again")
    if n_rows is not None and counts.size != n_rows:
        raise TierStoreError(f"profile of {table!r} has {counts.size} rows, the table {n_rows}: "
                             "it was recorded for another table; record it again")
    return counts.astype(np.int64)


def zipf_fit(counts: np.ndarray, *, head: float = 0.5) -> tuple[float, np.ndarray]:
    """Zipf exponent s of a rank-frequency curve (count ~ rank^-s), and the sorted counts.

    Least-squares line through log(count) vs log(rank) over ranks 1..head*n_nonzero (the
    tail of singletons is flat and would dominate a fit over every rank).
    """
    c = np.sort(np.asarray(counts)[np.asarray(counts) > 0])[::-1].astype(np.float64)
    if c.size < 3:
        return 0.0, c
    n = max(3, int(head * c.size))
    x = np.log(np.arange(1, n + 1))
    y = np.log(c[:n])
    slope = np.polyfit(x, y, 1)[0]
    return float(-slope), c
