"""The public store: open a store directory, look rows up through the tiers, asynchronously."""

from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .buffers import BufferPool
from ..cache.index import rows_within
from ..cache.registry import PolicySpec
from ..errors import (CapacityError, CorruptDataError, StoreChangedError, StoreClosedError, TierStoreError,
                      UnknownTableError)
from ..format.quant import dequantize
from ..format.spec import TableInfo, read_manifest
from ..ids import IdLike, as_row_ids, check_id_tensor
from .options import StoreOptions, resolve_device, resolve_options
from .prefetcher import LookupFuture, Prefetcher
from .rowstore import RowStore
from ..format.profile import Profile, has_profile, load_profile, profile_info
from ..format.recovery import recover
from ..sizes import format_size
from ..tiers.cuda import check_device_room
from ..tiers.hotset import TableSnapshot
from .table import _INT64, Table, host_after_device
from .warm import Warmer

__all__ = ["Store", "open_store", "IdLike", "INLINE_BELOW"]

# The one threshold of "small" (the model's synchronous lookups use it too: tierstore.INLINE_BELOW):
# prefetch() of fewer ids does its bookkeeping in the caller's thread and, when every row is on
# the device, the whole lookup there. Measured (python -m benchmarks.bench_lookup, 2 cores,
# loaded): handing 2,048 all-hit ids to a worker cost 31.2 us over the 31.6 us synchronous
# lookup, i.e. it doubled it, so 1,024 (the store's old value) was too low; the model's
# 4,096 had been chosen by bench_e2e (warm decode 0.95-0.98x of resident against 0.84-0.93x
# with every request prefetched). Requests of 4,096 and more (a prefill) go to a worker.
INLINE_BELOW = 4096
# an open that finds files of another build (a rebuild replaced the store meanwhile) reads the
# manifest again and reopens, at most this many times in all
OPEN_TRIES = 4


def _release(tables: list[Table], prefetcher: Prefetcher, pool: BufferPool, wait: bool,
             warmer: Warmer | None = None) -> None:
    """Stop the workers and close every table: ``close()``, or garbage collection of a store
    that was never closed (its files, threads and shared segments must not leak). The
    background loader stops first (it reads the tables' files)."""
    if warmer is not None:
        warmer.close()
    prefetcher.close(wait=wait)
    for t in tables:
        t.close()
    pool.clear()


def _available_bytes(device: torch.device) -> int:
    """Memory a new output tensor can take on ``device`` right now."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _sum_open(opens: list[dict[str, Any]]) -> dict[str, Any]:
    """The store's ``stats()["open"]``: the tables' open stats summed (numbers) and joined (names)."""
    def merge(ds: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {k: sum(d[k] for d in ds) for k, v in (ds[0].items() if ds else ())
                               if isinstance(v, (int, float))}
        parts = [p for d in ds for p in str(d.get("source", "none")).split("+") if p != "none"]
        out["source"] = "+".join(dict.fromkeys(parts)) or "none"
        if "placed" in out:  # a fraction of the placed rows, not a sum of fractions
            out["warm"] = 1.0 - out["pending"] / out["placed"] if out["placed"] else 1.0
        out["mode"] = "/".join(sorted({str(d.get("mode", "open")) for d in ds})) or "open"
        return out

    total = merge(opens)
    total["snapshot"] = "/".join(sorted({str(o["snapshot"]).partition(":")[0] for o in opens})) or "none"
    for tier in ("device", "host"):
        total[tier] = merge([o[tier] for o in opens])
    return total


T = TypeVar("T")


def find_table(tables: Mapping[str, T], table: object, where: str) -> T:
    """``tables[table]``, or :class:`UnknownTableError` naming the value, its type when it is
    no str (a list or a tensor passed as the name raised a bare TypeError: unhashable), and
    the tables ``where`` holds. Every entry point that takes a table name comes through here."""
    if isinstance(table, str):
        found = tables.get(table)
        if found is not None:
            return found
        problem = f"no table {table!r}"
    else:
        shown = repr(table)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        problem = f"a table name is a str, not {type(table).__name__} ({shown}; were the table and ids swapped?)"
    known = ", ".join(sorted(tables)[:10]) or "none"
    raise UnknownTableError(f"{problem} in {where}; tables: {known}")


class Store:
    """An opened store: ``tierstore.open(path, ...)``. Thread-safe: any number of threads may
    look up and prefetch at once.

    path: the store directory (``tierstore build``).
    options: a :class:`~tierstore.StoreOptions` (device, device_budget, host_budget, policy,
        policy_params, threads, io_threads, direct, host_shared, pool_bytes, use_profile,
        zero_copy, disk_reader, timeout, warm, exclusive; each field's meaning is documented there), or the
        same options as keywords: ``tierstore.open(path, device="cpu", host_budget="2GiB")``;
        keywords given with ``options=`` replace those fields. They are checked before any
        file is opened. In short: ``device`` is where rows are returned (default CUDA if
        present, else CPU: the device tier is then a budgeted in-memory cache, same code);
        ``device_budget``/``host_budget`` are bytes per tier, rows and their bookkeeping
        (``tierstore.cache.index.slots_within``), split over the tables
        by size (a table whose share covers it is loaded whole at open); ``stats()["disk"]``
        says which page reader served.

    On CUDA the device budget is checked against the GPU's free memory at open: a budget that
    cannot fit raises ``CapacityError`` before anything is allocated, and an out-of-memory
    error inside a lookup is raised as ``CapacityError`` too.
    """

    def __init__(self, path: str | os.PathLike[str], *, options: StoreOptions | None = None, **overrides: Any):
        self._closed = True  # until fully open: close() and the finalizer have nothing to do
        opts = resolve_options(options, overrides)  # every option checked before any file is touched
        if not isinstance(path, (str, os.PathLike)):
            raise TierStoreError(f"path={path!r} must be a str or os.PathLike naming the store directory")
        self.path = Path(path)
        recover(self.path)  # a build of this store that died mid-swap: restore or clean up
        self.manifest = read_manifest(self.path)
        self.options = opts
        self.device = resolve_device(opts.device)
        self.device_budget = int(opts.device_budget or 0)
        self.host_budget = int(opts.host_budget or 0)
        spec = opts.policy_spec
        self.policy = opts.policy
        self.policy_params = dict(spec.params)
        self._tables: dict[str, Table] = {}
        for attempt in range(OPEN_TRIES):
            try:
                self._open_tables(spec, use_profile=opts.use_profile, direct=opts.direct,
                                  io_threads=opts.io_threads, host_shared=opts.host_shared,
                                  zero_copy=opts.zero_copy, disk_reader=opts.disk_reader, timeout=opts.timeout,
                                  warm=opts.warm, exclusive=opts.exclusive)
                break
            except (StoreChangedError, CorruptDataError) as e:
                self._rebuilt_since(e, last=attempt == OPEN_TRIES - 1)
        self._pool = BufferPool(max_bytes=int(opts.pool_bytes))
        self._prefetcher = Prefetcher(opts.threads, self.device)
        # warm="background": one thread fills every table's cache tiers while lookups run (serve/warm.py)
        jobs = [t.warm_job for t in self._tables.values() if t.warmth]
        self._warmer = Warmer(jobs) if jobs else None
        self._closed = False
        self._finalizer = weakref.finalize(self, _release, list(self._tables.values()), self._prefetcher,
                                           self._pool, False, self._warmer)

    def _open_tables(self, spec: PolicySpec, **options: Any) -> None:
        """Open every table of ``self.manifest``, each file checked against its build id
        (version 3+). On failure nothing stays open."""
        self.tables: dict[str, TableInfo] = dict(self.manifest.tables)
        total = sum(t.nbytes for t in self.tables.values()) or 1

        def rows_of(budget: int, info: TableInfo) -> int:
            """The table's share of a budget, in rows: the whole table when the share holds it
            (a resident tier: no index), else the slots whose rows *and* bookkeeping (the
            policy's state, row map, ghosts, hint table: ``slots_within``) fit in the share."""
            return rows_within(int(budget * (info.nbytes / total)), info.rows, info.row_bytes, spec)

        if self.device.type == "cuda":  # never run: needs CUDA. Refuse before allocating anything
            need = sum(min(rows_of(self.device_budget, i), i.rows) * i.row_bytes for i in self.tables.values())
            check_device_room(need, self.device, what=f"device_budget={format_size(self.device_budget)}")
        use_profile = options.pop("use_profile")
        exclusive = host_after_device(self.device, options["host_shared"], options.pop("exclusive"), options["warm"])
        try:
            for name, info in self.tables.items():
                d_rows, h_rows = rows_of(self.device_budget, info), rows_of(self.host_budget, info)
                # only the hottest rows a tier can hold are ever used: keep no count per table row
                # (the host tier's ranks follow the device tier's when exclusive)
                top = min(info.rows, d_rows + h_rows if exclusive else max(d_rows, h_rows))
                profile, snap = self._ranking(info, top, options["direct"]) if use_profile else (None, None)
                try:
                    self._tables[name] = Table(
                        self.path, info, device=self.device, device_rows=d_rows, host_rows=h_rows,
                        policy=spec, profile=profile, snapshot=snap, exclusive=exclusive,
                        build_id=self.manifest.build_id, pinned_build=self.manifest.pinned_build, **options,
                    )
                finally:  # the Table closes it once loaded; a Table that failed early may not have
                    if snap is not None and snap[0] is not None and (
                            name not in self._tables or self._tables[name].warm_snapshot is not snap[0]):
                        snap[0].close()
        except BaseException:
            for t in self._tables.values():
                t.close()
            self._tables = {}
            raise

    def _ranking(self, info: TableInfo, top: int, direct: bool | None
                 ) -> tuple[Profile | None, tuple[TableSnapshot | None, str] | None]:
        """(the ``top`` hottest rows of the table's saved profile, (its hot-set snapshot, the
        snapshot's status) for the Table to load from, or None: the Table looks itself).

        The ranking comes from the snapshot's ids prefix when the snapshot was made of this
        profile (``TableSnapshot.ranking``): open then reads ``4 x top`` bytes of ranking,
        not the profile file (8 bytes per table row for a version-1 profile, 16 per profiled
        row for version 2), so what it reads follows the budgets, not the table or the trace."""
        if not has_profile(self.path, info.name):
            return None, None
        if top <= 0:
            return load_profile(self.path, info.name, top=top), None
        snap, status = TableSnapshot.open(self.path, info, self.manifest.build_id, direct=direct)
        try:
            ranked = snap.ranking(top, profile_info(self.path, info.name)) if snap is not None else None
            if ranked is None:
                ranked = load_profile(self.path, info.name, top=top)
            if snap is not None and snap.dropped:  # its ids failed their check: the Table loads without it
                status = f"ignored: {snap.why}"
        except BaseException:
            if snap is not None:
                snap.close()
            raise
        return ranked, (snap, status)

    def _rebuilt_since(self, e: StoreChangedError | CorruptDataError, *, last: bool) -> None:
        """After an open that found a file of another build or a damaged one: read the manifest
        again. Another build id means a rebuild replaced the store meanwhile: take the new
        manifest (the caller reopens), or after the last try raise ``StoreChangedError``. The
        same id means the files themselves are wrong: raise ``CorruptDataError``."""
        manifest = read_manifest(self.path)
        if manifest.build_id == self.manifest.build_id:
            if isinstance(e, StoreChangedError):  # a file of another build in a store that did not change
                raise CorruptDataError(f"{e.filename}: {e.strerror.partition(':')[0]}, and the manifest did not change: "
                                       "the file was replaced or damaged; rebuild the store "
                                       "(`tierstore build --force`)") from None
            raise e
        if last:
            raise StoreChangedError(
                errno.ESTALE, f"store {self.path} was rebuilt while it was opened, {OPEN_TRIES} times in a row; open "
                "it again once the rebuild (`tierstore build --force`) is done", os.fspath(self.path)) from e
        self.manifest = manifest

    # -- API -----------------------------------------------------------------------------
    def _table(self, table: str) -> Table:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed; open it again to look rows up")
        return find_table(self._tables, table, f"store {self.path}")

    def _prepare(self, table: str, ids: IdLike, out: torch.Tensor | None, *, copy: bool = True, raw: bool = False
                 ) -> tuple[Table, np.ndarray, torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(table, flat ids, staging buffer the tiers fill with stored rows, result buffer,
        result shape). They are one buffer except for a quantized table looked up without
        ``raw``: its stored rows are staged in a pooled uint8 buffer and dequantized into the
        result (``_finish``)."""
        if raw not in (True, False):
            raise TierStoreError(f"raw={raw!r} must be a bool")
        t = self._table(table)
        flat, shape = as_row_ids(ids, t.info.rows, where=f"table {t.info.name!r}", copy=copy)
        stage, buf, full = self._output(t, flat.size, shape, out, raw)
        return t, flat, stage, buf, full

    def _output(self, t: Table, n: int, shape: tuple[int, ...], out: torch.Tensor | None, raw: bool
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(staging buffer the tiers fill with ``n`` stored rows, result buffer, result shape)
        of a lookup of ``n`` ids of shape ``shape``: the result is ``out``, checked, or a
        pooled buffer; the stage is the result itself unless the table is quantized and
        looked up without ``raw``."""
        info = t.info
        dequant = info.quant is not None and not raw
        dim, dtype = (info.lookup_dim, info.lookup_dtype) if dequant else (info.dim, info.torch_dtype)
        full = shape + (dim,)
        if out is None:
            need = n * (info.row_bytes + (dim * dtype.itemsize if dequant else 0))
            # refuse before allocating: a request that cannot fit would be OOM-killed, not raise
            if need > 1 << 26 and need > _available_bytes(self.device):
                raise CapacityError(
                    f"{n:,} ids of table {info.name!r} need {format_size(need)} of output on "
                    f"{self.device} but only {format_size(_available_bytes(self.device))} is available; "
                    "look them up in smaller batches")
            buf = self._pool.get((n, dim), dtype, self.device)
        else:
            if tuple(out.shape) != full or out.dtype != dtype or out.device != self.device \
                    or not out.is_contiguous():
                raise TierStoreError(
                    f"out= must be a contiguous {dtype} tensor of shape {full} on {self.device}; "
                    f"got {out.dtype} {tuple(out.shape)} on {out.device}"
                )
            buf = out.view(n, dim)
        stage = buf
        if dequant:
            # CPU: the dequantization is done when the lookup returns, so the stage goes back to the
            # pool. CUDA: its kernel may still be queued on a worker's side stream, so the caching
            # allocator (which tracks streams, see _finish) owns it rather than the pool.
            stage = (self._pool.get((n, info.dim), info.torch_dtype, self.device) if self.device.type == "cpu"
                     else torch.empty((n, info.dim), dtype=info.torch_dtype, device=self.device))
        return stage, buf, full

    def _defer_cuda_ids(self, t: Table, ids: torch.Tensor) -> Callable[[], np.ndarray]:
        """CUDA ids without making the caller wait: one non-blocking copy into pinned host
        memory is queued on the caller's stream (after whatever work computes the ids) and
        an event recorded; the returned function, run on a worker, waits for that event and
        validates the copied ids. So ``prefetch`` never synchronizes the caller's GPU work;
        an out-of-range CUDA id raises from ``result()`` instead of from ``prefetch``.
        Never run: needs CUDA."""
        where = f"table {t.info.name!r}"
        check_id_tensor(ids, where)
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)  # private: the caller may reuse ids
        host.copy_(ids.detach(), non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(ids.device))

        def ids_on_host() -> np.ndarray:
            copied.synchronize()
            return as_row_ids(host, t.info.rows, where=where, copy=False)[0]

        return ids_on_host

    @staticmethod
    def _finish(t: Table, stage: torch.Tensor, buf: torch.Tensor, full: tuple[int, ...],
                out: torch.Tensor | None = None) -> torch.Tensor:
        """The result of a lookup whose stored rows are in ``stage``: dequantized into ``buf``
        for a quantized table (vectorised, on the store's device), else ``stage`` itself;
        the caller's ``out`` itself when it gave one (``buf`` is a view of it), as torch's
        ``out=`` returns."""
        if stage is not buf:
            assert t.info.quant is not None
            dequantize(stage, t.info.quant, out=buf)
            if stage.is_cuda:  # allocated on the caller's stream, last read on this one (a worker's)
                stage.record_stream(torch.cuda.current_stream(stage.device))
        return out if out is not None else buf.view(full)

    def prefetch(self, table: str, ids: IdLike, out: torch.Tensor | None = None, *,
                 raw: bool = False) -> LookupFuture[torch.Tensor]:
        """Start fetching rows ``ids`` of ``table``; returns at once with a future.

        Bad ids raise here, immediately; I/O and corruption errors raise from ``result()``.
        The future's tensor has shape ``ids.shape + (dim,)`` on the store's device; ``out``
        (contiguous, that shape and dtype) is filled instead of a pooled buffer. A quantized
        table returns bfloat16 rows of ``info.lookup_dim`` values, or with ``raw=True`` its
        stored rows (see :meth:`lookup`).

        CUDA ids are not read here (that would wait for the caller's queued GPU work): they
        are copied to the host asynchronously and checked on a worker, so their range errors
        raise from ``result()`` (never run: needs CUDA).
        """
        if isinstance(ids, torch.Tensor) and ids.is_cuda:  # never run: needs CUDA
            if raw not in (True, False):
                raise TierStoreError(f"raw={raw!r} must be a bool")
            t = self._table(table)
            ids_on_host = self._defer_cuda_ids(t, ids)
            stage, buf, full = self._output(t, ids.numel(), tuple(ids.shape), out, raw)

            def deferred() -> torch.Tensor:
                t.gather(ids_on_host(), stage)
                return self._finish(t, stage, buf, full, out)

            return self._prefetcher.submit(deferred)
        t, flat, stage, buf, full = self._prepare(table, ids, out, raw=raw)
        if flat.size < INLINE_BELOW:
            # A small request's bookkeeping (a few us, GIL-free) runs here: if every row is on
            # the device, the lookup is one gather and a hand-off to a worker would cost more
            # than all of it (~20 us for a bare submit + result); otherwise the worker moves
            # the bytes of the begun lookup.
            if t.on_device(flat, stage):
                return self._prefetcher.done(self._finish(t, stage, buf, full, out))
            lk = t.begin(flat, stage)  # on the CPU, an all-hit lookup is done by this call (the policy's all_hits + copy_rows)
            if lk.on_device:  # done by begin (CPU), or one gather
                try:
                    if not lk.done:
                        t.complete(lk, stage)
                    result = self._finish(t, stage, buf, full, out)
                except TierStoreError as e:
                    return self._prefetcher.failed(e)
                except Exception as e:  # same contract as LookupFuture.result(): errors are typed
                    return self._prefetcher.failed(TierStoreError(f"lookup failed: {type(e).__name__}: {e}"))
                return self._prefetcher.done(result)

            def rest() -> torch.Tensor:
                t.complete(lk, stage)
                return self._finish(t, stage, buf, full, out)

            try:
                return self._prefetcher.submit(rest)
            except BaseException:
                t.cancel(lk)
                raise

        def job() -> torch.Tensor:
            t.gather(flat, stage)
            return self._finish(t, stage, buf, full, out)

        return self._prefetcher.submit(job)

    def prefetch_many(self, requests: Mapping[str, IdLike]) -> LookupFuture[dict[str, torch.Tensor]]:
        """One call for several tables (an Engram layer reads all its tables at once); rows
        as :meth:`lookup` returns them (quantized tables dequantized). CUDA ids are read as in
        ``prefetch``: without waiting here."""
        if not isinstance(requests, Mapping):  # as ShardedStore.prefetch_many: one typed error
            raise TierStoreError(f"requests={type(requests).__name__} must be a mapping of table name to ids")
        prepared = {}
        for name, ids in requests.items():
            if isinstance(ids, torch.Tensor) and ids.is_cuda:  # never run: needs CUDA
                t = self._table(name)
                prepared[name] = (t, self._defer_cuda_ids(t, ids),
                                  *self._output(t, ids.numel(), tuple(ids.shape), None, False))
            else:
                prepared[name] = self._prepare(name, ids, None)

        def job() -> dict[str, torch.Tensor]:
            result = {}
            for name, (t, flat, stage, buf, full) in prepared.items():
                t.gather(flat() if callable(flat) else flat, stage)
                result[name] = self._finish(t, stage, buf, full)
            return result

        return self._prefetcher.submit(job)

    def lookup(self, table: str, ids: IdLike, out: torch.Tensor | None = None, *, raw: bool = False) -> torch.Tensor:
        """Rows ``ids`` of ``table``, shape ``ids.shape + (info.lookup_dim,)``, bit-identical to
        the checkpoint: ``prefetch(...).result()``, run in the calling thread (the caller waits
        anyway; a hand-off to a worker thread costs more than a 64K-row gather from memory).

        A quantized table (``store.tables[table].quant``, e.g. DeepSeek-V4.1's fp8 Engram
        tables) returns bfloat16 rows dequantized bit-exactly (``tierstore.format.quant``).
        raw: return the stored rows instead, uint8 ``ids.shape + (info.dim,)``: value bytes
            then scale bytes; ``tierstore.format.quant.split_rows`` views them as (values,
            scales). For other tables ``raw`` changes nothing.
        """
        t, flat, stage, buf, full = self._prepare(table, ids, out, copy=False, raw=raw)
        try:
            t.gather(flat, stage)
            return self._finish(t, stage, buf, full, out)
        except TierStoreError:
            raise
        except Exception as e:  # same contract as LookupFuture.result(): errors are typed
            raise TierStoreError(f"lookup failed: {type(e).__name__}: {e}") from e

    def hint(self, table: str, ids: IdLike) -> None:
        """Announce rows of ``table`` that a later lookup will read (queued requests, the next
        batch): the cache policy that uses hints (``default``) keeps them rather than others
        and admits them first. A lookup consumes a row's hint; a hint not used within the
        policy's horizon (``max(4 x capacity, 2**20)`` accesses, or ``policy_params=
        {"hint_horizon": n}``) expires. Lookups do not hint
        their own ids. Cheap and synchronous; bad ids raise as in ``lookup``."""
        # a decode step's hint, ~0.3 us of Python less: a known table name (else _table: closed
        # store, unknown name), and ids as the model keeps them, nothing for as_row_ids to do
        t = None if self._closed or type(table) is not str else self._tables.get(table)
        if t is None:
            t = self._table(table)
        # the range is checked inside the announcing compiled call (walk.announce_checked)
        if type(ids) is np.ndarray and ids.dtype is _INT64 and ids.ndim == 1 and ids.flags.c_contiguous:
            flat = ids
        else:
            flat, _ = as_row_ids(ids, t.info.rows, where=t.where, copy=False, check=False)
        t.hint(flat, t.where)

    def stats(self) -> dict[str, Any]:
        """Counters per tier (summed over tables) and per table.

        device/host: hits, misses, evictions, insertions, rows held, capacity_rows, bytes.
        pool: bytes and buffers held for reuse as lookup outputs (bounded by ``pool_bytes``).
        memory: the store's own memory, in bytes: each memory tier's slab (``device_slab``,
        ``host_slab``) and bookkeeping (``device_meta``, ``host_meta``: the indexes' policy state
        and row maps; also each tier's ``meta_bytes``, and ``meta_bytes_max``, the most it can
        grow to, which the tier's budget pays for: a tier's slots are what its budget holds at
        row bytes plus that bookkeeping), the disk tier's (``disk_meta``), the
        pooled outputs (``pool``) and their ``total`` (neither code nor a lookup's temporaries).
        The device tier counts every id; the host tier counts the unique ids that missed the
        device tier; disk counts rows, pages and bytes read, and names its device-bound page
        reader (``reader``: "posix" or "kvikio"; ``reader_mode``: the POSIX method, or kvikio's
        "gds", "cufile-compat" or "compat"; ``device_pages_read``: pages read straight into
        device memory). latency: prefetch lead time and caller stall time.
        open: what open loaded into the tiers (tierstore.tiers.hotset): ``rows_loaded``,
        where they came from (``from_source``: the host slab, ``from_snapshot``: the table's
        hot-set snapshot, ``from_rows``: the row file; ``source`` names them), ``bytes_read``
        and ``seconds``, summed and per tier (``open["device"]``, ``open["host"]``), and the
        snapshots' status (``snapshot``: "ok", "none", "stale", "ignored"; the reason per table).
        How warm the tiers are (``warm="background"``, tierstore.tiers.warm): ``mode``
        ("open"/"background"), ``placed`` rows, ``pending`` (placed slots still without their
        bytes: served from below meanwhile), ``warm`` (the fraction in place, 0 -> 1),
        ``on_demand`` (pending slots lookups filled first), ``loading`` (tiers the loader is
        still on); ``rows_loaded``, ``bytes_read`` and ``seconds`` are then the loader's so
        far, and per table ``snapshot_error`` / ``loader_error`` say why it left rows to lookups.
        """
        per_table = {name: t.stats() for name, t in self._tables.items()}
        agg: dict[str, dict[str, Any]] = {}
        for tier in ("device", "host", "disk"):
            first = next(iter(per_table.values()), {}).get(tier, {})
            keys = [k for k, v in first.items() if not isinstance(v, (bool, str))]
            agg[tier] = {k: sum(s[tier][k] for s in per_table.values()) for k in keys}
            for k in (k for k, v in first.items() if isinstance(v, str)):  # e.g. the disk reader: one name,
                agg[tier][k] = "/".join(sorted({str(s[tier][k]) for s in per_table.values()}))  # or all of them
            if tier != "disk":
                looked = agg[tier].get("hits", 0) + agg[tier].get("misses", 0)
                agg[tier]["hit_ratio"] = agg[tier].get("hits", 0) / looked if looked else 0.0
        agg["open"] = _sum_open([s["open"] for s in per_table.values()])
        pool = self._pool.stats()
        mem = {"device_slab": agg["device"].get("bytes", 0), "device_meta": agg["device"].get("meta_bytes", 0),
               "host_slab": agg["host"].get("bytes", 0), "host_meta": agg["host"].get("meta_bytes", 0),
               "disk_meta": agg["disk"].get("meta_bytes", 0), "pool": pool["bytes"]}
        return {**agg, "memory": {**mem, "total": sum(mem.values())}, "latency": self._prefetcher.latency.as_dict(),
                "pool": pool, "tables": per_table, "device_type": self.device.type}

    def reset_stats(self) -> None:
        for t in self._tables.values():
            t.reset_stats()
        self._prefetcher.latency.reset()

    def attachment(self, name: str) -> Path:
        """Path of a file attached at build time (e.g. 'config.json', 'tokenizer.json')."""
        if name not in self.manifest.attachments:
            raise TierStoreError(f"store {self.path} has no attachment {name!r}; it has {self.manifest.attachments}")
        return self.path / "attachments" / name

    def close(self) -> None:
        """Cancel queued prefetches, wait for running ones, release files, threads and shared
        segments. Idempotent. A store that is garbage collected unclosed is released too."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        _release(list(self._tables.values()), self._prefetcher, self._pool, True, self._warmer)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Store({str(self.path)!r}, tables={len(self.tables)}, device={self.device}, "
                f"device_budget={self.device_budget}, host_budget={self.host_budget}, policy={self.policy!r})")


open_store = Store  # `tierstore.open(path, ...)`: the constructor, documented on the class
_IS_A_ROWSTORE: type[RowStore] = Store  # checked statically: Store implements tierstore.RowStore
