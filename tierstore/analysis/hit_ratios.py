"""Hit ratios of cache policies on a recorded trace (``tierstore profile``).

:func:`traced_tables` puts together what a run needs to know about each traced table:
its size (from the store, the trace, or the trace's distinct ids), its row size, and the
profile that ranks rows for ``static`` and ``default`` (taken from *other* text, or the
store's saved one). Then, per table:

- :func:`policy_hit_ratios`: every policy at every capacity (one tier), next to the
  offline optimum;
- :func:`two_tier_hit_ratios`: a device tier over a host tier, and the bytes each moves;
- :func:`live_hit_ratios`: the same flow through a real opened store, its counters next
  to the simulation's (they agree by construction: both run the same compiled walk).

The results are plain dicts, the fields ``tierstore profile --json`` prints.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cache.index import budget_for
from ..cache.policy import Policy
from ..cache.registry import POLICIES
from ..errors import TierStoreError
from ..ids import as_row_ids, distinct
from ..format.profile import TopProfile, load_profile
from ..format.recovery import recover
from .direct import DIRECT_POLICIES, direct_trace, ranked as with_ranking
from .simulate import TableTrace, Trace, batch_bounds, simulate, simulate_tiers

__all__ = ["TracedTable", "traced_tables", "distinct_ids", "replay_semantics", "policy_hit_ratios",
           "two_tier_hit_ratios", "live_hit_ratios"]


@dataclass
class TracedTable:
    """One table of a trace and what a hit-ratio run knows about it."""

    name: str  # the trace's name of the table (a .npy trace's one table is "trace")
    trace: TableTrace
    n_rows: int  # table rows, or the trace's distinct ids when the table's size is unknown
    base: str  # what a fractional capacity is a fraction of: "table rows" or "distinct ids"
    sim_rows: int  # rows the simulated tiers index (max id + 1 when only distinct ids are known)
    row_bytes: int | None  # None: unknown (no store and no --row-bytes); no byte figures then
    profile: TopProfile | None  # the counts of other text (rows seen, ranked), for static and default
    store_table: str | None = None  # the store's table this trace is of
    # ``traced_tables(defer_profile=True)``: the call that ranks the profile, run once by
    # ``resolve_profile`` (so a profile's replays that need no ranking start before it)
    pending_profile: Callable[[], TopProfile] | None = field(default=None, repr=False)

    @property
    def has_profile(self) -> bool:
        """Whether the table has a profile (ranked already or still pending)."""
        return self.profile is not None or self.pending_profile is not None

    def resolve_profile(self) -> TopProfile | None:
        """The profile, ranked now (once, whichever thread asks first) if it was deferred."""
        with _PROFILE_LOCK:
            if self.pending_profile is not None:
                self.profile = self.pending_profile()
                self.pending_profile = None
        return self.profile


_PROFILE_LOCK = threading.Lock()


def distinct_ids(rows: np.ndarray) -> int:
    """Distinct ids of a trace: one counting pass when the ids are dense enough (a sort of a
    10M-id trace takes ~1 s), a sort otherwise."""
    if rows.size and 0 <= rows.min() and rows.max() < 8 * rows.size:
        return int(np.count_nonzero(np.bincount(rows)))
    return int(distinct(rows).size)


def traced_tables(trace: Trace, *, table: str | None = None, store: str | Path | None = None,
                  profile_trace: Trace | None = None, row_bytes: int | None = None,
                  defer_profile: bool = False) -> list[TracedTable]:
    """The tables of ``trace`` (only ``table`` if given), sized and profiled.

    ``store``: the store the trace was taken from; it gives each table's size and row size
    (``row_bytes`` overrides the latter) and, without ``profile_trace``, its saved profile.
    A ``.npy`` trace (one table named "trace") of a one-table store is that table.
    ``profile_trace``: a trace of other text whose row counts rank rows for ``static`` and
    ``default`` (a one-table profile trace serves any table). Without a store, a table's
    size (and row size, when recorded) comes from the trace file, or else fractions are of
    the trace's distinct ids. ``defer_profile``: rank a ``profile_trace`` only when
    ``TracedTable.resolve_profile`` asks (``policy_hit_ratios`` does it while the replays
    that need no ranking run).
    """
    names = list(trace.tables)
    if table:
        if table not in trace.tables:
            raise TierStoreError(f"trace has no table {table!r}; it has {names}")
        names = [table]
    store_info: dict[str, tuple[int, int]] = {}
    if store:
        from ..format.spec import read_manifest  # imports torch (~1 s): only when a store is given

        recover(Path(store))  # as tierstore.open does: a build of this store that died mid-swap
        store_info = {n: (i.rows, i.row_bytes) for n, i in read_manifest(store).tables.items()}
    out = []
    for name in names:
        t = trace.tables[name]
        rb = row_bytes
        store_table = None
        if name in store_info:
            store_table = name
            n_rows, rb = store_info[name][0], rb or store_info[name][1]
            base = "table rows"
        elif store and len(store_info) == 1 and len(names) == 1:
            (store_table, (n_rows, store_rb)), = store_info.items()  # a .npy trace of a one-table store
            rb = rb or store_rb
            base = "table rows"
        elif store:
            raise TierStoreError(f"store {str(store)!r} has no table {name!r}; it has {list(store_info)}")
        elif t.n_rows:
            n_rows, base = int(t.n_rows), "table rows"
            # a trace of a model's tables records their stored row size (`tierstore trace`
            # of DeepSeek-V4.1: 264 bytes), so byte figures need no store
            meta_rb = trace.meta.get("row_bytes")
            rb = rb or (int(meta_rb) if isinstance(meta_rb, int) and meta_rb > 0 else None)
        else:
            n_rows, base = distinct_ids(t.rows), "distinct ids"
        if base != "distinct ids":  # the one id check (InvalidIdError names the row and its position)
            as_row_ids(t.rows, n_rows, where=f"trace of table {name!r}", copy=False)
        if base == "distinct ids":
            sim_rows = int(t.rows.max()) + 1 if t.rows.size else 0
        else:
            sim_rows = n_rows
        profile = None
        pending = None
        if profile_trace is not None:
            pt = profile_trace.tables.get(name) or (next(iter(profile_trace.tables.values()))
                                                    if len(profile_trace.tables) == 1 else None)
            if pt is None:
                raise TierStoreError(f"--profile-trace has no table {name!r}")
            # sparse: one (row, count) per distinct id of the profile trace, not per table row
            rank = functools.partial(_rank_profile, pt.rows, sim_rows)
            if defer_profile:
                pending = rank
            else:
                profile = rank()
        elif store:
            # every profiled row (the simulated capacities may go up to the table), as a top list
            profile = load_profile(store, store_table, n_rows=sim_rows, top=sim_rows)
        out.append(TracedTable(name, t, n_rows, base, sim_rows, rb, profile, store_table, pending))
    return out


def _rank_profile(rows: np.ndarray, sim_rows: int) -> TopProfile:
    """The sparse profile of a profile trace's ``rows`` (those below ``sim_rows``), ranked."""
    seen, n_seen = np.unique(rows[rows < sim_rows], return_counts=True)
    return TopProfile.from_pairs(seen, n_seen, sim_rows)


def replay_semantics(t: TableTrace, min_batch: int) -> str:
    """How exact a replay with ``min_batch`` is, in the words the output uses."""
    n = t.rows.size
    merged = min_batch > 1 and not np.array_equal(batch_bounds(n, t.offsets, min_batch),
                                                   batch_bounds(n, t.offsets, 1))
    return (f"approximate: trace steps merged into batches of >= {min_batch} lookups" if merged else
            "exact: one access at a time" if t.offsets is None else "exact: the recorded batches")


# What one run holds while it runs, for scheduling runs side by side under a memory bound:
# a walk's tier state per slot (tens of bytes: 108 for default, the largest, measured on
# CacheIndex.state), the optimum's next uses, flags and heap per lookup, LRU's distances.
_SLOT_BYTES = 128
_OPT_BYTES = 24  # per lookup
_LRU_BYTES = 12  # per lookup
_DIRECT_BYTES = 8  # per distinct id (at most one per lookup): a direct replay's row map


def policy_hit_ratios(t: TracedTable, capacities: list[int], policies: list[str], *, min_batch: int = 1,
                      lookahead: int = 0, progress: Callable[[int], object] | None = None,
                      workers: int | None = None, memory_bytes: int = 1 << 30) -> list[dict]:
    """Each policy (a registered name or ``opt``) at each capacity (rows), sorted by capacity
    then in the order of ``policies``: the fields of ``SimResult`` plus the capacity as a
    fraction and in bytes, the bytes fetched from the tier below, the gap to the optimum
    and how exact the replay is. ``progress(k)`` is called as k more runs finish.

    Work, once per trace: the ids renumbered densely (one argsort) for LRU's stack distances
    and the optimum's next uses, both of which give every capacity from one preparation;
    the profile's ranking (a deferred one: ``TracedTable.resolve_profile``) for the
    policies that read it (static, default). The other policies replay the trace once per
    capacity (their decisions depend on it). The runs go to ``workers`` threads (default:
    up to 2, the CPUs there are): every replay is one compiled call that releases the GIL.
    The preparations run on this thread meanwhile, the ranking first, and the runs that
    need neither (lfu, s3fifo, ...) start at once. Runs start largest first, and one starts
    beside others only while their estimated state stays within ``memory_bytes``, so peak
    memory stays that of the trace plus about ``memory_bytes``.
    """
    step = progress or (lambda k: None)
    rows = t.trace.rows
    kw: dict[str, Any] = dict(n_rows=t.sim_rows, offsets=t.trace.offsets, min_batch=min_batch,
                              lookahead=lookahead, table=t.name)
    semantics = replay_semantics(t.trace, min_batch)
    prep: dict[str, Any] = {"dense": None}
    preps: list[tuple[str, Callable[[], Any]]] = []
    ranked = [p for p in policies if p != "opt" and _reads_profile(p)]
    # the replays over direct maps (direct.py): every policy of DIRECT_POLICIES but lru and
    # opt, which need no replay per capacity; never with hints (lookahead). The trace's dense
    # ids first, so the replays that read no profile start before it is ranked
    direct = [p for p in policies if p in DIRECT_POLICIES and p not in ("lru", "opt")] if lookahead == 0 else []
    from .stack_distance import dense_ids

    dense_prep = None  # the preparation that gives prep["dense"]

    def dense_and_direct():  # one step: every job that needs either starts together
        prep["dense"] = dense_ids(rows)
        return direct_trace(rows, prep["dense"])

    if direct:
        preps.append(("direct", dense_and_direct))
        dense_prep = "direct"
    if ranked:
        preps.append(("profile", t.resolve_profile))
    if not direct and ("opt" in policies or ("lru" in policies and lookahead == 0 and len(capacities) > 2)):
        preps.append(("dense", functools.partial(dense_ids, rows)))  # simulate's rule
        dense_prep = "dense"
    if any(p in ranked for p in direct):
        # ranked ids for every capacity a ranking policy replays at (held: simulate's rule)
        top = max(min(int(c), max(t.sim_rows, 1)) for c in capacities)
        preps.append(("direct_ranked", lambda: with_ranking(prep["direct"], prep["profile"], t.sim_rows, top)))
    n = rows.size

    def run(caps: list[int], p: str) -> list:
        # the profile only for the policies that read it: the others pin nothing either way
        return simulate(rows, caps, [p], dense=prep["dense"] if p in ("lru", "opt") else None,
                        profile=prep.get("profile") if p in ranked else None,
                        direct=(prep["direct_ranked"] if p in ranked else prep["direct"]) if p in direct else None,
                        **kw)

    jobs: list[_Job] = []
    for p in ("lru", "opt"):  # every capacity at once: LRU from one stack-distance pass (where that
        if p in policies:  # is exact), opt from one preparation of the trace (next uses)
            cost = (_LRU_BYTES if p == "lru" else _OPT_BYTES) * n
            needs = (dense_prep,) if dense_prep else ()
            jobs.append(_Job(cost, len(capacities), functools.partial(run, list(capacities), p), needs))
    for cap in capacities:
        for p in policies:
            if p not in ("lru", "opt"):
                cost = _SLOT_BYTES * min(int(cap), max(1, t.sim_rows))
                needs: tuple[str, ...] = ("profile",) if p in ranked else ()
                if p in direct:  # and its direct map: 8 bytes an id of the trace (or ranked)
                    cost += _DIRECT_BYTES * min(n, max(1, t.sim_rows))
                    needs = ("direct_ranked",) if p in ranked else ("direct",)
                jobs.append(_Job(cost, 1, functools.partial(run, [cap], p), needs))
    res = _run_jobs(jobs, preps, prep, workers or min(2, len(os.sched_getaffinity(0))), memory_bytes, step)
    res.sort(key=lambda r: (r.capacity_rows, policies.index(r.policy)))
    opt = {r.capacity_rows: r.hit_ratio for r in res if r.policy == "opt"}
    out = []
    for r in res:
        d = r.to_dict()
        d["capacity_fraction"] = r.capacity_rows / max(1, t.n_rows)
        d["capacity_base"] = t.base
        d["lookahead"] = lookahead
        d["semantics"] = semantics
        if t.row_bytes:
            d["capacity_bytes"] = r.capacity_rows * t.row_bytes
            d["bytes_moved"] = r.misses * t.row_bytes  # rows fetched from the tier below
        if r.capacity_rows in opt:
            d["gap_to_opt"] = opt[r.capacity_rows] - r.hit_ratio
        out.append(d)
    return out


def _reads_profile(policy: str) -> bool:
    """Whether a registered policy reads a profile (pins or ranks rows by it: static,
    default); the others' replays are the same with or without one."""
    cls = POLICIES[policy]
    return cls.ranks or cls.prepare is not Policy.prepare


@dataclass
class _Job:
    cost: int  # estimated bytes while it runs
    runs: int  # results it gives (for progress)
    call: Callable[[], list]
    needs: tuple[str, ...] = ()  # preparations it waits for


def _run_jobs(jobs: list[_Job], preps: list[tuple[str, Callable[[], Any]]], prep: dict[str, Any], workers: int,
              memory_bytes: int, step: Callable[[int], object]) -> list:
    """Run the jobs on ``workers`` threads, largest first, a job beside others only while the
    estimates of those running stay within ``memory_bytes``, and each only once the
    preparations it needs are done. The preparations (``(name, call)``, in order; their
    results go to ``prep[name]``) run on this thread while the jobs that need none run.
    Concatenated results (in no particular order)."""
    pending = sorted(jobs, key=lambda j: -j.cost)
    preps = list(preps)
    out: list = []

    def ready(j: _Job) -> bool:
        return all(name in prep and not any(name == q for q, _ in preps) for name in j.needs)

    if workers <= 1:
        for name, call in preps:
            prep[name] = call()
        for j in pending:
            out += j.call()
            step(j.runs)
        return out
    running: dict[Future, _Job] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tierstore-profile") as pool:
        while pending or running or preps:
            held = sum(j.cost for j in running.values())
            while pending and len(running) < workers:
                i = next((i for i, j in enumerate(pending)
                          if ready(j) and (not running or held + j.cost <= memory_bytes)), None)
                if i is None:
                    break
                j = pending.pop(i)
                running[pool.submit(j.call)] = j
                held += j.cost
            if preps:  # the next preparation, here, while the workers run what they can
                name, call = preps[0]
                prep[name] = call()
                preps.pop(0)
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in done:
                j = running.pop(f)
                out += f.result()  # a run's error ends the profile (the others finish first)
                step(j.runs)
    return out


def two_tier_hit_ratios(t: TracedTable, device_rows: int, host_rows: int, policies: list[str], *,
                        min_batch: int = 1, lookahead: int = 0) -> dict:
    """A device tier of ``device_rows`` over a host tier of ``host_rows``, per policy (``opt``
    has no two-tier form and is skipped): hit ratios, rows read from disk and, when the row
    size is known, the bytes each level moves."""
    out: dict[str, Any] = {"table": t.name, "device_rows": device_rows, "host_rows": host_rows, "policies": {}}
    n = t.trace.rows.size
    for p in (q for q in policies if q != "opt"):
        r = simulate_tiers(t.trace.rows, device_rows, host_rows, p, n_rows=t.sim_rows, offsets=t.trace.offsets,
                           profile=t.resolve_profile(), min_batch=min_batch, lookahead=lookahead)
        disk_rows = r["host"]["misses"] if host_rows > 0 else r["device"]["misses"]
        entry = {"device_hit_ratio": r["device"]["hit_ratio"],
                 "host_hit_ratio_of_device_misses": r["host"]["hit_ratio"],
                 "total_hit_ratio": 1 - disk_rows / max(1, n), "disk_rows": int(disk_rows)}
        if t.row_bytes:
            entry["host_to_device_bytes"] = int(r["host"]["hits"]) * t.row_bytes
            entry["disk_bytes"] = int(disk_rows) * t.row_bytes
        out["policies"][p] = entry
    return out


def live_hit_ratios(open_store: Callable[[int, str], AbstractContextManager[Any]], t: TracedTable,
                    capacities: list[int], policies: list[str], *, min_batch: int = 1) -> list[dict]:
    """Replay the trace through real stores and put their device-tier counters next to the
    simulation of the same flow.

    ``open_store(device_budget_bytes, policy)`` opens the store with a device tier of that
    budget and no host tier (``tierstore.open``: the caller owns the store, so this module
    stays below the serving runtime). Needs the row size.
    """
    if not t.row_bytes:
        raise TierStoreError("live replay needs the row size: give --store")
    out = []
    bounds = batch_bounds(t.trace.rows.size, t.trace.offsets, min_batch)
    rows = t.trace.rows
    for cap in capacities:
        for p in policies:
            t0 = time.perf_counter()
            with open_store(budget_for(cap, t.row_bytes, p), p) as st:
                tname = t.name if t.name in st.tables else next(iter(st.tables))
                st.reset_stats()
                for a, b in zip(bounds[:-1], bounds[1:]):
                    st.lookup(tname, rows[a:b])
                dev = st.stats()["tables"][tname]["device"]
            live_s = time.perf_counter() - t0
            cap_rows = int(dev.get("capacity_rows", cap))
            sim = simulate_tiers(rows, cap_rows, 0, p, n_rows=t.sim_rows, offsets=t.trace.offsets,
                                 profile=t.resolve_profile(), min_batch=min_batch)["device"]
            out.append({"policy": p, "capacity_rows": cap_rows, "table": t.name,
                        "mode": "live", "hit_ratio": dev["hits"] / max(1, dev["hits"] + dev["misses"]),
                        "hits": int(dev["hits"]), "misses": int(dev["misses"]),
                        "sim_hits": int(sim["hits"]), "sim_misses": int(sim["misses"]),
                        "agree": int(dev["hits"]) == int(sim["hits"]) and int(dev["misses"]) == int(sim["misses"]),
                        "seconds": live_s})
    return out
