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
:class:`TopProfile`); the file, of either version, is then streamed a chunk at a time:
memory O(k + chunk), whatever the profile's size.
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
        if top is not None:
            return _load_sparse_top(data, info, max(0, int(top)))
        rows, counts = _load_sparse(data, info)
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


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the ``.npy`` header at ``f``'s position (a file-like
    object); ``ValueError`` for a version this reader does not know."""
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"a .npy of version {version}")
    return read_header(f)


def _npy_view(buf: memoryview) -> np.ndarray:
    """The array a ``.npy`` image in ``buf`` holds, as a read-only view of ``buf`` (np.load
    through a BytesIO copies the data twice). Raises ``ValueError`` on a malformed image."""
    f = io.BytesIO(buf[: min(len(buf), 1 << 16)])  # the header: magic, then a short dict
    shape, fortran, dtype = _npy_header(f)
    if dtype.hasobject or fortran:
        raise ValueError(f"not a C-order plain array: {dtype}, fortran={fortran}")
    count = int(np.prod(shape, dtype=np.int64))
    if f.tell() + count * dtype.itemsize != len(buf):
        raise ValueError(f"{len(buf) - f.tell()} data bytes for shape {shape} of {dtype}")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=f.tell()).reshape(shape)


_CHUNK = 1 << 20  # counts decompressed per step of a streamed version-1 load (8 MiB of int64)
# (row, count) pairs per step of a streamed version-2 load: 1 MiB of rows or counts, and a
# step's temporaries (~60 B a pair at most) stay ~8 MiB
_PAIRS = 1 << 17


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
    thresh = np.partition(counts, counts.size - k)[counts.size - k]  # the k-th largest
    keep = counts > thresh
    keep[np.flatnonzero(counts == thresh)[: k - int(np.count_nonzero(keep))]] = True
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
            try:
                shape, fortran, dtype = _npy_header(f)
            except ValueError as e:
                raise CorruptDataError(f"profile counts {str(data)!r} are unreadable: {e}") from e
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


class _Stream:
    """A zstd stream reader read whole: ``read(n)`` (for np.lib.format's header parsers)
    and ``fill(view)`` (into a reused buffer) return short only at the end of the stream;
    with ``sha``, everything handed out is hashed in order."""

    def __init__(self, f, sha=None):
        self.f, self.sha = f, sha

    def read(self, n: int) -> bytes:
        b = _read_exact(self.f, n)
        if self.sha is not None:
            self.sha.update(b)
        return b

    def fill(self, view: memoryview) -> int:
        got = 0
        while got < len(view):
            r = self.f.readinto(view[got:])
            if not r:
                break
            got += r
        if self.sha is not None:
            self.sha.update(view[:got])
        return got


def _load_sparse_top(data: Path, info: dict, k: int) -> TopProfile:
    """The ``k`` hottest rows of a version-2 file, streamed: memory O(k + chunk), whatever
    the profile's size (the whole-file load is 16 B per row read, 640 MB at 40M rows, at
    every open). Same result and same checks as ``_load_sparse`` then ``_keep_top``.

    Two passes over one open file (a save that replaces it meanwhile is not seen). The
    first hashes the whole body (its SHA-256), checks the rows (strictly ascending, in
    range), the counts (> 0) and the table's rows, and keeps the positions of the k
    hottest pairs: a running top k, ties to the lower position, which is the lower row id
    since the rows ascend. The second decompresses the rows again, only as far as the last
    kept position, and picks out their ids."""
    import zstandard

    n_rows, where = info["rows"], str(data)
    buf = bytearray(_PAIRS * 8)  # one reused chunk buffer
    try:
        with open(data, "rb") as fh:
            with zstandard.ZstdDecompressor().stream_reader(fh, closefd=False) as raw:
                f = _Stream(raw, hashlib.sha256())
                n, head = _sparse_header(f, where)
                bad = _check_rows(f, buf, n, n_rows, where)
                pos_k, counts_k, bad_counts = _top_positions(f, buf, n, k, where)
                tail = f.read(8)
                digest = _read_exact(raw, 32)
                if len(tail) != 8 or digest != f.sha.digest() or raw.read(1):
                    raise CorruptDataError(f"profile counts {where!r} do not match their checksum: damaged; "
                                           "record the profile again")
            if int.from_bytes(tail, "little") != n_rows:
                raise CorruptDataError(f"profile {where!r} is of a table of {int.from_bytes(tail, 'little')} rows, "
                                       f"its metadata says {n_rows}: record the profile again")
            if bad or bad_counts:
                raise CorruptDataError(f"profile {where!r} holds rows out of order or range, or counts <= 0: "
                                       "damaged; record the profile again")
            fh.seek(0)
            with zstandard.ZstdDecompressor().stream_reader(fh, closefd=False) as raw:
                rows_k = _pick_rows(_Stream(raw), buf, head, n, pos_k, where)
    except CorruptDataError:
        raise
    except Exception as e:  # missing file, zstd (frame checksum) or npy errors: damaged either way
        raise CorruptDataError(f"profile counts {where!r} are unreadable: {e}") from e
    order = np.argsort(-counts_k, kind="stable")  # rows_k ascend: ties stay by id (lexsort: ~1.4x slower)
    return TopProfile(rows_k[order], counts_k[order], n_rows, complete=n <= k)


def _ended(where: str) -> CorruptDataError:
    return CorruptDataError(f"profile counts {where!r} end early: damaged; record the profile again")


def _sparse_header(f: _Stream, where: str) -> tuple[int, int]:
    """(pairs n, header bytes) of a version-2 body's ``.npy`` header, a (2, n) int64."""
    try:
        shape, fortran, dtype = _npy_header(f)
    except ValueError as e:
        raise CorruptDataError(f"profile counts {where!r} are unreadable: {e}") from e
    if len(shape) != 2 or shape[0] != 2 or fortran or dtype != np.int64:
        raise CorruptDataError(f"profile {where!r} holds {dtype} {shape}, not (2, n) int64")
    return int(shape[1]), f.f.tell()


def _chunks(f: _Stream, buf: bytearray, n: int, where: str):
    """(start, int64 view of the next <= _PAIRS values) over n values of the stream."""
    for start in range(0, n, _PAIRS):
        m = min(_PAIRS, n - start)
        if f.fill(memoryview(buf)[: m * 8]) != m * 8:
            raise _ended(where)
        yield start, np.frombuffer(buf, np.int64, count=m)


def _check_rows(f: _Stream, buf: bytearray, n: int, n_rows: int, where: str) -> bool:
    """Reads the rows region; True when the rows are not strictly ascending in [0, n_rows)."""
    prev, bad = -1, False
    for _, r in _chunks(f, buf, n, where):
        bad = bad or bool(r[0] <= prev or r[-1] >= n_rows or (r[1:] <= r[:-1]).any())
        prev = int(r[-1])
    return bad


def _top_positions(f: _Stream, buf: bytearray, n: int, k: int, where: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Reads the counts region: (positions ascending, counts) of the k hottest, and
    whether a count is <= 0. Candidates pile up until they pass 2k (k + a chunk at least),
    then merge into the top k; after that only counts above the k-th enter (an equal one
    loses the tie: its position is higher). O(k + chunk) memory; no merge when k >= n."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    held, floor, bad = 0, None, False
    for start, c in _chunks(f, buf, n, where):
        bad = bad or bool(c.min() <= 0)
        if k <= 0:
            continue
        cand = np.flatnonzero(c > floor) if floor is not None else np.arange(c.size)
        if not cand.size:
            continue
        parts.append((cand + start, c[cand]))
        held += cand.size
        if held > k + max(k, _PAIRS):  # merge only after k more: O(n / k) merges, not one a chunk
            pos_k, counts_k = _keep_top(np.concatenate([p for p, _ in parts]),
                                        np.concatenate([v for _, v in parts]), k)
            parts, held, floor = [(pos_k, counts_k)], k, counts_k.min()
    if not parts:
        return _EMPTY, _EMPTY, bad
    pos_k, counts_k = np.concatenate([p for p, _ in parts]), np.concatenate([v for _, v in parts])
    return (*_keep_top(pos_k, counts_k, k), bad)


def _pick_rows(f: _Stream, buf: bytearray, head: int, n: int, pos: np.ndarray, where: str) -> np.ndarray:
    """The row ids at ``pos`` (ascending) of the rows region, read as far as the last."""
    out = np.empty(pos.size, np.int64)
    if not pos.size:
        return out
    if len(f.read(head)) != head:
        raise _ended(where)
    done = 0
    for start, r in _chunks(f, buf, n, where):
        end = int(np.searchsorted(pos, start + r.size))
        out[done:end] = r[pos[done:end] - start]
        done = end
        if done == pos.size:
            break
    return out


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
