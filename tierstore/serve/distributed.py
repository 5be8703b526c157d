"""Tables sharded across the ranks of a torch.distributed process group.

Each rank owns rows ``rank::world_size`` of every table (round-robin by row id) and serves
them from its own local store with its own tiers. Engram row ids are hashes, so
round-robin spreads both the rows and the traffic evenly; a hot row cannot overload its
owner because every rank deduplicates its ids before asking, so the owner serves a row at
most once per rank per lookup, whatever the skew.

A lookup is collective (SPMD, like a model-parallel embedding): every rank calls
``prefetch``/``lookup`` for the same tables in the same order, each with its own ids.

    1. ids -> unique ids; owner = id % W, local id = id // W
    2. all_to_all(counts), all_to_all(local ids)        -- who needs what from whom
    3. each rank looks the requested rows up in its local store (device/host/disk tiers)
    4. all_to_all(rows)                                 -- rows back to the askers
    5. the unique rows are scattered to the output       -- duplicates cost no traffic

Collectives run on one background thread per store, in issue order, so ``prefetch``
returns a future at once and fits the model's prefetch-then-wait pattern. They use their
own process group with a short timeout: a rank that dies makes the others fail with a
``TierStoreError`` naming the cause instead of hanging. gloo on CPU, NCCL on GPU (ids
and rows are then exchanged as CUDA tensors).

Build: every rank runs ``build_shard(checkpoint, out, rank, world_size)`` and writes only
``out/shard-RRRRR-of-WWWWW`` (rows ``rank::world_size`` of each table), atomically.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..format.build import build_store
from ..errors import TierStoreError
from ..format.spec import TableInfo
from .prefetcher import LatencyStats, LookupFuture
from ..ids import IdLike, as_row_ids
from .store import Store
from .table import find_table

__all__ = ["shard_dir", "build_shard", "ShardedStore", "open_sharded"]


def shard_dir(out: str | os.PathLike[str], rank: int, world_size: int) -> Path:
    return Path(out) / f"shard-{rank:05d}-of-{world_size:05d}"


def build_shard(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], rank: int, world_size: int,
                **kwargs: Any) -> Path:
    """Write this rank's shard of a sharded store (rows ``rank::world_size`` of every table).

    Keyword arguments are those of ``tierstore.build_store`` (tables, force, dtype, progress,
    attach). Each shard is built atomically on its own; ranks need not coordinate.
    """
    return build_store(checkpoint, shard_dir(out, rank, world_size), shard=(rank, world_size), **kwargs)


class ShardedStore:
    """The rows of every table spread over the ranks of ``group``; same lookup API as ``Store``.

    Not for concurrent use from several threads of one rank: lookups are collectives and
    must be issued in the same order on every rank.
    """

    def __init__(self, path: str | os.PathLike[str], *, group: dist.ProcessGroup | None = None,
                 timeout: float = 60.0, **store_kwargs: Any):
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
        store_kwargs.setdefault("device", self.comm_device)
        self.local = Store(local_path, **store_kwargs)
        self.device = self.local.device
        self.tables: dict[str, TableInfo] = {}
        for name, info in self.local.tables.items():
            shard = info.source.get("shard")
            if not shard or shard["rank"] != self.rank or shard["world_size"] != self.world_size:
                raise TierStoreError(f"{local_path}: table {name!r} is not shard {self.rank} of {self.world_size}")
            self.tables[name] = TableInfo(**{**info.__dict__, "rows": shard["global_rows"]})
        self.latency = LatencyStats()
        self._exec = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-dist")
        self._lock = threading.Lock()
        self.ids_requested = 0  # ids asked for by this rank (with duplicates)
        self.ids_sent = 0  # unique ids this rank sent to owners (its own rows included)
        self.rows_served = 0  # rows this rank served to others (and itself)
        self.bytes_sent = 0  # ids + rows this rank put on the wire to other ranks
        self.bytes_received = 0

    # -- API ---------------------------------------------------------------------------------
    def prefetch(self, table: str, ids: IdLike, out: torch.Tensor | None = None) -> LookupFuture[torch.Tensor]:
        info = self._info(table)
        flat, shape = as_row_ids(ids, info.rows, where=f"table {info.name!r}")
        full = shape + (info.dim,)
        if out is not None and (tuple(out.shape) != full or out.dtype != info.torch_dtype or not out.is_contiguous()):
            raise TierStoreError(f"out= must be a contiguous {info.torch_dtype} tensor of shape {full}")

        def job() -> tuple[torch.Tensor, None]:
            rows = self._exchange(table, info, flat)
            result = rows.view(info.torch_dtype).view(full)
            if out is not None:
                out.copy_(result)
                result = out
            return result, None

        return LookupFuture(self._exec.submit(job), self.latency)

    def lookup(self, table: str, ids: IdLike, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.prefetch(table, ids, out).result()

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

    # -- the exchange ------------------------------------------------------------------------
    def _info(self, table: str) -> TableInfo:
        return find_table(self.tables, table, "the sharded store")

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int] | None = None,
             in_splits: Sequence[int] | None = None) -> None:
        try:
            dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                   group=self.group)
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses for dead or hung peers
            raise TierStoreError(
                f"rank {self.rank}: sharded lookup failed in all_to_all ({type(e).__name__}: {e}); "
                "a peer rank may have died, hung past the timeout, or issued lookups in a different order"
            ) from e

    def _exchange(self, table: str, info: TableInfo, flat: np.ndarray) -> torch.Tensor:
        W, dev = self.world_size, self.comm_device
        uniq, inv = np.unique(flat, return_inverse=True)
        owner = uniq % W
        order = np.argsort(owner, kind="stable")
        send_ids = torch.from_numpy(uniq[order] // W)
        send_counts = torch.from_numpy(np.bincount(owner, minlength=W).astype(np.int64))
        recv_counts = torch.empty(W, dtype=torch.int64, device=dev)
        self._a2a(recv_counts, send_counts.to(dev))
        recv_counts_l = recv_counts.cpu().tolist()
        send_counts_l = send_counts.tolist()
        recv_ids = torch.empty(sum(recv_counts_l), dtype=torch.int64, device=dev)
        self._a2a(recv_ids, send_ids.to(dev), recv_counts_l, send_counts_l)
        # serve what the others asked of us from our local tiers: one batched lookup of the stored
        # rows (raw: a quantized table's stay quantized on the wire) through the local store's
        # public API, on this thread (it also range-checks the ids peers sent)
        served = torch.empty((len(recv_ids), info.dim), dtype=info.torch_dtype, device=self.local.device)
        self.local.lookup(table, recv_ids.cpu().numpy(), out=served, raw=True)
        row_bytes = info.row_bytes
        # rows travel as the widest integers dividing a row (gloo has no int16; fewer elements)
        wide = torch.int64 if row_bytes % 8 == 0 else torch.int32 if row_bytes % 4 == 0 else torch.uint8
        served_w = served.view(torch.uint8).view(wide).view(len(recv_ids), -1)
        got = torch.empty((len(uniq), row_bytes // wide.itemsize), dtype=wide, device=dev)
        self._a2a(got, served_w.to(dev), send_counts_l, recv_counts_l)  # splits count rows (dim 0)
        with self._lock:
            me = self.rank
            self.ids_requested += len(flat)
            self.ids_sent += len(uniq)
            self.rows_served += len(recv_ids)
            self.bytes_sent += 8 * (len(uniq) - send_counts_l[me]) + row_bytes * (len(recv_ids) - recv_counts_l[me])
            self.bytes_received += 8 * (len(recv_ids) - recv_counts_l[me]) + row_bytes * (len(uniq) - send_counts_l[me])
        # got holds the unique rows in owner order: unique row u arrived at position where[u]
        where = np.empty(len(uniq), dtype=np.int64)
        where[order] = np.arange(len(uniq), dtype=np.int64)
        idx = torch.from_numpy(where[inv.reshape(-1)]).to(dev)
        return got.index_select(0, idx).view(torch.uint8).view(info.raw_dtype).view(len(flat), info.dim)


def open_sharded(path: str | os.PathLike[str], *, group: dist.ProcessGroup | None = None, timeout: float = 60.0,
                 **store_kwargs: Any) -> ShardedStore:
    """Open this rank's shard of the sharded store at ``path`` (collective: every rank calls it).

    store_kwargs go to the local ``Store`` (device, device_budget, host_budget, policy, ...);
    budgets are per rank.
    """
    return ShardedStore(path, group=group, timeout=timeout, **store_kwargs)
