"""Tables sharded across the ranks of a torch.distributed process group.

Each rank owns rows ``rank::world_size`` of every table (round-robin by row id) and serves
them from its own local store with its own tiers. Engram row ids are hashes, so
round-robin spreads both the rows and the traffic evenly; a hot row cannot overload its
owner because every rank deduplicates its ids before asking, so the owner serves a row at
most once per rank per lookup, whatever the skew.

Every call (``prefetch``, ``lookup``, ``prefetch_many``, ``hint``) is collective (SPMD, like a
model-parallel embedding): every rank makes the same calls, for the same tables, in the same
order, each with its own ids. One call is one step-locked exchange:

    0. all_to_all(header)    -- (sequence number, kind of call, table, error flag and text,
                                how many ids for you); every rank checks every header
    1. ids -> unique ids; owner = id % W, local id = id // W
    2. all_to_all(local ids)                            -- who needs what from whom
    3. each rank looks the requested rows up in its local store (device/host/disk tiers),
       raw: a quantized table's rows stay quantized on the wire
    4. all_to_all(status + rows)                        -- rows back to the askers
    5. the unique rows are scattered to the output (duplicates cost no traffic) and a
       quantized table's are dequantized there, at the receiver

Step lock: ids, the table name and ``out=`` are checked on the caller's thread, and a call
whose input is bad still takes part in the exchange, with an empty request and its error
flag (and message) in its header. After step 0 every rank knows of it and every rank raises
for that call: the rank at fault its own error (``InvalidIdError``, ``UnknownTableError``,
...), the others ``ShardedLookupError`` naming it. Headers that disagree (another table,
another kind of call, another sequence number) raise ``ShardDesyncError`` on every rank and
no rows move. A rank that cannot serve rows it owns (a corrupt page, an I/O error) flags
that in its status row of step 4: the askers raise ``ShardedLookupError``, it raises its own
error. So one rank's error never puts the group out of step: the next call pairs with the
peers' next call, and rows are bit-exact or every rank raises.

Collectives run on one background thread per store, in issue order, so ``prefetch``
returns a future at once and fits the model's prefetch-then-wait pattern. They use their
own process group with a short timeout: a rank that dies makes the others fail with a
``TierStoreError`` naming the cause instead of hanging (and every later call fails at once:
the group is broken). gloo on CPU, NCCL on GPU (ids and rows are then exchanged as CUDA
tensors).

Build: every rank runs ``build_shard(checkpoint, out, rank, world_size)`` and writes only
``out/shard-RRRRR-of-WWWWW`` (rows ``rank::world_size`` of each table), atomically.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime
import hashlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..errors import (CapacityError, CorruptDataError, IdTypeError, InvalidIdError, ShardDesyncError,
                      ShardedLookupError, StoreClosedError, StoreIOError, TierStoreError, UnknownTableError)
from ..format.build import build_store
from ..format.quant import dequantize
from ..format.spec import TableInfo
from ..ids import IdLike, as_row_ids
from .options import StoreOptions, resolve_options
from .prefetcher import LatencyStats, LookupFuture
from .rowstore import RowStore
from .store import Store, find_table

__all__ = ["shard_dir", "build_shard", "ShardedStore", "open_sharded"]

T = TypeVar("T")

# the header each rank sends to every rank at step 0 of an exchange (int64 words)
_MAGIC = 0x74536852_64303031  # "tShRd001": a header of this protocol version
_SEQ, _OP, _KEY, _PART, _ERR, _COUNT = 1, 2, 3, 4, 5, 6  # word 7 is reserved (0)
_MSG_WORDS = 30  # the error text of a rank whose input was bad, utf-8, truncated to 240 bytes
_HEADER_WORDS = 8 + _MSG_WORDS
_LOOKUP, _HINT, _MANY, _PART_OF_MANY = 1, 2, 3, 4
_OPS = {_LOOKUP: "lookup/prefetch", _HINT: "hint", _MANY: "prefetch_many", _PART_OF_MANY: "prefetch_many part"}
# error codes of headers and status rows: index + 1 (0: no error); the first class that matches
_ERRORS: tuple[type[TierStoreError], ...] = (InvalidIdError, IdTypeError, UnknownTableError, StoreClosedError,
                                              CapacityError, CorruptDataError, StoreIOError, TierStoreError)


def _code(e: BaseException) -> int:
    return next((i + 1 for i, cls in enumerate(_ERRORS) if isinstance(e, cls)), len(_ERRORS))


def _table_key(name: object) -> int:
    """A table's identity in headers: the same on every rank for the same name (not Python's
    salted hash), positive int64."""
    text = name if isinstance(name, str) else repr(name)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=7).digest(), "little")


def _typed(e: Exception) -> TierStoreError:
    """What a caller's mistake raises: typed errors as they are, anything else wrapped."""
    return e if isinstance(e, TierStoreError) else TierStoreError(f"{type(e).__name__}: {e}")


def shard_dir(out: str | os.PathLike[str], rank: int, world_size: int) -> Path:
    return Path(out) / f"shard-{rank:05d}-of-{world_size:05d}"


def build_shard(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], rank: int, world_size: int,
                **kwargs: Any) -> Path:
    """Write this rank's shard of a sharded store (rows ``rank::world_size`` of every table).

    Keyword arguments are those of ``tierstore.build_store`` (tables, force, dtype, progress,
    attach). Each shard is built atomically on its own; ranks need not coordinate.
    """
    return build_store(checkpoint, shard_dir(out, rank, world_size), shard=(rank, world_size), **kwargs)


@dataclass(frozen=True, slots=True)
class _Request:
    """One table's part of a call, checked on the caller's thread."""

    name: str
    info: TableInfo
    flat: np.ndarray  # the ids, a private int64 copy, checked against the table's global rows
    shape: tuple[int, ...]  # the ids' shape: the result is shape + (row width,)
    out: torch.Tensor | None  # checked: the lookup's dtype and shape on the store's device
    raw: bool  # return the stored rows (a quantized table's are not dequantized)


class ShardedStore:
    """The rows of every table spread over the ranks of ``group``; a ``tierstore.RowStore``
    like ``Store`` (``lookup``, ``prefetch``, ``prefetch_many``, ``hint``, ``stats``, ``raw=``,
    ``out=``, the same dtypes and typed errors: a quantized table's rows dequantized to
    bfloat16 bit-exactly, its stored bytes with ``raw=True``), but every call is collective
    (module docstring): every rank makes the same calls in the same order. Opened with the
    options of ``tierstore.open`` (``StoreOptions``); budgets are per rank.

    Not for concurrent use from several threads of one rank: the calls must be issued in the
    same order on every rank.
    """

    def __init__(self, path: str | os.PathLike[str], *, group: dist.ProcessGroup | None = None,
                 options: StoreOptions | None = None, **overrides: Any):
        opts = resolve_options(options, overrides)  # the same options and checks as tierstore.open
        timeout = opts.timeout
        if not dist.is_available() or not dist.is_initialized():
            raise TierStoreError("ShardedStore needs an initialized torch.distributed process group "
                                 "(torch.distributed.init_process_group)")
        parent = group or dist.group.WORLD
        self.rank = dist.get_rank(parent)
        self.world_size = dist.get_world_size(parent)
        backend = dist.get_backend(parent)
        # our own group, so a dead peer surfaces after `timeout`, not the default 30 minutes
        ranks = dist.get_process_group_ranks(parent) if group is not None else list(range(self.world_size))
        self.group = dist.new_group(ranks=ranks, timeout=datetime.timedelta(seconds=timeout), backend=backend)
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        local_path = shard_dir(path, self.rank, self.world_size)
        if not local_path.exists():
            raise TierStoreError(
                f"rank {self.rank}: no shard at {local_path}; build it with "
                f"tierstore.serve.distributed.build_shard(checkpoint, {str(path)!r}, {self.rank}, {self.world_size})"
            )
        if opts.device is None:  # the group's device: rows arrive where the exchange runs
            opts = dataclasses.replace(opts, device=self.comm_device)
        self.options = opts
        self.local = Store(local_path, options=opts)
        self.device = self.local.device
        self.tables: dict[str, TableInfo] = {}
        for name, info in self.local.tables.items():
            shard = info.source.get("shard")
            if not shard or shard["rank"] != self.rank or shard["world_size"] != self.world_size:
                raise TierStoreError(f"{local_path}: table {name!r} is not shard {self.rank} of {self.world_size}")
            self.tables[name] = TableInfo(**{**info.__dict__, "rows": shard["global_rows"]})
        self._names = {_table_key(name): name for name in self.tables}
        self.latency = LatencyStats()
        self._exec = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-dist")
        self._lock = threading.Lock()
        self._seq = 0  # calls issued by this rank: every rank's k-th call is exchange k
        self._broken: str | None = None  # a collective failed: the group cannot be trusted to be in step
        self._hint_error: TierStoreError | None = None  # a hint's exchange failed: the next call raises it
        self._closed = False
        self.ids_requested = 0  # ids asked for by this rank (with duplicates)
        self.ids_sent = 0  # unique ids this rank sent to owners (its own rows included)
        self.rows_served = 0  # rows this rank served to others (and itself)
        self.bytes_sent = 0  # ids + rows this rank put on the wire to other ranks
        self.bytes_received = 0

    # -- API ---------------------------------------------------------------------------------
    def prefetch(self, table: str, ids: IdLike, out: torch.Tensor | None = None, *,
                 raw: bool = False) -> LookupFuture[torch.Tensor]:
        """Start the collective lookup of rows ``ids`` of ``table``; returns at once with a future.

        Bad input (ids, table, ``out=``, ``raw=``) raises here, immediately, and this rank still
        takes part in the exchange with an error flag, so the peers' futures raise
        ``ShardedLookupError`` for this call and the group stays in step. A peer's bad input or
        a failure to serve raises from ``result()``. Rows as ``Store.prefetch`` returns them.
        """
        seq = self._next_seq()
        req, err = self._checked(lambda: self._request(table, ids, out, raw))
        fut = self._submit(lambda: self._lookup_job(seq, table, req, err))
        if err is not None:
            raise err
        return fut

    def lookup(self, table: str, ids: IdLike, out: torch.Tensor | None = None, *, raw: bool = False) -> torch.Tensor:
        """Rows ``ids`` of ``table``, as ``Store.lookup`` returns them (shape ``ids.shape +
        (info.lookup_dim,)``; a quantized table dequantized to bfloat16, or its stored uint8
        rows with ``raw=True``): ``prefetch(...).result()``. Collective."""
        return self.prefetch(table, ids, out, raw=raw).result()

    def prefetch_many(self, requests: Mapping[str, IdLike]) -> LookupFuture[dict[str, torch.Tensor]]:
        """One call for several tables, rows as :meth:`lookup` returns them. Collective: every
        rank names the same tables in the same order. A bad request on any rank fails the
        whole call on every rank, as in :meth:`prefetch`."""
        seq = self._next_seq()

        def check() -> list[_Request]:
            if not isinstance(requests, Mapping):
                raise TierStoreError(f"requests={type(requests).__name__} must be a mapping of table name to ids")
            return [self._request(name, ids, None, False) for name, ids in requests.items()]

        reqs, err = self._checked(check)
        names = list(requests) if isinstance(requests, Mapping) else []
        fut = self._submit(lambda: self._many_job(seq, names, reqs, err))
        if err is not None:
            raise err
        return fut

    def hint(self, table: str, ids: IdLike) -> None:
        """Announce rows of ``table`` that a later lookup will read (``Store.hint``): each id is
        forwarded to the rank that owns its row, whose cache policy learns it. Collective, like
        a lookup (every rank calls it at the same point, with its own ids, possibly none), but
        it does not wait: the exchange is queued behind earlier calls and this returns at once.
        Bad ids raise here, as in ``lookup``; a peer's bad hint is dropped (a hint is advice);
        a failed exchange (out of step, dead peer) raises from this rank's next call."""
        seq = self._next_seq()
        req, err = self._checked(lambda: self._request(table, ids, None, False))
        self._submit(lambda: self._hint_job(seq, table, req, err))
        if err is not None:
            raise err

    def stats(self) -> dict[str, Any]:
        s = self.local.stats()
        s["exchange"] = {"ids_requested": self.ids_requested, "ids_sent": self.ids_sent,
                         "rows_served": self.rows_served, "bytes_sent": self.bytes_sent,
                         "bytes_received": self.bytes_received,
                         "dedup_ratio": self.ids_sent / self.ids_requested if self.ids_requested else 0.0}
        s["latency"] = self.latency.as_dict()
        return s

    def reset_stats(self) -> None:
        self.local.reset_stats()
        self.latency.reset()
        self.ids_requested = self.ids_sent = self.rows_served = self.bytes_sent = self.bytes_received = 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._exec.shutdown(wait=True, cancel_futures=True)
        self.local.close()
        try:
            dist.destroy_process_group(self.group)
        except Exception:  # the group may already be broken by a dead peer; nothing to release then
            pass

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the caller's side ---------------------------------------------------------------------
    def _next_seq(self) -> int:
        if self._closed:
            raise StoreClosedError("the sharded store is closed; open it again (on every rank) to look rows up")
        self._seq += 1
        return self._seq

    @staticmethod
    def _checked(check: Callable[[], T]) -> tuple[T | None, TierStoreError | None]:
        try:
            return check(), None
        except Exception as e:  # every mistake is flagged to the peers, not only the typed ones
            return None, _typed(e)

    def _submit(self, job: Callable[[], T]) -> LookupFuture[T]:
        def run() -> tuple[T, None]:
            return job(), None

        try:
            return LookupFuture(self._exec.submit(run), self.latency)
        except RuntimeError:  # "cannot schedule new futures after shutdown": close() won the race
            raise StoreClosedError("the sharded store is closed; open it again to look rows up") from None

    def _info(self, table: str) -> TableInfo:
        return find_table(self.tables, table, "the sharded store")

    def _request(self, table: str, ids: IdLike, out: torch.Tensor | None, raw: bool) -> _Request:
        if raw not in (True, False):
            raise TierStoreError(f"raw={raw!r} must be a bool")
        info = self._info(table)
        flat, shape = as_row_ids(ids, info.rows, where=f"table {info.name!r}")
        dequant = info.quant is not None and not raw
        dim, dtype = (info.lookup_dim, info.lookup_dtype) if dequant else (info.dim, info.torch_dtype)
        full = shape + (dim,)
        if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != full or out.dtype != dtype
                                or out.device != self.device or not out.is_contiguous()):
            got = (f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            raise TierStoreError(f"out= must be a contiguous {dtype} tensor of shape {full} on {self.device}; "
                                 f"got {got}")
        return _Request(table, info, flat, shape, out, raw)

    # -- the jobs (the collective thread, in issue order) --------------------------------------
    def _pending(self, err: TierStoreError | None, *, take_hint_error: bool = True) -> TierStoreError | None:
        """This call's own error: its input's, else a failed hint's that no call has raised yet.
        A broken group (a collective failed) raises at once: no peer is waiting in step."""
        if self._broken is not None:
            raise TierStoreError(self._broken)
        if err is None and take_hint_error and self._hint_error is not None:
            err, self._hint_error = self._hint_error, None
        return err

    def _lookup_job(self, seq: int, table: str, req: _Request | None, err: TierStoreError | None) -> torch.Tensor:
        err = self._pending(err)
        rows = self._exchange(seq, _LOOKUP, table, req, err)
        assert req is not None and rows is not None  # an error raised in the exchange, on every rank
        return self._finish(req, rows)

    def _many_job(self, seq: int, names: list[str], reqs: list[_Request] | None,
                  err: TierStoreError | None) -> dict[str, torch.Tensor]:
        err = self._pending(err)
        key = _table_key("\0".join(map(str, names)))
        self._step(seq, _MANY, key, len(names), err, np.zeros(self.world_size, np.int64))
        assert reqs is not None
        result = {}
        for part, req in enumerate(reqs):
            rows = self._exchange(seq, _PART_OF_MANY, req.name, req, None, part=part)
            assert rows is not None
            result[req.name] = self._finish(req, rows)
        return result

    def _hint_job(self, seq: int, table: str, req: _Request | None, err: TierStoreError | None) -> None:
        try:
            err = self._pending(err, take_hint_error=False)  # an earlier hint's error waits for a lookup
            self._exchange(seq, _HINT, table, req, err)
        except ShardDesyncError as e:
            self._hint_error = e
        except ShardedLookupError:  # a peer's bad hint: nothing to hint, nothing wrong
            pass
        except Exception as e:
            if e is not err:  # our own bad hint already raised at the call
                self._hint_error = _typed(e)

    def _finish(self, req: _Request, rows: torch.Tensor) -> torch.Tensor:
        """The caller's result from the stored rows (uint8, unique rows scattered to the
        request's order): dequantized at the receiver, or the stored rows as their dtype."""
        info, n = req.info, len(req.flat)
        rows = rows.to(self.device)
        if info.quant is not None and not req.raw:
            if req.out is None:
                return dequantize(rows, info.quant).view(req.shape + (info.lookup_dim,))
            dequantize(rows, info.quant, out=req.out.view(n, info.lookup_dim))
            return req.out
        stored = rows.view(info.raw_dtype)
        if req.out is None:
            return stored.view(info.torch_dtype).view(req.shape + (info.dim,))
        req.out.view(n, info.dim).view(info.raw_dtype).copy_(stored)
        return req.out

    # -- the exchange ------------------------------------------------------------------------
    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int] | None = None,
             in_splits: Sequence[int] | None = None) -> None:
        try:
            dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                   group=self.group)
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses for dead or hung peers
            self._broken = (f"rank {self.rank}: an earlier sharded lookup failed in all_to_all ({type(e).__name__}); "
                            "the group may be out of step: close the store and open it again on every rank")
            raise TierStoreError(
                f"rank {self.rank}: sharded lookup failed in all_to_all ({type(e).__name__}: {e}); "
                "a peer rank may have died, hung past the timeout, or issued lookups in a different order"
            ) from e

    def _describe(self, h: np.ndarray) -> str:
        name = self._names.get(int(h[_KEY]), f"<table #{int(h[_KEY]):x}>")
        return f"call {int(h[_SEQ])} {_OPS.get(int(h[_OP]), f'op {int(h[_OP])}')} of {name!r}"

    def _step(self, seq: int, op: int, key: int, part: int, err: TierStoreError | None,
              counts: np.ndarray) -> list[int]:
        """Step 0: every rank sends its header to every rank (``counts[j]``: the ids it asks of
        rank j) and checks all of them the same way, so all raise or none does. Returns the
        ids each rank asks of this one."""
        W = self.world_size
        head = np.zeros((W, _HEADER_WORDS), dtype=np.int64)
        head[:, 0], head[:, _SEQ], head[:, _OP], head[:, _KEY], head[:, _PART] = _MAGIC, seq, op, key, part
        head[:, _COUNT] = counts
        if err is not None:
            head[:, _ERR] = _code(err)
            text = f"{type(err).__name__}: {err}".encode("utf-8", "replace")[: 8 * _MSG_WORDS]
            head[:, 8:] = np.frombuffer(text.ljust(8 * _MSG_WORDS, b"\0"), dtype=np.int64)
        got = torch.empty((W, _HEADER_WORDS), dtype=torch.int64, device=self.comm_device)
        self._a2a(got, torch.from_numpy(head).to(self.comm_device))
        h = got.cpu().numpy()
        if (h[:, 0] != _MAGIC).any():
            raise ShardDesyncError(f"rank {self.rank}: a peer's header is not one of this protocol (another "
                                   "tierstore version, or the group fell out of step); reopen the store on every rank")
        failed = tuple(int(r) for r in np.flatnonzero(h[:, _ERR]))
        if failed:
            if err is not None:
                raise err
            why = "; ".join(f"rank {r}: {h[r, 8:].tobytes().rstrip(bytes(1)).decode('utf-8', 'replace')}"
                            for r in failed)
            raise ShardedLookupError(
                f"rank {self.rank}: {self._describe(h[self.rank])} failed because the input of rank(s) "
                f"{list(failed)} was bad ({why}); every rank raises for this call and the next call is in step",
                ranks=failed)
        same = (h[:, _SEQ:_ERR] == h[0, _SEQ:_ERR]).all(axis=1)
        if not same.all():
            calls = "; ".join(f"rank {r}: {self._describe(h[r])}" for r in range(W))
            raise ShardDesyncError(
                f"rank {self.rank}: the ranks are out of step ({calls}); no rows were exchanged. Every rank must "
                "make the same calls (lookup/prefetch/prefetch_many/hint) for the same tables in the same order",
                ranks=tuple(int(r) for r in np.flatnonzero(~same)))
        return h[:, _COUNT].tolist()

    def _swap_ids(self, send_ids: np.ndarray, send_counts_l: list[int], recv_counts_l: list[int]) -> np.ndarray:
        """Step 2: the local ids each rank asks of this one, grouped by asking rank."""
        recv_ids = torch.empty(sum(recv_counts_l), dtype=torch.int64, device=self.comm_device)
        self._a2a(recv_ids, torch.from_numpy(send_ids).to(self.comm_device), recv_counts_l, send_counts_l)
        return recv_ids.cpu().numpy()

    def _swap_rows(self, table: str, info: TableInfo, send_ids: np.ndarray, send_counts_l: list[int],
                   recv_counts_l: list[int]) -> tuple[np.ndarray, torch.Tensor, TierStoreError | None]:
        """Steps 2-4: (the local ids asked of this rank, what arrived: per owner a status row then
        its rows, this rank's error serving the others or None)."""
        W = self.world_size
        local_ids = self._swap_ids(send_ids, send_counts_l, recv_counts_l)
        row_bytes = info.row_bytes
        # rows travel as the widest integers dividing a row (gloo has no int16; fewer elements);
        # before each asker's rows, one status row: 0, or the code of our error serving them
        wide = torch.int64 if row_bytes % 8 == 0 else torch.int32 if row_bytes % 4 == 0 else torch.uint8
        words = row_bytes // wide.itemsize
        send = torch.zeros((len(local_ids) + W, words), dtype=wide, device=self.local.device)
        served_err: TierStoreError | None = None
        start = 0
        for j, c in enumerate(recv_counts_l):  # one batched lookup per asking rank, into its slice
            if c:
                dst = send[start + j + 1: start + j + 1 + c].view(torch.uint8).view(info.torch_dtype)
                try:
                    self.local.lookup(table, local_ids[start: start + c], out=dst, raw=True)
                except Exception as e:  # flagged to the askers in step 4; raised after it
                    served_err = served_err or _typed(e)
                    send[start + j + 1: start + j + 1 + c] = 0
            start += c
        if served_err is not None:  # to every rank, asker or not, so that every rank raises for this call
            send[torch.from_numpy(np.cumsum([0] + [c + 1 for c in recv_counts_l[:-1]])), 0] = _code(served_err)
        got = torch.empty((len(send_ids) + W, words), dtype=wide, device=self.comm_device)
        self._a2a(got, send.to(self.comm_device), [c + 1 for c in send_counts_l], [c + 1 for c in recv_counts_l])
        return local_ids, got, served_err

    def _exchange(self, seq: int, op: int, table: str, req: _Request | None, err: TierStoreError | None,
                  part: int = 0) -> torch.Tensor | None:
        """One step-locked exchange of ``req`` (None with ``err``: join with an empty request).
        Returns the stored rows of ``req.flat`` as uint8 (n, row_bytes); None for a hint."""
        W, dev, me = self.world_size, self.comm_device, self.rank
        flat = req.flat if err is None and req is not None else np.empty(0, dtype=np.int64)
        uniq, inv = np.unique(flat, return_inverse=True)
        owner = uniq % W
        order = np.argsort(owner, kind="stable")
        send_counts_l = np.bincount(owner, minlength=W).tolist()
        recv_counts_l = self._step(seq, op, _table_key(table), part, err, np.asarray(send_counts_l))
        assert req is not None  # _step raised on every rank if any rank had no request
        info = req.info
        try:  # an exception between two collectives leaves the peers waiting in the next one
            if op == _HINT:
                local_ids = self._swap_ids(uniq[order] // W, send_counts_l, recv_counts_l)
            else:
                local_ids, got, served_err = self._swap_rows(table, info, uniq[order] // W, send_counts_l,
                                                             recv_counts_l)
        except BaseException as e:
            if self._broken is None:
                self._broken = (f"rank {me}: an earlier {_OPS[op]} of table {table!r} stopped between its collectives "
                                f"({type(e).__name__}: {e}); the group is out of step: close the store and open it "
                                "again on every rank")
            raise
        if op == _HINT:
            self.local.hint(table, local_ids)  # our rows that the askers will read
            return None
        row_bytes = info.row_bytes
        with self._lock:
            self.ids_requested += len(flat)
            self.ids_sent += len(uniq)
            self.rows_served += len(local_ids)
            self.bytes_sent += 8 * (len(uniq) - send_counts_l[me]) + row_bytes * (len(local_ids) - recv_counts_l[me])
            self.bytes_received += (8 * (len(local_ids) - recv_counts_l[me])
                                    + row_bytes * (len(uniq) - send_counts_l[me]))
        status_at = np.cumsum([0] + [c + 1 for c in send_counts_l[:-1]])
        status = got[torch.from_numpy(status_at).to(dev), 0].cpu().numpy()
        if served_err is not None:
            raise served_err
        if status.any():
            bad = tuple(int(r) for r in np.flatnonzero(status))
            why = ", ".join(f"rank {r}: {_ERRORS[min(int(status[r]), len(_ERRORS)) - 1].__name__}" for r in bad)
            raise ShardedLookupError(f"rank {me}: {_OPS[op]} of table {table!r} failed: rank(s) {list(bad)} could "
                                     f"not serve the rows they own ({why}; see their error); every rank raises for "
                                     "this call and the next call is in step", ranks=bad)
        # got holds the unique rows in owner order after each owner's status row: the unique row
        # at owner-order position p, owned by rank o, is at p + o + 1
        where = np.empty(len(uniq), dtype=np.int64)
        where[order] = np.arange(len(uniq), dtype=np.int64) + owner[order] + 1
        idx = torch.from_numpy(where[inv.reshape(-1)]).to(dev)
        return got.index_select(0, idx).view(torch.uint8).view(len(flat), row_bytes)


def open_sharded(path: str | os.PathLike[str], *, group: dist.ProcessGroup | None = None,
                 options: StoreOptions | None = None, **overrides: Any) -> ShardedStore:
    """Open this rank's shard of the sharded store at ``path`` (collective: every rank calls it).

    options: a ``tierstore.StoreOptions``, or its fields as keywords, exactly as for
    ``tierstore.open`` (checked by the same code) and applied to this rank's local store:
    **budgets are per rank** (each rank's shard has tiers of these sizes). ``timeout`` is
    also the collectives' timeout; ``device`` defaults to the group's device (CPU for gloo,
    this rank's GPU for NCCL).
    """
    return ShardedStore(path, group=group, options=options, **overrides)


_IS_A_ROWSTORE: type[RowStore] = ShardedStore  # checked statically: ShardedStore implements tierstore.RowStore
