"""One table served through its tiers: device cache -> host cache -> disk.

``Table.gather(ids, out)`` is the whole lookup of one batch:

1. device tier: map ids to slots (one vectorized index lookup), lease the hits;
2. the missed ids are deduplicated; the host tier serves what it holds, the disk tier
   reads the rest (whole pages, checksums verified);
3. rows read from disk are admitted into the host tier, rows that missed the device tier
   into the device tier, as their policies decide (the walk decides under the tiers' locks;
   the slots stay unreadable to others until the lookup ends);
4. the output is assembled on the store's device: hits gathered straight from the device
   slab, every other row copied to its slots and output positions as soon as it is here
   (on the CPU, rows from disk chunk by chunk while later chunks are still read:
   ``DiskTier.read(on_chunk=)``; the copies are compiled calls on the slabs' bytes,
   ``tiers.placement.move_cpu``, or with the shared host tier ``_Placer``); leases are released.

Costs: O(batch) index work plus one gather per tier; the sorts are the walk's dedup and
(``_Placer`` only) one stable argsort grouping output positions by row (``move_cpu`` groups
them by a counting sort in its compiled call).

On CUDA the bytes move by ``_move_cuda`` (never run: needs CUDA): the lookup's index arrays
go up in one pinned non-blocking copy (tiers.cuda.to_device); host hits are gathered by the
CPU into pinned memory and copied up, or, with ``zero_copy``, read by the GPU straight from
the pinned host slab; cold rows are read into pinned memory (POSIX) or straight into GPU
memory (kvikio) and the rows the host tier admitted are copied down to it; the device slab
orders its gathers and fills across streams with events (tiers.cuda.StreamFences). On the
CPU, ``_move``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache.layout import CACHED, FILL, HIT, NONE, RESIDENT
from ..cache.lookup import Lookup, Walker
from ..format.profile import Profile
from ..format.spec import TableInfo
from ..ranking import ranks_after
from ..ids import out_of_range
from ..tiers import CacheTier, DiskTier, SharedHostTier, Tier
from ..tiers.cuda import capacity_error, to_device
from ..tiers.early import EarlyCopy
from ..tiers.hotset import TableSnapshot
from ..tiers.placement import move_cpu
from ..tiers.warm import TierWarmth, loaded_slots, warm_steps

__all__ = ["Table"]

_INT64 = np.dtype(np.int64)  # `dtype is _INT64`: ~0.15 us less than `dtype == np.int64` per call (store.py too)


class _Locks:
    """Two locks taken in order (the device tier's, then the host tier's: the store's order)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __enter__(self) -> None:
        self.a.acquire()
        self.b.acquire()

    def __exit__(self, *exc: object) -> None:
        self.b.release()
        self.a.release()


class _Placer:
    """Where the rows below the device tier go, for one lookup (CPU path): given need
    indices ``j`` (into ``lk.need``) and their rows, write the rows the device tier admitted
    into its slots and scatter every row to its positions in the output (several when the
    ids repeat). Built once per lookup in O(ids); each call is O(its rows), so it may run
    chunk by chunk from the disk tier's overlap threads (disjoint ``j``, disjoint writes)."""

    def __init__(self, lk: Lookup, dev: Tier, out: torch.Tensor):
        self.dev, self.out = dev, out
        n, m = len(lk.d_code), lk.m
        below = np.flatnonzero(lk.d_code != HIT)  # output positions served from below the device tier
        src = lk.need_of[below]  # ... and the need index of each
        fill = np.flatnonzero(lk.d_code == FILL)
        self.d_slot_of = np.full(m, -1, dtype=np.int64)  # device slot admitted for need j, or -1
        self.d_slot_of[lk.need_of[fill]] = lk.d_slot[fill]
        self.any_fill = len(fill) > 0
        self.identity = len(below) == n == m and bool((src == np.arange(m)).all())  # out[i] <- need[i]
        if self.identity:
            return
        self.unique = len(src) == m  # every need index has exactly one output position
        by = np.argsort(src, kind="stable")  # output positions grouped by need index
        if self.unique:
            self.pos_of = below[by]  # output position of need j
            return
        self.pos = below[by]
        self.start = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.bincount(src, minlength=m), out=self.start[1:])

    def __call__(self, j: np.ndarray, rows: torch.Tensor, *, in_out: bool = False) -> None:
        """Place the rows of need indices ``j``. ``in_out``: they are already in ``out`` at
        their positions (identity lookups read straight into it)."""
        if self.any_fill:
            slots = self.d_slot_of[j]
            k = np.flatnonzero(slots >= 0)
            if len(k):
                self.dev.write(slots[k], rows.index_select(0, torch.from_numpy(k)))
        if in_out:
            return
        out = self.out
        if self.identity:
            out.index_copy_(0, torch.from_numpy(j), rows)
        elif self.unique:
            out.index_copy_(0, torch.from_numpy(self.pos_of[j]), rows)
        else:
            lo, hi = self.start[j], self.start[j + 1]
            cnt = hi - lo
            total = int(cnt.sum())
            each = np.repeat(np.arange(len(j)), cnt)  # row k of `rows` once per output position
            flat = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt) + np.arange(total)
            out.index_copy_(0, torch.from_numpy(self.pos[flat]), rows.index_select(0, torch.from_numpy(each)))


_PARALLEL_TIERS = 1 << 16  # slots in each tier from which their indexes are built in two threads


def host_after_device(device: torch.device, host_shared: bool, exclusive: bool, warm: str = "open") -> bool:
    """Whether the host tier places the profile's ranks after the device tier's
    (``StoreOptions.exclusive``, which the options allow only where both tiers are plain
    memory of this process and load at open: a CPU device tier, a host tier of its own,
    ``warm="open"``; ``warm="background"``'s loader and a CUDA device tier fill the device
    tier from the host slab, so there the host tier keeps the top ranks).

    Placed from rank 0 the host tier holds the device tier's rows again: on a CPU store at
    device 512 MiB and host 1 GiB (docs/benchmarks.md), a third of the memory held copies the
    walk never reads (a row the device tier holds is never looked up below it), and the
    profile's ranks 1 to 1.5 GiB were left on disk. Off by default: it read a third more
    snapshot at open and did not make the decode step measurably faster (the same page)."""
    return bool(exclusive) and device.type == "cpu" and not host_shared and warm == "open"


def _both_tiers(host, device, *, parallel: bool) -> tuple[Tier, Tier]:
    """(host(), device()): the host tier built on a second thread while this one builds the
    device tier when ``parallel`` (open's index build is most of a background open, issue
    19). A failure of either is raised once both have ended, and a tier that was built is
    closed first, so nothing it holds (a pinned registration) is left behind."""
    if not parallel:
        h = host()
        try:
            return h, device()
        except BaseException:
            h.close()
            raise
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-open") as pool:
        fut = pool.submit(host)
        try:
            d = device()
        except BaseException:
            exc = fut.exception()
            if exc is None:
                fut.result().close()
            raise
    try:
        return fut.result(), d
    except BaseException:
        d.close()
        raise


class Table:
    """One table's lookups through its tiers. The tiers are built here (which class serves
    the host tier is the one choice made by class); after that every tier is a ``Tier``
    (tierstore.tiers.base) and only its ``kind`` decides the path."""

    def __init__(
        self,
        root: Path,
        info: TableInfo,
        *,
        device: torch.device,
        device_rows: int,
        host_rows: int,
        policy: str,
        profile: Profile | None = None,
        direct: bool | None = None,
        io_threads: int | None = None,
        host_shared: bool = False,
        build_id: str = "",
        pinned_build: str | None = None,
        zero_copy: bool = False,
        disk_reader: str = "auto",
        timeout: float = 60.0,
        snapshot: tuple[TableSnapshot | None, str] | None = None,
        warm: str = "open",
        exclusive: bool = False,
    ):
        self.info = info
        self.where = f"table {info.name!r}"  # how errors about its ids name it
        self.snapshot_status = "none"  # the hot-set snapshot at open: "none", "ok", "stale: ...", "ignored: ..."
        self.device = device
        self.cuda = device.type == "cuda"
        self.zero_copy = zero_copy and self.cuda  # the GPU reads host-tier rows from pinned memory itself
        self.disk: Tier = DiskTier(root, info, direct=direct, threads=io_threads, device=device,
                                   device_reader=disk_reader, build_id=pinned_build)
        self.host: Tier | None = None
        self.dev: Tier | None = None
        # warm="background": the placed slots still waiting for their bytes, per cached tier
        # (tiers.warm), the snapshot the loader reads (this table closes it), and the
        # rerouted device hits of lookups in flight (id(lookup) -> (positions, slots, rows, host bytes))
        self.warmth: dict[str, TierWarmth] = {}
        self.warm_snapshot: TableSnapshot | None = None
        self._cold = False  # a placed slot is still pending: begin reroutes hits on pending slots
        self._reroutes: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, torch.Tensor]] = {}
        # the table's hot-set snapshot, open while the tiers load (a profile places their rows):
        # ``snapshot``, (the snapshot or None, its status), when the caller opened it already
        snap = snapshot[0] if snapshot is not None else None
        try:
            if snapshot is not None:
                self.snapshot_status = snapshot[1]
            elif profile is not None and host_rows + device_rows > 0:
                snap, self.snapshot_status = TableSnapshot.open(root, info, build_id, direct=direct)
            pinned = dict(pin=self.cuda, zero_copy=self.zero_copy, zero_copy_device=device)
            # exclusive (``host_after_device``): the host tier ranks from where the device tier's
            # placement ends
            host_profile = ranks_after(profile, device_rows, info.rows) if exclusive else profile
            if host_shared and host_rows > 0:
                self.host = SharedHostTier(root, info, host_rows, self.disk, profile=profile, build_id=build_id,
                                           timeout=timeout, snapshot=snap, **pinned)
                if self.host.open_stats.snapshot_error:  # damaged: the device tier does without
                    self._drop(snap, self.host.open_stats.snapshot_error)
                self.dev = CacheTier("device", info, device_rows, device=device, policy=policy, profile=profile)
            else:  # the two tiers' indexes are built at once (compiled kernels without the GIL)
                # warm="open": the host tier reads its snapshot rows while the indexes are built,
                # and the device tier's rows are copied from the host slab as they are checked
                early = warm == "open" and snap is not None
                # exclusive tiers: the host slab does not hold the device tier's rows to copy
                feed = EarlyCopy() if early and host_profile is profile else None
                self.host, self.dev = _both_tiers(
                    lambda: CacheTier("host", info, host_rows, device=torch.device("cpu"), **pinned, policy=policy,
                                      profile=host_profile, snapshot=snap if early else None, feed=feed),
                    lambda: CacheTier("device", info, device_rows, device=device, policy=policy, profile=profile,
                                      fed_by=feed),
                    parallel=min(host_rows, device_rows) >= _PARALLEL_TIERS)
            if warm == "background":
                self._preload_resident(snap)
            else:
                self._preload(snap)
            self._walker = Walker(self.dev.index, self.dev.kind, self.host.index, self.host.kind)
            # the device slab's bytes, for the walk to copy all-hit lookups itself (CPU only:
            # on CUDA the slab is GPU memory and the gather a kernel on a stream)
            self._dev_bytes = (self.dev.slab.view(torch.uint8).numpy()
                               if self.dev.kind == CACHED and self.dev.slab.device.type == "cpu" else None)
            # ... and the host slab's, for ``_move``'s compiled placement (tiers.placement): a
            # host tier of ours in plain memory (not the read-only shared one, which arrives filled)
            self._host_bytes = (self.host.slab.view(torch.uint8).numpy()
                                if self._dev_bytes is not None and not self.host.arrives_filled
                                and self.host.slab.device.type == "cpu" and self.host.slab.is_contiguous()
                                else None)
            # when a list: every lookup's start (its ids) and end, and every hint, in the order
            # the tiers saw them: concurrent lookups overlap, and a row another lookup is still
            # filling is read from below (tierstore.analysis.simulate.replay_events replays them exactly)
            self.events: list[tuple] | None = None
        except BaseException:  # a failed open must not keep the row file or a shared segment
            self.close()
            raise
        finally:
            if snap is not None and snap is not self.warm_snapshot:
                snap.close()

    # -- loading ----------------------------------------------------------------------------
    def _preload(self, snap: TableSnapshot | None) -> None:
        """Fill resident tiers with the whole table (the device tier from the host tier when
        that holds it) and caches with their placed hot set: from the host slab, the table's
        hot-set snapshot ``snap`` (tierstore.format.snapshot) or the row file
        (tierstore.tiers.hotset); counters start at zero."""
        self.host.preload(self.disk, snapshot=snap)
        if snap is not None and self.host.open_stats.snapshot_error:  # damaged: the device tier does without
            self._drop(snap, self.host.open_stats.snapshot_error)
        self.dev.preload(self.disk, self.host, snapshot=snap)
        if self.dev.open_stats.snapshot_error:
            self._drop(snap, self.dev.open_stats.snapshot_error)
        if self.cuda:  # never run: needs CUDA. The preloads' copies have run before any stream reads
            torch.cuda.current_stream(self.device).synchronize()
        self.disk.reset_stats()
        self.disk.release_buffers()  # open's reads ran on this thread, which may never read again

    def _preload_resident(self, snap: TableSnapshot | None) -> None:
        """warm="background": resident tiers load now, as for "open"; a cache tier's placed
        rows are marked pending (``TierWarmth``) for the loader (``warm_jobs``) and lookups."""
        for name, tier, source in (("host", self.host, None), ("device", self.dev, self.host)):
            if tier.kind == CACHED and not tier.arrives_filled and (tier.index.row_of_slot >= 0).any():
                self.warmth[name] = TierWarmth(tier)
                tier.open_stats = self.warmth[name].stats
            else:  # resident, nothing placed, or the shared host tier (filled by its constructor)
                tier.preload(self.disk, source, snapshot=snap)
                if snap is not None and tier.open_stats.snapshot_error:
                    self._drop(snap, tier.open_stats.snapshot_error)
        self._cold = bool(self.warmth)
        if self._cold and snap is not None and not snap.dropped:
            self.warm_snapshot = snap  # kept open for the loader; warm_jobs' end closes it
        if self.cuda:  # never run: needs CUDA
            torch.cuda.current_stream(self.device).synchronize()
        self.disk.reset_stats()
        self.disk.release_buffers()  # open's reads ran on this thread, which may never read again

    def warm_job(self):
        """The background load of this table's cache tiers (a generator: one step per
        ``next``; the store's loader thread, serve/warm.py, runs it): the host tier, then the
        device tier from the host slab (tiers.warm). Closes the snapshot when it ends."""
        try:
            host_w, dev_w = self.warmth.get("host"), self.warmth.get("device")
            both = _Locks(self.dev.lock, self.host.lock)
            if host_w is not None:
                yield from warm_steps(self.host, host_w, disk=self.disk, locked=lambda: self.host.lock,
                                      snapshot=self.warm_snapshot)
                if host_w.stats.snapshot_error:
                    self._drop(self.warm_snapshot, host_w.stats.snapshot_error)
            if dev_w is not None:
                yield from warm_steps(self.dev, dev_w, disk=self.disk, locked=lambda: both, source=self.host,
                                      source_warmth=host_w, snapshot=self.warm_snapshot)
                if dev_w.stats.snapshot_error:
                    self._drop(self.warm_snapshot, dev_w.stats.snapshot_error)
        finally:
            if self.warm_snapshot is not None:
                self.warm_snapshot.close()

    def _drop(self, snap: TableSnapshot | None, error: str) -> None:
        """A snapshot page failed its check while loading: the rest of the open does without it."""
        self.snapshot_status = f"ignored: {error}"
        if snap is not None:
            snap.drop()

    def open_stats(self) -> dict[str, Any]:
        """What open loaded: per tier (rows and their sources, bytes read, seconds), summed,
        and the snapshot's status."""
        tiers = {name: t.open_stats.as_dict() for name, t in (("device", self.dev), ("host", self.host))}
        total: dict[str, Any] = {k: sum(d[k] for d in tiers.values())
                                 for k in ("rows_loaded", "from_source", "from_snapshot", "from_rows", "bytes_read",
                                           "seconds", "placed", "pending", "on_demand", "loading")}
        total["warm"] = 1.0 - total["pending"] / total["placed"] if total["placed"] else 1.0
        total["mode"] = "background" if self.warmth else "open"
        sources = [d["source"] for d in tiers.values() if d["source"] != "none"]
        total["source"] = "+".join(dict.fromkeys(p for s in sources for p in s.split("+"))) or "none"
        return {**total, "snapshot": self.snapshot_status, **tiers}

    # -- lookup ---------------------------------------------------------------------------
    def gather(self, ids: np.ndarray, out: torch.Tensor) -> None:
        """Fill ``out`` (len(ids), dim) on the store's device with the rows ``ids`` (int64, validated).

        The bookkeeping of both cache tiers is one compiled call (``begin``). On the CPU, when
        the device tier serves every id, that is its policy's ``all_hits`` (the accesses,
        walk.all_hits_with with the policy's ``hit`` inlined), followed by
        ``walk.copy_rows``, and the lookup has ended. Otherwise it is ``walk.walk_entry`` (the
        very walk the simulator replays) and ``complete`` moves the
        bytes: host/disk -> staged rows -> the slots the walk admitted them to -> ``out``,
        then ends the lookup.
        """
        if self.on_device(ids, out):
            return
        lk = self.begin(ids, out)
        if not lk.done:
            self.complete(lk, out)

    def on_device(self, ids: np.ndarray, out: torch.Tensor) -> bool:
        """The resident fast paths: if a slab holding the whole table serves ``ids``, fill
        ``out`` from it (one ``index_select``, no bookkeeping) and return True."""
        dkind, hkind = self._walker.dkind, self._walker.hkind
        if dkind == RESIDENT:  # the device slab is the table
            self.dev.gather(ids, out.view(self.info.raw_dtype))
            return True
        if dkind == NONE and hkind == RESIDENT and not self.cuda:  # the host slab is the table
            self.host.gather(ids, out.view(self.info.raw_dtype))
            return True
        if dkind == NONE and hkind == RESIDENT and self.zero_copy:  # never run: needs CUDA
            self.host.gather_to_device(to_device([ids], self.device)[0], out.view(self.info.raw_dtype))
            return True  # the GPU gathers from the pinned host table (UVA), nothing staged
        return False

    def begin(self, ids: np.ndarray, out: torch.Tensor | None = None) -> Lookup:
        """A lookup's bookkeeping in both cache tiers (one compiled call, GIL-free, under both
        tier locks). Its leases hold until ``complete`` (or ``cancel``) ends it. With ``out``
        (CPU only): when every row is in the device tier the same call copies them into
        ``out`` and ends the lookup (``lk.done``: nothing left to complete)."""
        if ids.dtype != np.int64 or not ids.flags.c_contiguous:
            ids = np.ascontiguousarray(ids, dtype=np.int64)
        dst = None
        if out is not None and self._dev_bytes is not None and out.shape[0] == ids.size:
            dst = out.view(torch.uint8).numpy()  # the rows' bytes: one walk specialization for every dtype
        with self.dev.lock, self.host.lock:  # always in this order (Table.hint too)
            if self._cold:
                self._cold = any(w.left for w in self.warmth.values())
            if self._cold:  # warm="background" and a placed slot still waits: no all-hit copy
                lk = self._walker.begin(ids)
                self._reroute(ids, lk)
            else:
                lk = self._walker.begin(ids, self._dev_bytes, dst)
            if self.events is not None:  # the lookup starts; it ends (below) when its bytes are moved
                self.events.append(("lookup", ids.copy(), id(lk)))
                if lk.done:  # ended at once: every row was copied from the device slab
                    self.events.append(("end", True, id(lk)))
        return lk

    def _reroute(self, ids: np.ndarray, lk: Lookup) -> None:
        """Hits on slots still pending (tiers.warm, rule 1), under both tier locks: a host hit
        becomes a FILL (read from the row file, written into its slot); a device hit is
        noted with its bytes from the host slab where it holds them loaded (copied now) and
        written into its device slot and ``out`` by ``complete``, the rest read from disk."""
        hw, dw = self.warmth.get("host"), self.warmth.get("device")
        m = lk.m
        if hw is not None and hw.left and m:
            hs, hc = lk.h_slot[:m], lk.h_code[:m]
            hit = np.flatnonzero(hc == HIT)
            hc[hit[hw.pending[hs[hit]] != 0]] = FILL
        if dw is not None and dw.left:
            pos = np.flatnonzero(lk.d_code == HIT)
            pos = pos[dw.pending[lk.d_slot[pos]] != 0]
            if len(pos):
                rows = ids[pos]
                hs = loaded_slots(self.host, hw, rows)
                got = np.flatnonzero(hs >= 0)
                data = self.host.gather(hs[got]) if len(got) else torch.empty(0)
                self._reroutes[id(lk)] = (pos, lk.d_slot[pos].copy(), rows, got, data)

    def _fill_rerouted(self, lk: Lookup, out: torch.Tensor) -> None:
        """The device hits ``_reroute`` noted: their rows (host bytes copied at begin, the rest
        from disk) into ``out`` and their device slots."""
        noted = self._reroutes.get(id(lk))
        if noted is None:
            return
        pos, slots, rows, got, data = noted
        info = self.info
        rows_in = torch.empty((len(pos), info.dim), dtype=info.raw_dtype)
        if len(got):
            rows_in[torch.from_numpy(got)] = data
        rest = np.ones(len(pos), bool)
        rest[got] = False
        if rest.any():
            idx = np.flatnonzero(rest)
            uniq, inv = np.unique(rows[idx], return_inverse=True)
            read = self.disk.gather(uniq, torch.empty((len(uniq), info.dim), dtype=info.raw_dtype,
                                                      device=self.disk.device))
            rows_in[torch.from_numpy(idx)] = read.cpu()[torch.from_numpy(inv.reshape(-1))]
        on = rows_in.to(self.device)
        self.dev.write(slots, on)
        out.index_copy_(0, torch.from_numpy(pos).to(out.device), on)

    def complete(self, lk: Lookup, out: torch.Tensor) -> None:
        """Move the bytes of a begun lookup into ``out`` and end it (its FILL slots are
        written; after an error they are dropped and the error re-raised)."""
        if lk.done:  # begin copied every row and ended it
            return
        out = out.view(self.info.raw_dtype)  # move bits, not values
        ok = False
        try:
            if self.cuda:
                self._move_cuda(lk, out)
            else:
                self._move(lk, out)
            if self._reroutes:
                self._fill_rerouted(lk, out)
            ok = True
        except torch.OutOfMemoryError as e:  # never run: needs CUDA (a CPU allocation failure is a RuntimeError)
            raise capacity_error(e, self.device, f"looking up {len(lk.d_slot)} rows of table {self.info.name!r}") \
                from None
        finally:
            self._end(lk, ok)

    def _move(self, lk: Lookup, out: torch.Tensor) -> None:
        """The CPU path: device hits gathered into ``out``; every row below the device tier
        placed (into the device slots the walk admitted it to, and into its positions of
        ``out``) as soon as it is here: host hits at once, rows from disk chunk by chunk as
        the disk tier's reads of them finish (``DiskTier.read``'s ``on_chunk``), so the
        copies overlap the reads of later chunks instead of following the last one. With
        the device and host slabs in plain memory (``_host_bytes``) that is
        ``tiers.placement.move_cpu``: one compiled call for the hits, one per disk chunk;
        otherwise (the shared host tier) the numpy/torch calls below (``_Placer``)."""
        dev, host = self.dev, self.host
        d_slot, d_code, m = lk.d_slot, lk.d_code, lk.m
        if m == 0:  # every row on the device: one gather
            dev.gather(d_slot, out)
            return
        if self._host_bytes is not None and out.is_contiguous():  # two compiled calls + one per disk chunk
            hits = move_cpu(lk, self._dev_bytes, self._host_bytes, out, self.disk)
            if host.kind == RESIDENT:
                host.resident_hits += hits  # as host.gather counts them
            return
        need, h_slot, h_code = lk.need[:m], lk.h_slot[:m], lk.h_code[:m]
        place = _Placer(lk, dev, out)
        h_hit = h_code == HIT
        cold = np.flatnonzero(~h_hit)  # need indices read from disk
        h_fill = h_code[cold] == FILL  # ... which the host tier admitted (per cold row)
        direct = place.identity and len(cold) == m  # out[i] is row need[i]: read straight into out

        def arrived(sel: np.ndarray, rows: torch.Tensor) -> None:  # a chunk of cold rows is here
            fill = np.flatnonzero(h_fill[sel])
            if len(fill):
                host.write(h_slot[cold[sel[fill]]], rows.index_select(0, torch.from_numpy(fill)))
            place(cold[sel], rows, in_out=direct)

        hit_pos = np.flatnonzero(d_code == HIT)
        if len(hit_pos):
            out.index_copy_(0, torch.from_numpy(hit_pos), dev.gather(d_slot[hit_pos]))
        hits = np.flatnonzero(h_hit)
        if len(hits):
            place(hits, host.gather(h_slot[hits]))
        if len(cold):
            dst = out if direct else torch.empty((len(cold), self.info.dim), dtype=self.info.raw_dtype)
            self.disk.read(need[cold], dst, on_chunk=arrived)

    def _move_cuda(self, lk: Lookup, out: torch.Tensor) -> None:
        """The CUDA path (module docstring), on the current stream (a worker's side stream,
        or the caller's for a lookup done in its thread). Never run: needs CUDA."""
        dev, host, info = self.dev, self.host, self.info
        d_slot, d_code, need_of, m = lk.d_slot, lk.d_code, lk.need_of, lk.m
        if m == 0:  # every row on the device: one gather
            dev.gather(to_device([d_slot], self.device)[0], out)
            return
        need, h_slot, h_code = lk.need[:m], lk.h_slot[:m], lk.h_code[:m]
        h_hit = h_code == HIT
        hit_pos, cold_pos = np.flatnonzero(h_hit), np.flatnonzero(~h_hit)
        fill = np.flatnonzero(d_code == FILL)
        d_hit = np.flatnonzero(d_code == HIT)
        below = np.flatnonzero(d_code != HIT)
        zc = self.zero_copy and len(hit_pos) > 0
        (i_hit, i_cold, i_hslot, i_fill_slot, i_fill_src, i_dhit, i_dhit_slot, i_below, i_below_src) = to_device(
            [hit_pos, cold_pos, h_slot[hit_pos] if zc else hit_pos[:0], d_slot[fill], need_of[fill], d_hit,
             d_slot[d_hit], below, need_of[below]], self.device)  # one pinned buffer, one copy

        staged = torch.empty((m, info.dim), dtype=info.raw_dtype, device=self.device)  # the rows `need`
        if len(hit_pos):
            if zc:  # the GPU reads them from the pinned host slab
                hits = host.gather_to_device(i_hslot, torch.empty((len(hit_pos), info.dim), dtype=info.raw_dtype,
                                                                  device=self.device))
            else:  # the CPU gathers them into pinned memory, one copy up
                pinned = torch.empty((len(hit_pos), info.dim), dtype=info.raw_dtype, pin_memory=True)
                hits = host.gather(h_slot[hit_pos], pinned).to(self.device, non_blocking=True)
            staged.index_copy_(0, i_hit, hits)
        if len(cold_pos):
            # straight into GPU memory (kvikio) or into pinned host memory (POSIX)
            on_host = self.disk.device.type == "cpu"
            cold = self.disk.gather(need[cold_pos], torch.empty((len(cold_pos), info.dim), dtype=info.raw_dtype,
                                                                device=self.disk.device, pin_memory=on_host))
            h_fill = np.flatnonzero(h_code == FILL)
            if len(h_fill):  # rows the host tier admitted must be in host memory before the lookup ends
                src = np.searchsorted(cold_pos, h_fill)
                admitted = cold.index_select(0, torch.from_numpy(src)) if on_host else \
                    cold.index_select(0, to_device([src], self.device)[0]).cpu()  # one copy down (waits)
                host.write(h_slot[h_fill], admitted)
            staged.index_copy_(0, i_cold, cold.to(self.device, non_blocking=True))
        if len(fill):  # rows the device tier admitted: write their slots (fenced against other streams)
            dev.write(i_fill_slot, staged.index_select(0, i_fill_src))
        if len(d_hit):
            out.index_copy_(0, i_dhit, dev.gather(i_dhit_slot))
        out.index_copy_(0, i_below, staged.index_select(0, i_below_src))

    def cancel(self, lk: Lookup) -> None:
        """End a begun lookup whose bytes will never be moved (its admitted rows are dropped)."""
        self._end(lk, False)

    def _end(self, lk: Lookup, ok: bool) -> None:
        # the lookup ends: its FILL slots hold their bytes now (or, after an error, are dropped)
        with self.dev.lock, self.host.lock:
            noted = self._reroutes.pop(id(lk), None)
            if ok and self.warmth and self._cold:  # the slots this lookup wrote hold their bytes now
                hw, dw = self.warmth.get("host"), self.warmth.get("device")
                if hw is not None and lk.m:
                    hw.clear(lk.h_slot[:lk.m][lk.h_code[:lk.m] == FILL])
                if dw is not None:
                    dw.clear(lk.d_slot[lk.d_code == FILL])
                    if noted is not None:
                        dw.clear(noted[1])
                self._cold = any(w.left for w in self.warmth.values())
            self._walker.end(lk, ok)
            if self.events is not None:
                self.events.append(("end", ok, id(lk)))

    def hint(self, ids: np.ndarray, where: str | None = None) -> None:
        """Announce rows a later lookup will read (the known future). Each tier hears only
        what it can act on: the device tier every id, the host tier only the ids the device
        tier does not hold now (it sees nothing else, so other hints would never be used).
        ``where``: the ids' range is not checked yet; the announcing call checks it and
        raises ``InvalidIdError`` naming ``where``, having announced nothing."""
        if ids.dtype is not _INT64 or not ids.flags.c_contiguous:  # `is`: ~0.15 us less than `!=` np.int64
            ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self.dev.lock, self.host.lock:
            pos = self._walker.announce(ids, -1 if where is None else self.info.rows)
            if pos >= 0:
                raise out_of_range(ids, pos, self.info.rows, where)
            if self.events is not None:
                self.events.append(("hint", ids.copy()))

    def stats(self) -> dict[str, dict[str, float]]:
        return {"device": self.dev.stats(), "host": self.host.stats(), "disk": self.disk.stats(),
                "open": self.open_stats()}

    def reset_stats(self) -> None:
        self.dev.reset_stats()
        self.host.reset_stats()
        self.disk.reset_stats()

    def close(self) -> None:
        if self.warm_snapshot is not None:  # the loader has stopped (the store joined it first)
            self.warm_snapshot.close()
        for tier in (self.dev, self.host, self.disk):  # a failed open may have built only some
            if tier is not None:
                tier.close()
