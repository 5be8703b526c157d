"""ARC and W-TinyLFU (tierstore.cache.arc, tierstore.cache.wtinylfu) against oracles.

ARC: libCacheSim's ARC (the paper's algorithm with a real-valued p) is an exact oracle:
hit for hit equal on a Zipf and a real text trace at 50, 500 and 2000 slots (asserted
within 0.005, as the brief asks; measured difference 0).

W-TinyLFU: libCacheSim's WTinyLFU is a different variant of the algorithm (see the
wtinylfu module doc), so the tests use two oracles:

- an independent pure-Python model of the algorithm the module states (Caffeine-style:
  fixed 1% window, probation/protected SLRU, 4-bit count-min sketch with doorkeeper and
  reset, ties evict the candidate), using the same hash and seeds: equal hit for hit;
- libCacheSim's WTinyLFU(window_size=0.01) where the two variants agree. Measured
  (ours vs libCacheSim): zipf 500 0.4454 vs 0.4443, zipf 2000 0.5186 vs 0.5164, real
  2000 0.8535 vs 0.8548, all within 0.005, asserted. Not comparable: at 50 slots
  libCacheSim's window is int(0.01 * 50) = 0 slots and it admits nothing (hit ratio 0,
  ours 0.338 / 0.523); on the real trace at 500 slots ours is 0.7647 and libCacheSim
  0.7345 (0.030 apart), almost all of it libCacheSim's aging schedule (details in
  test_wtinylfu_vs_libcachesim). Those cases are asserted as measured differences, not
  as agreement.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from tests.conftest import real_text_trace
from tierstore.cache import CacheIndex
from tierstore.cache import wtinylfu as wt
from .helpers import dense_map, slot_of_row
from tierstore.cache.layout import (BELOW, G_ROW, M_CAP, M_GCAP, M_GFREE, M_GQLEN, M_LO, M_NFREE, M_QLEN, NQ)

libcachesim = pytest.importorskip("libcachesim")

CAPS = (50, 500, 2000)
N = 20000


def _zipf() -> np.ndarray:
    return np.random.default_rng(1).zipf(1.1, N) % N


def _trace(name: str) -> np.ndarray:
    return _zipf() if name == "zipf" else real_text_trace(N)


def ours(t: np.ndarray, cap: int, policy: str) -> tuple[float, CacheIndex]:
    """One access per lookup: sequential caching."""
    idx = CacheIndex(int(t.max()) + 1, cap, policy, rng=0, pinned_rows=np.empty(0, np.int64))
    for r in t:
        idx.lookup(np.array([r]))
    return idx.hits / t.size, idx


def lcs(t: np.ndarray, cap: int, cls, **kw) -> float:
    c, h = cls(cache_size=cap, **kw), 0
    for r in t.tolist():
        q = libcachesim.Request()
        q.obj_id, q.obj_size = int(r) + 1, 1
        h += bool(c.get(q))
    return h / t.size


# ---------------------------------------------------------------------------------------------
# invariants of any tier's state
# ---------------------------------------------------------------------------------------------


def check_invariants(idx: CacheIndex) -> None:
    M, _rm, ros, ref, _ep, _K, _L, GH = idx.state[:8]
    sor = dense_map(idx)
    mapped = np.flatnonzero(sor >= 0)
    assert np.array_equal(ros[sor[mapped]], mapped), "a row's slot holds another row"
    held = np.flatnonzero(ros >= 0)
    assert np.array_equal(sor[ros[held]], held), "a slot's row maps elsewhere"
    n_dyn = M[M_CAP] - M[M_LO]
    in_queues = int(M[M_QLEN:M_QLEN + NQ].sum())
    assert in_queues == n_dyn - M[M_NFREE] == idx.size - idx.n_pinned
    assert not ref.any(), "leases left after finish"
    ghosts = np.flatnonzero(sor <= -2)
    g = -2 - sor[ghosts]
    assert np.array_equal(GH[G_ROW, g], ghosts), "a ghost entry remembers another row"
    assert int(M[M_GQLEN:M_GQLEN + NQ].sum()) == ghosts.size == M[M_GCAP] - M[M_GFREE]


# ---------------------------------------------------------------------------------------------
# ARC
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trace", ["zipf", "real"])
def test_arc_vs_libcachesim(trace):
    t = _trace(trace)
    for cap in CAPS:
        h, idx = ours(t, cap, "arc")
        ref = lcs(t, cap, libcachesim.ARC)
        assert abs(h - ref) <= 0.005, (trace, cap, h, ref)
        assert h == ref, (trace, cap, h, ref)  # measured: exact
        check_invariants(idx)
        M = idx.state[0]
        c = cap
        assert M[M_QLEN + 0] + M[M_GQLEN + 0] <= c and M[M_QLEN:M_QLEN + 2].sum() + M[M_GQLEN:M_GQLEN + 2].sum() <= 2 * c


# ---------------------------------------------------------------------------------------------
# W-TinyLFU
# ---------------------------------------------------------------------------------------------

_MASK = (1 << 64) - 1


def _mix(r: int, seed: int) -> int:
    x = (r * 0x9E3779B97F4A7C15 + seed) & _MASK
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) & _MASK
    x ^= x >> 32
    return x


class RefWTinyLFU:
    """The algorithm of tierstore.cache.wtinylfu, written plainly (OrderedDicts, lists),
    with the kernel's parameters and seeds read from its M."""

    def __init__(self, cap: int, M: np.ndarray):
        self.cap = cap
        self.win_max, self.prot_max = int(M[wt.P_WIN]), int(M[wt.P_PROT])
        self.wb = int(M[wt.P_WBITS])
        self.sample = int(M[wt.P_SAMPLE])
        self.seeds = [int(s) for s in M[wt.P_SEED:wt.P_SEED + wt.N_SEEDS]]
        w = 1 << self.wb
        self.cm = [[0] * w for _ in range(wt.DEPTH)]
        self.dk = [False] * (8 * w)
        self.adds = 0
        self.win, self.prob, self.prot = OrderedDict(), OrderedDict(), OrderedDict()
        self.hits = 0

    def _cm_idx(self, r):
        return [_mix(r, self.seeds[i]) >> (64 - self.wb) for i in range(wt.DEPTH)]

    def _dk_idx(self, r):
        return [_mix(r, self.seeds[wt.DEPTH] + j) >> (64 - self.wb - 3) for j in range(wt.DK_PROBES)]

    def freq(self, r):
        est = min(self.cm[i][k] for i, k in enumerate(self._cm_idx(r)))
        return est + all(self.dk[b] for b in self._dk_idx(r))

    def record(self, r):
        bits = self._dk_idx(r)
        if all(self.dk[b] for b in bits):
            for i, k in enumerate(self._cm_idx(r)):
                self.cm[i][k] = min(wt.CMAX, self.cm[i][k] + 1)
        for b in bits:
            self.dk[b] = True
        self.adds += 1
        if self.adds >= self.sample:
            self.cm = [[c >> 1 for c in row] for row in self.cm]
            self.dk = [False] * len(self.dk)
            self.adds >>= 1

    def access(self, r):
        self.record(r)
        if r in self.win:
            self.win.move_to_end(r)
        elif r in self.prot:
            self.prot.move_to_end(r)
        elif r in self.prob:
            del self.prob[r]
            self.prot[r] = True
            if len(self.prot) > self.prot_max:
                self.prob[self.prot.popitem(last=False)[0]] = True
        else:
            if len(self.win) + len(self.prob) + len(self.prot) >= self.cap:
                cand = next(iter(self.win)) if self.win else None
                q = self.prob if self.prob else self.prot
                vict = next(iter(q)) if q else None
                if cand is not None and vict is not None and self.freq(cand) > self.freq(vict):
                    del self.win[cand]
                    self.prob[cand] = True
                    del q[vict]
                elif cand is not None:
                    del self.win[cand]
                else:
                    del q[vict]
            self.win[r] = True
            while len(self.win) > self.win_max:
                self.prob[self.win.popitem(last=False)[0]] = True
            return
        self.hits += 1


@pytest.mark.parametrize("trace", ["zipf", "real"])
def test_wtinylfu_vs_reference_model(trace):
    """Hit for hit equal to the plain model of the same algorithm (same hash and seeds)."""
    t = _trace(trace)
    for cap in (1, 7, 50, 500):
        h, idx = ours(t, cap, "wtinylfu")
        ref = RefWTinyLFU(cap, idx.state[0])
        for r in t.tolist():
            ref.access(r)
        assert idx.hits == ref.hits, (trace, cap)
        check_invariants(idx)
        M = idx.state[0]
        assert M[M_QLEN + wt.WIN] == ref.win_max and M[M_QLEN + wt.PROT] <= ref.prot_max


@pytest.mark.parametrize("trace", ["zipf", "real"])
def test_wtinylfu_sketch_equals_the_model_and_saturation_bits_are_sound(trace):
    """A hit skips the sketch while its slot's saturation bit is set (the decode path's
    cost, wtinylfu module doc). The skip must change nothing: all along the trace the
    counters, the doorkeeper and the record count equal the plain model's (which records
    every access in full), and every set bit is a slot whose row the model has saturated
    (doorkeeper bits set, every counter at CMAX): a bit left set across a reset (counters
    halved) or for a slot's new row fails this. Hot rows do saturate: some bits are set."""
    t = _trace(trace)
    cap = 50
    idx = CacheIndex(int(t.max()) + 1, cap, "wtinylfu", rng=0, pinned_rows=np.empty(0, np.int64))
    M, ros, SK = idx.state[0], idx.state[2], idx.state[8]
    ref = RefWTinyLFU(cap, M)
    w, lo = 1 << ref.wb, int(M[M_LO])
    resets = set_bits = 0
    for i, r in enumerate(t.tolist()):
        before = ref.adds
        idx.lookup(np.array([r]))
        ref.access(r)
        resets += ref.adds < before
        if i % 97:
            continue
        dk = wt.DEPTH * w // 2  # 4-bit counters, two a byte (the low nibble first), then the doorkeeper
        packed = SK[:dk].astype(np.int64)
        cm = np.empty(wt.DEPTH * w, np.int64)
        cm[0::2], cm[1::2] = packed & wt.CMAX, packed >> 4
        assert cm.reshape(wt.DEPTH, w).tolist() == ref.cm, i
        assert np.unpackbits(SK[dk:dk + w], bitorder="little").astype(bool).tolist() == ref.dk, i
        assert M[wt.P_ADDS] == ref.adds, i
        assert SK.size == dk + w  # counters and doorkeeper only: the saturation bits are in K
        bits = idx.state[5][0, lo:cap] >> 7  # bit 7 of each slot's queue byte (wt.SAT)
        for d in np.flatnonzero(bits):
            row = int(ros[lo + d])
            assert all(ref.cm[k][b] == wt.CMAX for k, b in enumerate(ref._cm_idx(row))), (i, row)
            assert all(ref.dk[b] for b in ref._dk_idx(row)), (i, row)
        set_bits += int(bits.sum())
    assert set_bits > 0 and resets > 0, (set_bits, resets)


# measured (ours, libCacheSim) on the traces above; None: libCacheSim admits nothing
_LCS_WT = {("zipf", 50): None, ("real", 50): None, ("real", 500): 0.030}


@pytest.mark.parametrize("trace", ["zipf", "real"])
def test_wtinylfu_vs_libcachesim(trace):
    """Within 0.005 of libCacheSim's WTinyLFU where the variants are comparable.

    Not comparable, asserted as the measured difference:
    - 50 slots: libCacheSim's window is int(0.01 * 50) = 0 slots, and a cache whose window
      cannot hold an object admits nothing (``WTinyLFU_can_insert``): hit ratio 0. Ours
      keeps a window of at least one slot.
    - real text, 500 slots (window 5): ours 0.7647, libCacheSim 0.7345. libCacheSim
      halves its counts only every 32 x main-size *main-area hits* (15,840 at 500 slots:
      less than once in this trace), where TinyLFU/Caffeine (and ours) halve every
      10 x size recorded accesses; stale counts shut the text's shifting vocabulary out.
      Measured with a plain model of libCacheSim's variant (exact counts in place of its
      counting bloom filter): the model gives 0.7329 (libCacheSim 0.7345); switching only
      its aging to ours gives 0.7636 (ours 0.7647); its window-draining eviction loop
      accounts for 0.003, its sketch feeding (no window hits) for -0.010. The same model
      switch changes the other cases by at most 0.005. We assert ours is ahead by
      0.030 +- 0.005.
    """
    t = _trace(trace)
    for cap in CAPS:
        h, _ = ours(t, cap, "wtinylfu")
        ref = lcs(t, cap, libcachesim.WTinyLFU, window_size=0.01)
        known = _LCS_WT.get((trace, cap), 0.0)
        if known is None:
            assert ref == 0.0 and h > 0.3, (trace, cap, h, ref)
        else:
            assert abs((h - ref) - known) <= 0.005, (trace, cap, h, ref)


# ---------------------------------------------------------------------------------------------
# leases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["arc", "wtinylfu"])
def test_leases_bypass_when_all_slots_leased(policy):
    cap = 64
    t = _zipf() % 1000
    idx = CacheIndex(2000, cap, policy, rng=0, pinned_rows=np.empty(0, np.int64))
    for r in t[:3000]:
        idx.lookup(np.array([r]))
    check_invariants(idx)
    # a batch of distinct ids larger than the tier: residents, ghosts (arc) and new rows
    sor = dense_map(idx)
    batch = np.concatenate([np.flatnonzero(sor >= 0)[:20], np.flatnonzero(sor <= -2)[:20],
                            np.arange(1000, 1000 + 2 * cap)])
    batch = np.random.default_rng(3).permutation(batch)
    before = idx.bypassed
    slots, codes, leased = idx.access(batch)
    assert leased.size == cap and np.unique(leased).size == cap and (idx.refcount == 1).all()
    assert (codes[:cap] != BELOW).all() and (codes[cap:] == BELOW).all()
    assert (slots[cap:] == -1).all() and idx.bypassed - before == batch.size - cap
    # each served row sits in its slot; bypassed rows are not resident
    assert np.array_equal(idx.row_of_slot[slots[:cap]], batch[:cap])
    assert (slot_of_row(idx)[batch[cap:]] < 0).all()
    idx.finish(leased)
    check_invariants(idx)
    # the same again, ended by abort (holes), then ordinary traffic
    slots, codes, leased = idx.access(np.arange(1500, 1500 + 2 * cap))
    idx.abort(leased)
    for r in t[3000:6000]:
        idx.lookup(np.array([r]))
    check_invariants(idx)
    assert idx.size == cap


def test_wtinylfu_all_hits_leaves_the_state_the_walk_leaves():
    """The decode path's ``wtinylfu.all_hits``, written out (the state arrays bound once,
    its moves within a queue done on the links alone), against the walk's ``access`` +
    ``finish`` with ``hit``: the same sketch, queue bytes (saturation bits included), links,
    queue lengths, leased fronts and counters after every all-hit batch. Batches of held
    rows (repeats too) alternate with batches of misses that keep the window and probation
    changing, so the all-hit batches promote probation rows (and demote protected ones),
    hit window and protected rows, skip saturated rows and cross sketch resets. Lease
    markers (``ep``, ``M_EPOCH``) are the walk's alone and are left out. Negative control: a
    batch in another order gives another state, and the comparison sees it."""
    from tierstore.cache.layout import M_EPOCH

    rng = np.random.default_rng(11)
    cap, universe = 120, 400
    fast, walk = CacheIndex(universe, cap, "wtinylfu"), CacheIndex(universe, cap, "wtinylfu")

    def differs(a, b) -> list[int]:
        out = [k for k in range(len(a.state)) if k not in (0, 4) and not np.array_equal(a.state[k], b.state[k])]
        ma, mb = a.state[0].copy(), b.state[0].copy()
        ma[M_EPOCH] = mb[M_EPOCH] = 0
        return out + ([0] if not np.array_equal(ma, mb) else [])

    hot = rng.permutation(universe)[:150].astype(np.int64)
    for idx in (fast, walk):
        for b in np.array_split(hot, 5):  # a full tier: the window, probation and protected hold rows
            idx.lookup(b)
    resets = promoted = skipped = 0
    for step in range(1500):
        if step % 4 == 3:  # misses (and some hits) through the walk on both: queues change
            b = rng.choice(hot, int(rng.integers(1, 12)))
            fast.lookup(b)
            walk.lookup(b)
            continue
        held = hot[fast.slots_of(hot) >= 0]
        p = 1.0 / np.arange(1, held.size + 1)  # a skewed draw: some rows saturate
        b = held[rng.choice(held.size, int(rng.integers(1, 48)), p=p / p.sum())]
        M, Q = fast.state[0], fast.state[5]
        adds, sat = M[wt.P_ADDS], int(((Q[0] & wt.SAT) != 0).sum())
        prob = bool(((Q[0, fast.slots_of(b)] & wt.QMASK) == wt.PROB).any())  # a row in probation: promoted
        assert fast.all_hits(fast.state, b, np.empty(b.size, np.int64)), f"step {step}: not all hits"
        walk.lookup(b)
        assert not differs(fast, walk), f"step {step}: state arrays {differs(fast, walk)} differ from the walk's"
        resets += M[wt.P_ADDS] < adds
        promoted += prob
        skipped += sat > 0
    assert resets >= 3 and promoted >= 50 and skipped >= 500, (resets, promoted, skipped)
    held = hot[fast.slots_of(hot) >= 0]
    b = held[:40].copy()
    assert fast.all_hits(fast.state, b[::-1].copy(), np.empty(b.size, np.int64))
    walk.lookup(b)
    assert differs(fast, walk), "the comparison cannot tell a batch in another order"
