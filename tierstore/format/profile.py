"""Per-table row access-count profiles, kept in the store for hot-set placement.

A profile counts how often each row of a table was read on real token streams
(``tierstore profile --save-profile``). The store ranks rows by it: the hottest fill the
device tier, the next the host tier, and the ``default`` policy keeps a ranked core.

On disk, per table, in ``STORE/profiles/``:

* ``<table>.npy.zst``: zstd-compressed. Version 2 (written now): a ``.npy`` of int64
  ``(2, nonzero)``, the rows read (ascending) over their counts (> 0), then the table's
  rows (int64 LE) and a SHA-256 of all that: the file and a load of it follow the rows a
  trace saw, never the table's rows. The file checks itself (a changed row id keeps every
  total), so a save torn between the two files (new counts, old JSON) still loads the new
  counts whole. Version 1 (still read): a ``.npy`` of one count per table row (int32 when
  the largest count fits, else int64), checked against the JSON's total and nonzero.
* ``<table>.json``: ``{"format": "tierstore-profile", "version": 2, "table", "rows",
  "dtype", "total", "nonzero", "source", "profile_id", ...}`` (written last, so a present
  JSON means a complete profile; ``profile_id``, random per save, ties a hot-set snapshot
  to the profile it was made of).

A store keeps only the hottest rows its tiers can hold (``load_profile(..., top=k)``, a
:class:`TopProfile`); a version-1 file is then streamed a chunk at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from pathlib import Path

import numpy as np

from ..errors import CorruptDataError, IdTypeError, TierStoreError
from ..files import atomic_write, check_versioned, is_json_int, os_error, read_json
from ..ids import as_row_ids
from ..ranking import Profile, TopProfile, as_profile, hot_rows  # the one ranking (re-exported here)

_EMPTY = np.empty(0, dtype=np.int64)

__all__ = ["PROFILE_FORMAT", "Profile", "TopProfile", "as_profile", "profile_paths", "count_rows", "hot_rows",
           "save_profile", "load_profile", "profile_info", "has_profile", "zipf_fit"]

PROFILE_FORMAT = "tierstore-profile"
PROFILE_VERSION = 2  # sparse; 1 (a count per table row) is still read
_VERSIONS = (1, 2)
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def profile_paths(store: str | Path, table: str) -> tuple[Path, Path]:
    """(counts file, metadata file) of ``table``'s profile in a store directory."""
    if not table or table in (".", ".."):
        raise TierStoreError(f"table name {table!r} cannot name a profile file")
    stem = _SAFE.sub("_", table)
    d = Path(store) / "profiles"
    return d / f"{stem}.npy.zst", d / f"{stem}.json"


def count_rows(rows: np.ndarray, n_rows: int, *, sparse: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Access count per row (int64, len ``n_rows``) of a trace of row ids; ``sparse``: the
    pair (rows read, ascending; their counts), sized by the trace, not the table. Ids are
    checked by the one id validator (``IdTypeError``, ``InvalidIdError``)."""
    flat, _ = as_row_ids(rows, n_rows, where="the trace", copy=False)
    if sparse:
        seen, n = np.unique(flat, return_counts=True)
        return seen.astype(np.int64), n.astype(np.int64)
    return np.bincount(flat, minlength=n_rows).astype(np.int64)


def save_profile(store: str | Path, table: str, counts: np.ndarray | tuple[np.ndarray, np.ndarray], *,
                 n_rows: int | None = None, meta: dict | None = None, level: int = 3) -> Path:
    """Write ``table``'s profile: ``counts``, one non-negative integer per row, or a sparse
    ``(rows, counts)`` pair of a table of ``n_rows`` rows (each row once). Returns the
    counts file. Replaces an existing profile atomically (file by file)."""
    import zstandard

    if isinstance(counts, tuple):
        if n_rows is None:
            raise TierStoreError("a sparse (rows, counts) profile needs n_rows=, the table's rows")
        top = TopProfile.from_pairs(*counts, int(n_rows))
        rows, vals = top.rows, top.counts
    else:
        dense = np.asarray(counts)
        if dense.ndim != 1 or dense.dtype.kind not in "iu":
            raise IdTypeError(f"a profile is a 1-D integer array; got {dense.dtype} {dense.shape}")
        if dense.size and dense.min() < 0:
            raise TierStoreError("profile counts must be non-negative")
        if n_rows is not None and n_rows != dense.size:
            raise TierStoreError(f"n_rows={n_rows} but the profile has {dense.size} counts")
        n_rows = dense.size
        rows = np.flatnonzero(dense).astype(np.int64)
        vals = dense[rows].astype(np.int64)
    order = np.argsort(rows)
    pairs = np.stack([rows[order], vals[order]]) if rows.size else np.zeros((2, 0), np.int64)
    data, meta_path = profile_paths(store, table)
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, "creating the profiles directory", data.parent) from e
    buf = io.BytesIO()
    np.save(buf, pairs, allow_pickle=False)
    body = buf.getvalue() + int(n_rows).to_bytes(8, "little")
    # write_checksum: zstd's frame checksum catches a damaged counts file on load
    payload = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True).compress(
        body + hashlib.sha256(body).digest())
    info = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "table": table,
            "rows": int(n_rows), "dtype": "int64", "layout": "sparse",
            "total": int(pairs[1].sum()), "nonzero": int(pairs.shape[1]), **(meta or {}),
            # this save's identity: a hot-set snapshot records it, and open takes the ranking
            # from the snapshot (its ids prefix) only while the profile is the one it was made of
            "profile_id": uuid.uuid4().hex}
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
                           version=_VERSIONS, where=str(meta_path), fix="record the profile again")
    for key in ("rows", "total", "nonzero"):
        if not is_json_int(info.get(key)) or info[key] < 0:
            raise CorruptDataError(f"profile metadata {str(meta_path)!r} has {key}={info.get(key)!r}")
    return info


def load_profile(store: str | Path, table: str, *, n_rows: int | None = None, missing_ok: bool = True,
                 top: int | None = None) -> np.ndarray | TopProfile | None:
    """``table``'s access counts as int64, or None when the store has no profile for it
    (``missing_ok=False`` raises instead). ``n_rows`` checks the length. A damaged or
    mismatched profile raises: silently placing rows by garbage would be worse.

    ``top=k``: only the ``k`` hottest rows, as a :class:`TopProfile` (what a store's
    policies and tiers use: k is the largest tier's capacity). The counts are then streamed
    out of the file a chunk at a time: memory O(k + chunk), never a count per table row."""
    data, meta_path = profile_paths(store, table)
    if not meta_path.is_file():
        if missing_ok:
            return None
        profile_info(store, table)  # raises with the fix
    info = profile_info(store, table)
    if n_rows is not None and info["rows"] != n_rows:
        raise TierStoreError(f"profile of {table!r} has {info['rows']} rows, the table {n_rows}: "
                             "it was recorded for another table; record it again")
    if info["version"] >= 2:
        rows, counts = _load_sparse(data, info)
        if top is not None:
            k = max(0, int(top))
            rows_k, counts_k = _keep_top(rows, counts, k)  # then sort only those
            order = np.argsort(-counts_k, kind="stable")  # rows_k ascend: ties stay by id (lexsort: ~1.4x slower)
            return TopProfile(rows_k[order], counts_k[order], info["rows"], complete=rows.size <= k)
        dense = np.zeros(info["rows"], np.int64)
        dense[rows] = counts
        return dense
    if top is not None:
        return _load_top(data, info, int(top))
    import zstandard

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
    return counts.astype(np.int64)


def _load_sparse(data: Path, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """A version-2 file's (rows, counts), checked by its own SHA-256 (not by the JSON's
    totals, which a save torn between the two files leaves stale). O(rows read)."""
    import zstandard

    try:
        raw = zstandard.ZstdDecompressor().decompress(data.read_bytes(), max_output_size=1 << 38)
    except Exception as e:  # missing file, zstd errors: the profile is damaged either way
        raise CorruptDataError(f"profile counts {str(data)!r} are unreadable: {e}") from e
    body, digest = memoryview(raw)[:-32], raw[-32:]  # views: a 4M-row profile is 64 MB, each copy costs
    if len(raw) < 40 or hashlib.sha256(body).digest() != digest:
        raise CorruptDataError(f"profile counts {str(data)!r} do not match their checksum: damaged; "
                               "record the profile again")
    n_rows = int.from_bytes(body[-8:], "little")
    try:
        pairs = _npy_view(body[:-8])
    except Exception as e:
        raise CorruptDataError(f"profile counts {str(data)!r} are unreadable: {e}") from e
    if n_rows != info["rows"]:
        raise CorruptDataError(f"profile {str(data)!r} is of a table of {n_rows} rows, its metadata says "
                               f"{info['rows']}: record the profile again")
    if not isinstance(pairs, np.ndarray) or pairs.ndim != 2 or pairs.shape[0] != 2 or pairs.dtype != np.int64:
        raise CorruptDataError(f"profile {str(data)!r} holds {getattr(pairs, 'dtype', type(pairs))} "
                               f"{getattr(pairs, 'shape', '')}, not (2, n) int64")
    rows, counts = pairs[0], pairs[1]
    if rows.size and (rows[0] < 0 or rows[-1] >= n_rows or (np.diff(rows) <= 0).any() or counts.min() <= 0):
        raise CorruptDataError(f"profile {str(data)!r} holds rows out of order or range, or counts <= 0: "
                               "damaged; record the profile again")
    return rows, counts


def _npy_view(buf: memoryview) -> np.ndarray:
    """The array a ``.npy`` image in ``buf`` holds, as a read-only view of ``buf`` (np.load
    through a BytesIO copies the data twice). Raises ``ValueError`` on a malformed image."""
    f = io.BytesIO(buf[: min(len(buf), 1 << 16)])  # the header: magic, then a short dict
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject or fortran:
        raise ValueError(f"not a C-order plain array: {dtype}, fortran={fortran}")
    count = int(np.prod(shape, dtype=np.int64))
    if f.tell() + count * dtype.itemsize != len(buf):
        raise ValueError(f"{len(buf) - f.tell()} data bytes for shape {shape} of {dtype}")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=f.tell()).reshape(shape)


_CHUNK = 1 << 20  # counts decompressed per step of a streamed load (8 MiB of int64)


def _read_exact(f, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _keep_top(rows: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k hottest of (rows, counts) (rows ascending), kept in row order: ties go to the
    lowest ids, as in ``hot_rows``."""
    if rows.size <= k:
        return rows, counts
    if k <= 0:
        return _EMPTY, _EMPTY
    thresh = counts[np.argpartition(-counts, k - 1)[k - 1]]
    above = counts > thresh
    tied = counts == thresh
    tied &= np.cumsum(tied) <= k - int(np.count_nonzero(above))
    keep = above | tied
    return rows[keep], counts[keep]


def _load_top(data: Path, info: dict, k: int) -> TopProfile:
    """The ``k`` hottest rows of a saved profile, streamed: chunk by chunk, each chunk's
    nonzero counts merged into the running top k (rows ascending throughout). Checks the
    same things as a whole load: the array's header, its length, its total and nonzero."""
    import zstandard

    n = info["rows"]
    rows_k, counts_k = _EMPTY, _EMPTY
    total = nonzero = 0
    chunk = max(_CHUNK, k)  # O(k + chunk) per step, O(n) in all
    try:
        with open(data, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise CorruptDataError(f"profile counts {str(data)!r} are a .npy of version {version}")
            shape, fortran, dtype = read_header(f)
            if len(shape) != 1 or shape[0] != n or fortran or dtype.kind not in "iu":
                raise CorruptDataError(f"profile {str(data)!r} holds {dtype} {shape}, metadata says {n} rows")
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                buf = _read_exact(f, m * dtype.itemsize)
                if len(buf) != m * dtype.itemsize:
                    raise CorruptDataError(f"profile counts {str(data)!r} end early: damaged")
                c = np.frombuffer(buf, dtype=dtype).astype(np.int64)
                if c.size and c.min() < 0:
                    raise CorruptDataError(f"profile {str(data)!r} holds negative counts: damaged")
                total += int(c.sum())
                nz = np.flatnonzero(c)
                nonzero += nz.size
                rows_k, counts_k = _keep_top(np.concatenate([rows_k, nz + start]),
                                             np.concatenate([counts_k, c[nz]]), k)
            if f.read(1):
                raise CorruptDataError(f"profile counts {str(data)!r} hold data past the array: damaged")
    except CorruptDataError:
        raise
    except Exception as e:  # missing file, zstd (checksum) or npy errors: damaged either way
        raise CorruptDataError(f"profile counts {str(data)!r} are unreadable: {e}") from e
    if total != info["total"] or nonzero != info["nonzero"]:
        raise CorruptDataError(f"profile {str(data)!r} does not match its metadata (total, nonzero): "
                               "damaged; record the profile again")
    order = np.lexsort((rows_k, -counts_k))
    return TopProfile(rows_k[order], counts_k[order], n, complete=nonzero <= k)


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
