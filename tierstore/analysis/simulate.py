"""Row-access traces and their replay through cache policies (``tierstore profile``).

A *trace* is the sequence of table rows a model reads, in the order a serving engine
issues them, cut into batches (one serving step each). ``tierstore trace`` writes one
per Engram table into a single zstd-compressed file (:func:`save_trace`); a plain
``.npy`` int64 array is accepted too (one table, no batch boundaries).

:func:`simulate` replays a trace through the store's own compiled walk
(tierstore.cache.walk) for each policy x capacity, plus ``opt`` (:mod:`tierstore.analysis.belady`).
Semantics are exact by default: a trace without batch boundaries replays one access at a
time, a trace with recorded batches replays exactly those batches under the store's rule
for repeats inside a lookup. ``min_batch`` > 1 merges steps (faster, approximate; never
the default). LRU without hints comes from one stack-distance pass for every capacity.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .belady import OptTrace
from .direct import DirectTrace, direct_index, usable
from ..cache import CacheIndex
from ..cache.lookup import Walker
from ..cache.layout import CACHED, NONE, RESIDENT
from ..errors import CorruptDataError, IdTypeError, TierStoreError
from ..files import atomic_write, check_versioned, is_json_int, os_error
from ..format.profile import Profile, as_profile
from ..ranking import ranks_after
from ..ids import as_row_ids
from ..cache import POLICIES

__all__ = [
    "TableTrace",
    "Trace",
    "SimResult",
    "save_trace",
    "load_trace",
    "batch_bounds",
    "replay",
    "replay_events",
    "simulate",
    "simulate_tiers",
    "TRACE_FORMAT",
]

TRACE_FORMAT = "tierstore-trace"
TRACE_VERSION = 1


@dataclass
class TableTrace:
    """Accesses of one table: row ids in order and the start of each batch (step)."""

    rows: np.ndarray  # int64 (n,)
    offsets: np.ndarray | None = None  # int64 (n_batches,), ascending, first 0; None = unknown
    n_rows: int | None = None  # rows of the table, when known (capacities as fractions of it)

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows)
        if rows.dtype.kind not in "iu":
            raise IdTypeError(f"trace rows have dtype {rows.dtype}; a trace holds integer row ids")
        self.rows = rows.reshape(-1).astype(np.int64, copy=False)
        if self.rows.size and self.rows.min() < 0:
            raise CorruptDataError("trace holds negative row ids")
        if self.offsets is not None:
            off = np.asarray(self.offsets, dtype=np.int64).reshape(-1)
            if off.size and (off[0] != 0 or np.any(np.diff(off) <= 0) or off[-1] >= max(1, self.rows.size)):
                raise CorruptDataError("trace batch offsets must start at 0 and increase within the trace")
            self.offsets = off


@dataclass
class Trace:
    """A trace file: one :class:`TableTrace` per table plus free-form metadata."""

    tables: dict[str, TableTrace]
    meta: dict = field(default_factory=dict)


def save_trace(path: str | Path, trace: Trace, *, level: int = 3) -> Path:
    """Write ``trace`` as zstd-compressed npz (row ids stored as int32 when they fit), atomically."""
    import zstandard

    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    tables_meta = {}
    for i, (name, t) in enumerate(trace.tables.items()):
        small = t.rows.size == 0 or t.rows.max() < 2**31
        arrays[f"rows{i}"] = t.rows.astype(np.int32 if small else np.int64)
        if t.offsets is not None:
            arrays[f"offsets{i}"] = t.offsets
        tables_meta[name] = {"index": i, "n_rows": t.n_rows, "lookups": int(t.rows.size),
                             "batches": None if t.offsets is None else int(t.offsets.size)}
    header = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "tables": tables_meta, "meta": trace.meta}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, "creating the trace's directory", path.parent) from e
    compressor = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
    atomic_write(path, compressor.compress(buf.getvalue()))
    return path


def _npy(raw: bytes, what: str) -> np.ndarray:
    """An integer array from .npy bytes; anything else is a CorruptDataError."""
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, EOFError, OSError... for damaged files
        raise CorruptDataError(f"{what} is not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise CorruptDataError(f"{what} holds {getattr(arr, 'dtype', type(arr).__name__)}, not integer row ids")
    return arr


def _opt_int(v: object) -> bool:
    return v is None or (is_json_int(v) and v > 0)


def load_trace(path: str | Path, only: str | None = None) -> Trace:
    """Read a trace written by :func:`save_trace`, or a ``.npy`` int array (table "trace").

    ``only``: read just that table's arrays when the trace has it (a V4.1 trace holds both
    Engram layers: half the reading and the memory); every table when it has not.
    A damaged or inconsistent file raises ``CorruptDataError`` (another version:
    ``FormatVersionError``); a trace whose ids exceed its table's recorded size is refused.
    """
    import zstandard

    path = Path(path)
    if not path.is_file():
        raise TierStoreError(f"trace file {str(path)!r} not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise os_error(e, "reading the trace", path) from e
    if raw[:6] == b"\x93NUMPY":
        rows = _npy(raw, repr(str(path)))
        return Trace({"trace": TableTrace(rows)}, {"source": str(path)})
    try:
        data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 36)
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        header = json.loads(bytes(npz["header"]).decode())
    except Exception as e:  # zstd, zip or JSON errors all mean the same to the caller
        raise CorruptDataError(
            f"{str(path)!r} is neither a .npy array nor a tierstore trace file ({e})") from e
    where = repr(str(path))
    check_versioned(header, fmt=TRACE_FORMAT, version=TRACE_VERSION, where=where, fix="re-run `tierstore trace`")
    if not isinstance(header.get("tables"), dict) or not isinstance(header.get("meta", {}), dict):
        raise CorruptDataError(f"{where}: trace header has no table list")
    tables = {}
    listed = header["tables"]
    if only is not None and only in listed:
        listed = {only: listed[only]}
    for name, m in listed.items():
        if not isinstance(m, dict) or not isinstance(m.get("index"), int) or not _opt_int(m.get("n_rows")):
            raise CorruptDataError(f"{where}: malformed entry for table {name!r} in the trace header")
        i = m["index"]
        try:
            rows = npz[f"rows{i}"]
            off = npz[f"offsets{i}"] if f"offsets{i}" in npz.files else None
        except Exception as e:  # missing member, bad CRC, damaged npy header
            raise CorruptDataError(f"{where}: table {name!r}: unreadable arrays ({e})") from None
        if rows.dtype.kind not in "iu" or (off is not None and off.dtype.kind not in "iu"):
            raise CorruptDataError(f"{where}: table {name!r}: row ids or offsets are not integers")
        t = TableTrace(rows.astype(np.int64), off, m.get("n_rows"))
        if t.n_rows is not None and t.rows.size and int(t.rows.max()) >= t.n_rows:
            raise CorruptDataError(f"{where}: table {name!r} has row id {int(t.rows.max())} >= its {t.n_rows} rows")
        if m.get("lookups") not in (None, t.rows.size):
            raise CorruptDataError(f"{where}: table {name!r} holds {t.rows.size} lookups, its header says {m['lookups']}")
        tables[name] = t
    return Trace(tables, header.get("meta", {}))


def batch_bounds(n: int, offsets: np.ndarray | None, min_batch: int = 1) -> np.ndarray:
    """Batch start positions plus ``n`` at the end. ``min_batch`` 1 (the default, exact): the
    recorded batches, or one access per batch without offsets. ``min_batch`` > 1 merges
    steps into batches of at least that many lookups: faster to replay, approximate (the
    output of ``tierstore profile --batch N`` says so)."""
    if min_batch < 1:
        raise TierStoreError(f"min_batch={min_batch} must be >= 1")
    if offsets is None:
        starts = np.arange(0, n, min_batch, dtype=np.int64)
    else:
        off = np.asarray(offsets, dtype=np.int64)
        if min_batch > 1 and off.size:
            # keep an offset only when it starts a new bucket of min_batch positions (greedy,
            # vectorized merging)
            bucket = off // min_batch
            keep = np.r_[True, bucket[1:] != bucket[:-1]]
            off = off[keep]
        starts = off
    return np.r_[starts, n].astype(np.int64)


def replay(index: CacheIndex | None, rows: np.ndarray, bounds: np.ndarray, *, lookahead: int = 0,
           host: CacheIndex | None = None, host_resident: bool = False) -> int:
    """Run the accesses through a device tier (``index``) and optionally the host tier below
    it, batch by batch, with the store's own compiled walk (tierstore.cache.walk): a live
    store's counters equal the simulation's by construction. ``index`` None: the device tier
    is disabled; ``host_resident``: the host tier holds the whole table.

    ``lookahead`` L > 0 announces batch i+L (``Store.hint``) before batch i is looked up:
    the ids of requests a serving engine has queued (the known future). A lookup never
    hints its own batch. Returns the rows requested from below the device tier (per batch,
    unique).
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return _walker(index, host, host_resident).replay(rows, np.ascontiguousarray(bounds, dtype=np.int64),
                                                      int(lookahead))


def _walker(index: CacheIndex | None, host: CacheIndex | None, host_resident: bool) -> Walker:
    """The store's walk over a device tier (``index``, None: disabled) and a host tier."""
    return Walker(index, CACHED if index is not None else NONE,
                  host, RESIDENT if host_resident else CACHED if host is not None else NONE)


def replay_events(index: CacheIndex | None, events: list[tuple], *,
                  host: CacheIndex | None = None, host_resident: bool = False) -> None:
    """Replay a live store's recorded events (``Table.events``, in the order its tiers saw
    them: ``("lookup", ids, key)`` when a lookup's bookkeeping ran, ``("end", ok, key)`` when
    it ended, ``("hint", ids)`` for each ``Store.hint``) through fresh tiers: the simulator's
    prediction for exactly that run, concurrent lookups and hints included."""
    w = _walker(index, host, host_resident)
    open_lookups: dict = {}
    for ev in events:
        if ev[0] == "hint":
            w.announce(np.ascontiguousarray(ev[1], dtype=np.int64))
        elif ev[0] == "end":
            w.end(open_lookups.pop(ev[2]), ev[1])
        else:
            open_lookups[ev[2]] = w.begin(np.ascontiguousarray(ev[1], dtype=np.int64))
    for lk in open_lookups.values():  # lookups still running when the recording stopped
        w.end(lk)


@dataclass
class SimResult:
    """One policy at one capacity over one trace (``--json`` emits these fields)."""

    policy: str
    capacity_rows: int
    hit_ratio: float
    hits: int
    misses: int
    lookups: int
    insertions: int | None
    evictions: int | None
    seconds: float
    table: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def simulate(rows: np.ndarray, capacities: list[int], policies: list[str], *,
             n_rows: int | None = None, offsets: np.ndarray | None = None,
             profile: Profile | None = None, min_batch: int = 1, lookahead: int = 0,
             rng: int | None = None, table: str = "", warm_opt: bool = True,
             dense: tuple[np.ndarray, int] | None = None, direct: DirectTrace | None = None) -> list[SimResult]:
    """Hit ratios of each policy (a registered name or ``opt``) at each capacity (rows).

    ``profile``: counts from *separate* text, for ``static`` and ``default``: one per row,
    a sparse ``(rows, counts)`` pair or a ``TopProfile``. Memory follows the trace and the
    capacities, never the table's rows (the tiers' row maps are sized to their capacity).
    ``n_rows``: table size (default: max row id + 1).
    ``warm_opt``: ``opt`` may start with a full cache, like ``static`` and ``default``,
    which preload profile rows (otherwise they could beat the "optimum" by the cold misses).
    ``dense``: ``stack_distance.dense_ids(rows)`` when the caller has it (``lru``'s stack
    distances and ``opt``'s next uses read only that; computed here otherwise).
    ``direct``: ``direct.direct_trace`` of ``rows`` (with ``direct.ranked``: ``profile``'s ranking), for
    replays over direct maps: the policies of ``direct.DIRECT_POLICIES`` without hints, the
    same decisions, 0.5-0.9x the CPU per replay (docs/profiling.md); the others replay ``rows``
    over the hashed maps.
    """
    rows = np.asarray(rows)
    if n_rows is None:
        n_rows = int(rows.max()) + 1 if rows.size and rows.dtype.kind in "iu" else 0
    rows, _ = as_row_ids(rows, int(n_rows), where="the trace", copy=False)  # flat int64, in range
    n_rows = int(n_rows)
    for p in policies:
        if p != "opt" and p not in POLICIES:
            raise TierStoreError(f"unknown policy {p!r}; choose from {', '.join([*POLICIES, 'opt'])}")
    profile = as_profile(profile, n_rows)  # once, not per capacity x policy
    bounds = batch_bounds(rows.size, offsets, min_batch)
    # LRU without hints, at every capacity from one pass of stack distances (Mattson): exact
    # one access at a time, and exact for recorded batches whenever no batch is longer than
    # the capacity (its rows, the most recent, are never LRU's victim, so the leases of the
    # store's walk never change a decision; tested against the walk).
    lru_exact: dict[int, tuple[int, int, int]] = {}
    lru_seconds = 0.0
    longest = int(np.diff(bounds).max()) if bounds.size > 1 else 0
    lru_caps = [int(c) for c in capacities if int(c) >= longest]
    # one or two capacities: the walk's own LRU is faster (~24M against ~5M accesses/s)
    if "lru" in policies and lookahead == 0 and len(lru_caps) > 2:
        from .stack_distance import lru_hits

        t0 = time.perf_counter()
        lru_exact = lru_hits(rows, lru_caps, dense=dense)
        lru_seconds = (time.perf_counter() - t0) / max(1, len(lru_caps))
    out = []
    opt: OptTrace | None = None
    for cap in capacities:
        cap = int(cap)
        # a cache of n_rows holds the whole table: a larger one gets the same hits (tested
        # policy by policy), and sizing the index by the capacity asked would allocate rows
        # that cannot exist (7 TiB at 1e12 rows) or overflow int64 (1e300)
        held = min(cap, max(n_rows, 1))
        for p in policies:
            t0 = time.perf_counter()
            if p == "lru" and cap in lru_exact:
                hits, ins, ev = lru_exact[cap]
                res = SimResult("lru", cap, hits / rows.size if rows.size else 0.0, hits, rows.size - hits,
                                rows.size, ins, ev, lru_seconds, table)
                out.append(res)
                continue
            if p == "opt":
                if opt is None:  # prepared once for every capacity (next uses: one argsort)
                    opt = OptTrace(rows, offsets=None if (offsets is None and min_batch == 1) else bounds[:-1],
                                   dense=dense)
                hits = opt.hits(held, warm=warm_opt)
                res = SimResult("opt", cap, hits / rows.size if rows.size else 0.0, hits,
                                rows.size - hits, rows.size, None, None, 0.0, table)
            else:
                if direct is not None and usable(direct, p, held, profile is not None, lookahead):
                    idx = direct_index(direct, held, p, profiled=profile is not None, rng=rng)
                    replay(idx, direct.rows, bounds)
                else:
                    idx = CacheIndex(n_rows, held, p, profile=profile, rng=rng,
                                     pinned_rows=None if profile is not None else np.empty(0, np.int64))
                    replay(idx, rows, bounds, lookahead=lookahead)
                res = SimResult(p, cap, idx.hit_ratio, idx.hits, idx.misses, rows.size,
                                idx.insertions, idx.evictions, 0.0, table)
            res.seconds = time.perf_counter() - t0
            out.append(res)
    return out


def simulate_tiers(rows: np.ndarray, device_rows: int, host_rows: int, policy: str, *,
                   n_rows: int, offsets: np.ndarray | None = None,
                   profile: Profile | None = None, min_batch: int = 1,
                   lookahead: int = 0, exclusive: bool = False) -> dict[str, dict[str, int | float]]:
    """Device tier over host tier over disk, as the store runs them (one policy for both).

    ``exclusive``: the host tier's profile ranks from where the device tier's capacity ends,
    as a CPU store opened with ``exclusive=True`` places them (``serve.table.host_after_device``).

    Returns per tier ``{"hits", "misses", "hit_ratio", "capacity", "evictions",
    "insertions"}``; the host tier sees each batch's rows the device tier does not serve
    (unique). A capacity of 0 disables a tier; one >= ``n_rows`` makes it resident (every
    lookup hits).
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    bounds = batch_bounds(rows.size, offsets, min_batch)
    if device_rows >= n_rows:  # resident device tier: nothing reaches the host
        return {"device": {"hits": int(rows.size), "misses": 0, "hit_ratio": 1.0},
                "host": {"hits": 0, "misses": 0, "hit_ratio": 0.0}}

    def make(cap: int, profile: Profile | None) -> CacheIndex | None:
        if cap <= 0 or cap >= n_rows:
            return None
        return CacheIndex(n_rows, cap, policy, profile=profile)

    host_profile = ranks_after(profile, device_rows, n_rows) if exclusive else profile
    dev, host = make(device_rows, profile), make(host_rows, host_profile)
    below = replay(dev, rows, bounds, lookahead=lookahead, host=host, host_resident=host_rows >= n_rows)
    out: dict[str, dict[str, int | float]] = {}
    for name, t in (("device", dev), ("host", host)):
        out[name] = ({"hits": t.hits, "misses": t.misses, "hit_ratio": t.hit_ratio,
                      "capacity": t.capacity, "evictions": t.evictions,
                      "insertions": t.insertions} if t is not None
                     else {"hits": 0, "misses": 0, "hit_ratio": 0.0})
    if host_rows >= n_rows:  # resident host tier: every row the device tier does not serve hits
        out["host"] = {"hits": below, "misses": 0, "hit_ratio": 1.0 if below else 0.0}
    return out
