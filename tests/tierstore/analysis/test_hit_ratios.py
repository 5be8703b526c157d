"""Hit-ratio runs (tierstore/analysis/hit_ratios.py): what a run knows about each traced
table, the fields it reports, and the live store agreeing with the simulation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tierstore
from tierstore.analysis.hit_ratios import (distinct_ids, live_hit_ratios, policy_hit_ratios, traced_tables,
                                           two_tier_hit_ratios)
from tierstore.analysis.simulate import TableTrace, Trace, simulate, simulate_tiers
from tierstore.cache.index import budget_for
from tierstore.errors import TierStoreError
from tierstore.format.profile import save_profile

from ...conftest import one_table_store, real_text_trace

NAME = "blocks.1.engram.memory.weight"


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return real_text_trace(8000) % 900 + 100  # ids 100..999: the first 100 rows are never read


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path, _ = one_table_store(tmp_path_factory.mktemp("hr"), NAME, 1000, 4)  # 16-byte rows
    return path


def _dense(profile) -> np.ndarray:
    """A sparse profile (every row with a count: no count per table row is kept) as one
    count per row, to compare."""
    assert profile.complete and profile.rows.size <= profile.n_rows
    dense = np.zeros(profile.n_rows, np.int64)
    dense[profile.rows] = profile.counts
    return dense


def test_distinct_ids_dense_and_sparse():
    for r in (np.array([5, 5, 7, 0]), np.array([10**9, 3, 10**9]), np.empty(0, np.int64)):
        assert distinct_ids(r) == np.unique(r).size


def test_traced_tables_sizes_each_table_from_what_is_known(rows, store):
    npy = Trace({"trace": TableTrace(rows)})
    (t,) = traced_tables(npy)  # nothing known: fractions are of the distinct ids
    assert (t.base, t.n_rows, t.sim_rows, t.row_bytes, t.profile, t.store_table) == (
        "distinct ids", np.unique(rows).size, 1000, None, None, None)
    (t,) = traced_tables(Trace({NAME: TableTrace(rows, None, 1200)}), row_bytes=8)  # the trace's table size
    assert (t.base, t.n_rows, t.sim_rows, t.row_bytes) == ("table rows", 1200, 1200, 8)
    (t,) = traced_tables(npy, store=store)  # a .npy trace of a one-table store is that table
    assert (t.base, t.n_rows, t.row_bytes, t.store_table, t.profile) == ("table rows", 1000, 16, NAME, None)
    other = Trace({"x": TableTrace(real_text_trace(20000)[8000:] % 2000)})  # counts of other text
    (t,) = traced_tables(npy, store=store, profile_trace=other)
    assert np.array_equal(_dense(t.profile), np.bincount(other.tables["x"].rows[other.tables["x"].rows < 1000],
                                                         minlength=1000))


def test_traced_tables_uses_the_saved_profile(rows, tmp_path):
    path, _ = one_table_store(tmp_path, NAME, 1000, 4)
    save_profile(path, NAME, np.arange(1000))
    (t,) = traced_tables(Trace({"trace": TableTrace(rows)}), store=path)
    assert np.array_equal(_dense(t.profile), np.arange(1000))


def test_traced_tables_errors(rows, store):
    two = Trace({"a": TableTrace(rows), "b": TableTrace(rows)})
    with pytest.raises(TierStoreError, match=r"trace has no table 'c'; it has \['a', 'b'\]"):
        traced_tables(two, table="c")
    with pytest.raises(TierStoreError, match="has no table 'a'"):
        traced_tables(two, store=store)
    with pytest.raises(TierStoreError, match=r"id \d+ at flat position \d+ is out of range for trace of table .* with 500 rows"):
        traced_tables(Trace({NAME: TableTrace(rows, None, 500)}))
    with pytest.raises(TierStoreError, match="--profile-trace has no table 'b'"):
        traced_tables(two, table="b", profile_trace=Trace({"a": TableTrace(rows), "c": TableTrace(rows)}))


def test_policy_hit_ratios_reports_simulate_with_bytes_and_gap(rows, store):
    (t,) = traced_tables(Trace({"trace": TableTrace(rows, np.arange(0, rows.size, 8))}), store=store,
                         profile_trace=Trace({"x": TableTrace(real_text_trace(20000)[8000:] % 1000)}))
    steps: list[int] = []
    res = policy_hit_ratios(t, [10, 100, 300], ["default", "lru", "opt"], progress=steps.append)
    assert sum(steps) == 9 and [(r["capacity_rows"], r["policy"]) for r in res] == [
        (c, p) for c in (10, 100, 300) for p in ("default", "lru", "opt")]
    for r in res:
        (want,) = simulate(rows, [r["capacity_rows"]], [r["policy"]], n_rows=1000, offsets=t.trace.offsets,
                           profile=t.profile)
        opt = next(o for o in res if o["policy"] == "opt" and o["capacity_rows"] == r["capacity_rows"])
        assert (r["hits"], r["misses"]) == (want.hits, want.misses), r
        assert r["capacity_fraction"] == r["capacity_rows"] / 1000 and r["capacity_base"] == "table rows"
        assert r["capacity_bytes"] == r["capacity_rows"] * 16 and r["bytes_moved"] == r["misses"] * 16
        assert r["gap_to_opt"] == opt["hit_ratio"] - r["hit_ratio"] >= 0
        assert r["semantics"] == "exact: the recorded batches" and r["lookahead"] == 0
    merged = policy_hit_ratios(t, [100], ["lru"], min_batch=64)
    assert merged[0]["semantics"] == "approximate: trace steps merged into batches of >= 64 lookups"


@pytest.mark.parametrize("workers,memory", [(1, 1 << 30), (2, 1 << 30), (2, 0), (3, 1 << 40)])
def test_policy_hit_ratios_side_by_side_equal_one_at_a_time(workers, memory):
    """Runs on threads (largest first, under a memory bound) give exactly the runs of
    simulate one at a time; ids scattered over a V4.1-size table take the argsort path of
    the dense renumbering that LRU and opt share."""
    scattered = (real_text_trace(6000) * 2654435761) % 384_006_168
    prof = (real_text_trace(20000)[6000:] * 2654435761) % 384_006_168
    (t,) = traced_tables(Trace({NAME: TableTrace(scattered, np.arange(0, scattered.size, 8), 384_006_168)}),
                         profile_trace=Trace({NAME: TableTrace(prof)}))
    caps, pols = [16, 64, 256, 1024], ["lru", "s3fifo", "default", "opt", "wtinylfu"]
    steps: list[int] = []
    res = policy_hit_ratios(t, caps, pols, workers=workers, memory_bytes=memory, progress=steps.append)
    assert sum(steps) == len(caps) * len(pols)
    assert [(r["capacity_rows"], r["policy"]) for r in res] == [(c, p) for c in caps for p in pols]
    for r in res:
        (want,) = simulate(scattered, [r["capacity_rows"]], [r["policy"]], n_rows=t.sim_rows,
                           offsets=t.trace.offsets, profile=t.profile)
        assert (r["hits"], r["misses"]) == (want.hits, want.misses), r


@pytest.mark.parametrize("workers", [1, 2])
def test_a_deferred_profile_gives_the_same_runs_and_ranks_while_others_replay(workers, monkeypatch):
    """``defer_profile``: the profile is ranked inside ``policy_hit_ratios``, on its own
    thread, while the runs that read no profile (s3fifo here) already replay on the workers
    (``tierstore profile`` of a V4.1 trace: the ranking and the dense ids no longer hold every
    replay back); the results are exactly the eager ones."""
    import threading

    from tierstore.analysis import hit_ratios

    scattered = (real_text_trace(6000) * 2654435761) % 384_006_168
    prof = (real_text_trace(20000)[6000:] * 2654435761) % 384_006_168
    trace = Trace({NAME: TableTrace(scattered, np.arange(0, scattered.size, 8), 384_006_168)})
    (eager,) = traced_tables(trace, profile_trace=Trace({NAME: TableTrace(prof)}))
    (lazy,) = traced_tables(trace, profile_trace=Trace({NAME: TableTrace(prof)}), defer_profile=True)
    assert lazy.profile is None and lazy.has_profile and eager.has_profile
    started = threading.Event()
    real_sim = hit_ratios.simulate

    def sim(rows, caps, pols, **kw):
        if pols == ["s3fifo"]:
            started.set()
        return real_sim(rows, caps, pols, **kw)

    monkeypatch.setattr(hit_ratios, "simulate", sim)
    rank = lazy.pending_profile
    seen: list[bool] = []
    lazy.pending_profile = lambda: seen.append(started.wait(60 if workers > 1 else 0)) or rank()
    caps, pols = [16, 256, 1024], ["s3fifo", "default", "lru", "opt"]
    res = policy_hit_ratios(lazy, caps, pols, workers=workers)
    assert seen == [workers > 1]  # ranked once; beside an s3fifo replay when there are workers
    assert lazy.pending_profile is None and np.array_equal(lazy.profile.rows, eager.profile.rows)
    want = policy_hit_ratios(eager, caps, pols, workers=1)
    assert [(r["policy"], r["capacity_rows"], r["hits"], r["misses"]) for r in res] == \
        [(r["policy"], r["capacity_rows"], r["hits"], r["misses"]) for r in want]


def test_load_trace_reads_only_the_table_asked(tmp_path):
    from tierstore.analysis.simulate import load_trace, save_trace

    a, b = np.arange(10, dtype=np.int64), np.arange(20, 40, dtype=np.int64)
    path = save_trace(tmp_path / "two.trace.zst", Trace({"a": TableTrace(a, None, 50), "b": TableTrace(b, None, 50)}))
    assert list(load_trace(path, only="b").tables) == ["b"]
    assert np.array_equal(load_trace(path, only="b").tables["b"].rows, b)
    assert list(load_trace(path, only="c").tables) == ["a", "b"]  # not there: every table (the caller names them)
    assert list(load_trace(path).tables) == ["a", "b"]


@pytest.mark.slow
def test_two_tier_hit_ratios_reports_simulate_tiers(rows, store):
    (t,) = traced_tables(Trace({"trace": TableTrace(rows)}), store=store)
    out = two_tier_hit_ratios(t, 50, 200, ["lru", "opt", "s3fifo"])
    assert set(out["policies"]) == {"lru", "s3fifo"}  # opt has no two-tier form
    for p, e in out["policies"].items():
        r = simulate_tiers(rows, 50, 200, p, n_rows=1000)
        assert e["disk_rows"] == r["host"]["misses"] and e["total_hit_ratio"] == 1 - r["host"]["misses"] / rows.size
        assert e["host_to_device_bytes"] == r["host"]["hits"] * 16 and e["disk_bytes"] == e["disk_rows"] * 16
    no_host = two_tier_hit_ratios(t, 50, 0, ["lru"])["policies"]["lru"]
    assert no_host["disk_rows"] == simulate_tiers(rows, 50, 0, "lru", n_rows=1000)["device"]["misses"]


def test_live_store_agrees_with_the_simulation(rows, store):
    (t,) = traced_tables(Trace({"trace": TableTrace(rows, np.arange(0, rows.size, 32))}), store=store)
    opened: list[tuple[int, str]] = []

    def open_store(budget: int, policy: str):
        opened.append((budget, policy))
        return tierstore.open(store, device="cpu", device_budget=budget, host_budget=0, policy=policy)

    res = live_hit_ratios(open_store, t, [20, 200], ["lru", "default"])
    # each budget buys exactly the capacity asked: 16-B rows plus the index's state
    assert opened == [(budget_for(c, 16, p), p) for c in (20, 200) for p in ("lru", "default")]
    # (or the whole table, resident, where that budget holds all 1,000 rows: default's 200)
    assert [r["capacity_rows"] for r in res] == [c if budget_for(c, 16, p) < 16_000 else 1000
                                                 for c in (20, 200) for p in ("lru", "default")]
    for r in res:
        assert r["agree"] and r["hits"] + r["misses"] == rows.size and r["mode"] == "live", r


def test_rank_plot_counts_the_rows_read_not_every_id(tmp_path):
    """Row ids near V4.1's 384M (and far past it) cost nothing: the plot counts the ids the
    trace holds. It drew from np.bincount(rows), an int64 per id up to the largest (3 GB at
    384M rows; 39 PiB here, a MemoryError)."""
    pytest.importorskip("matplotlib")
    from tierstore.analysis import plots

    rng = np.random.default_rng(0)
    rows = (rng.zipf(1.3, 20_000) % 5_000) * 2**40 + 384_006_167  # 5,000 distinct ids beyond any table
    path = plots.plot_rank_frequency({"t": rows.astype(np.int64)}, tmp_path / "rank.png")
    assert path.stat().st_size > 0
