"""Cache policies: which missed rows a cache tier admits and which resident rows it evicts.

A policy decides; the tier moves bytes. Every policy is a small class overriding the same
few hooks of :class:`Policy` (cachetools style); :class:`~tierstore.cache_index.CacheIndex`
calls them and owns the row <-> slot maps. Policies keep their state per *slot* (the
``capacity`` cached rows), never per table row, so a 10M-row table costs nothing here.

Hooks, all vectorized over a whole batch of accesses:

* ``on_lookup(rows, slots, hit)``: the batch in access order (slots[i] = -1 on a miss).
* ``select(rows, n_free)``: which of the missed rows to insert, best first.
* ``victims(k)``: up to ``k`` evictable slots, leaving the policy's structures.
* ``on_insert(slots, rows)``: rows were written into slots.
* ``hint(rows)``: rows an issued prefetch will use soon (the known future).

Policies are deterministic: time is a logical access counter, and the only random choice
(hash seeds of the frequency sketch) comes from an injected ``numpy.random.Generator``.
Not thread-safe: the owning ``CacheIndex`` is called under the caller's lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .errors import TierStoreError

if TYPE_CHECKING:
    from .cache_index import CacheIndex

__all__ = [
    "Policy",
    "LRUPolicy",
    "LFUPolicy",
    "S3FIFOPolicy",
    "WTinyLFUPolicy",
    "StaticPolicy",
    "DefaultPolicy",
    "POLICIES",
    "make_policy",
    "policy_names",
    "FrequencySketch",
]

_INF = np.iinfo(np.int64).max
_STAMP_BITS = 40  # logical time fits in 40 bits (1.1e12 accesses); frequency sits above it
_EMPTY = np.empty(0, dtype=np.int64)


# ----------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------

def _add_capped(counts: np.ndarray, slots: np.ndarray, cap: int) -> None:
    """``counts[s] += (times s occurs in slots)``, saturating at ``cap``.

    Adds each slot's occurrences at once in int64 before capping: ``np.add.at`` on the
    int8 counters wrapped past 127 when a row was hit that often in one batch (the row then
    looked coldest and was evicted first). Touches only the slots hit, O(batch log batch),
    instead of clamping every slot of the tier on every batch.
    """
    if slots.size == 0:
        return
    # small batches: no sort (np.add.at is cheaper below a few hundred slots), and no counter
    # can pass its dtype's maximum before the cap is applied
    if slots.size <= min(256, np.iinfo(counts.dtype).max - cap):
        np.add.at(counts, slots, 1)
        counts[slots] = np.minimum(counts[slots], cap)
        return
    u, c = np.unique(slots, return_counts=True)
    counts[u] = np.minimum(counts[u].astype(np.int64) + c, cap)

class _LazyMin:
    """Amortized "k smallest keys" over per-slot int64 keys that only grow while resident.

    Why: evicting the least-recent (or least-frequent) row must not scan all ``capacity``
    slots per small batch. A rebuild (one ``argpartition``, O(capacity)) keeps the M
    smallest keys sorted in a buffer, M ~ capacity/8, and records the largest, T. A slot
    whose key later changes (a hit, an insert) is stale in the buffer; if its new key is
    still <= T it goes to a short "dirty" list. The k smallest valid keys of buffer +
    dirty are then exactly the k smallest overall, since every other slot's key exceeds T.
    Cost: O(capacity / M) = O(1) amortized per eviction, plus the dirty list (which is
    empty for LRU: a touched slot becomes the newest).

    ``keys`` is shared with the owning policy; ``_INF`` marks slots it does not manage.
    """

    def __init__(self, keys: np.ndarray, lo: int, evictable: Callable[[np.ndarray], np.ndarray]):
        self.keys = keys
        self.lo = lo  # slots below lo (the pinned core) are never candidates
        self.evictable = evictable
        self.buf_slots = _EMPTY
        self.buf_keys = _EMPTY
        self.pos = 0
        self.T = -1
        self.live = False  # no buffer yet: nothing is dirty
        self.dirty_slots = np.empty(64, dtype=np.int64)
        self.dirty_keys = np.empty(64, dtype=np.int64)
        self.n_dirty = 0
        self.last_keys = _EMPTY

    def rebuild(self) -> None:
        dyn = self.keys[self.lo:]
        n_valid = int(np.count_nonzero(dyn != _INF))
        self.pos, self.n_dirty = 0, 0
        if n_valid == 0:
            self.buf_slots, self.buf_keys, self.live = _EMPTY, _EMPTY, False
            return
        m = min(n_valid, max(256, dyn.size // 8))
        if m < dyn.size:
            part = np.argpartition(dyn, m - 1)[:m]
        else:
            part = np.arange(dyn.size)
        part = part[dyn[part] != _INF]
        order = np.argsort(dyn[part], kind="stable")
        self.buf_slots = (part[order] + self.lo).astype(np.int64)
        self.buf_keys = self.keys[self.buf_slots].copy()
        self.T = int(self.buf_keys[-1])
        self.live = True

    def touched(self, slots: np.ndarray) -> None:
        """Slots whose key just changed (hit, insert, re-insert): keep them findable."""
        if not self.live or slots.size == 0:
            return
        k = self.keys[slots]
        m = k <= self.T
        if not m.any():
            return
        s, k = slots[m], k[m]
        n = self.n_dirty + s.size
        if n > self.dirty_slots.size:
            self._compact()
            n = self.n_dirty + s.size
            if n > max(1024, self.buf_slots.size):
                self.live = False  # too much churn below T: next pop rebuilds from scratch
                self.pos = self.buf_slots.size
                self.n_dirty = 0
                return
            if n > self.dirty_slots.size:
                size = max(n, 2 * self.dirty_slots.size)
                self.dirty_slots = np.resize(self.dirty_slots, size)
                self.dirty_keys = np.resize(self.dirty_keys, size)
        self.dirty_slots[self.n_dirty:n] = s
        self.dirty_keys[self.n_dirty:n] = k
        self.n_dirty = n

    def _compact(self) -> None:
        s = self.dirty_slots[: self.n_dirty]
        v = self.keys[s] == self.dirty_keys[: self.n_dirty]
        keep = int(np.count_nonzero(v))
        self.dirty_slots[:keep] = s[v]
        self.dirty_keys[:keep] = self.dirty_keys[: self.n_dirty][v]
        self.n_dirty = keep

    def pop(self, k: int) -> np.ndarray:
        """Remove and return up to k evictable slots with the smallest keys, smallest first."""
        out: list[np.ndarray] = []
        keys_out: list[np.ndarray] = []
        need = k
        progress = True  # a rebuild is only worth it if something changed since the last one
        while need > 0:
            if not self.live or self.pos >= self.buf_slots.size:
                if not progress:
                    break
                self.rebuild()
                progress = False
                if not self.live:
                    break
            # the first `need` valid, evictable buffer entries (the buffer is sorted by key)
            p, step, n_got = self.pos, max(2 * need, 64), 0
            got: list[np.ndarray] = []
            while n_got < need and p < self.buf_slots.size:
                s = self.buf_slots[p: p + step]
                ok = (self.keys[s] == self.buf_keys[p: p + step]) & self.evictable(s)
                idx = np.flatnonzero(ok) + p
                got.append(idx)
                n_got += idx.size
                p += s.size
                step *= 2
            chosen_pos = np.concatenate(got)[:need] if got else _EMPTY
            exhausted = n_got < need  # every evictable buffer entry is in chosen_pos
            # valid dirty entries: changed keys still <= T
            if self.n_dirty:
                self._compact()
                ds = self.dirty_slots[: self.n_dirty]
                dk = self.dirty_keys[: self.n_dirty]
                ev = self.evictable(ds)
                ds, dk = ds[ev], dk[ev]
            else:
                ds = dk = _EMPTY
            cand_slots = np.concatenate([self.buf_slots[chosen_pos], ds])
            cand_keys = np.concatenate([self.buf_keys[chosen_pos], dk])
            if ds.size:  # a slot given back with its old key can sit in both lists
                _, first = np.unique(cand_slots, return_index=True)
                if first.size != cand_slots.size:
                    first.sort()
                    cand_slots, cand_keys = cand_slots[first], cand_keys[first]
            take = min(need, cand_slots.size)
            if take == 0:
                self.pos = self.buf_slots.size
                continue
            if take < cand_slots.size:
                sel = np.argpartition(cand_keys, take - 1)[:take]
                sel = sel[np.argsort(cand_keys[sel], kind="stable")]
            else:
                sel = np.argsort(cand_keys, kind="stable")
            victims = cand_slots[sel]
            self.last_keys = cand_keys[sel]  # lets a caller put a victim back (W-TinyLFU)
            n_buf_taken = int(np.count_nonzero(sel < chosen_pos.size))
            if exhausted and take == cand_slots.size:
                self.pos = self.buf_slots.size  # all below T is gone: rebuild next time
            elif n_buf_taken:
                self.pos = int(chosen_pos[n_buf_taken - 1]) + 1
            self.keys[victims] = _INF
            out.append(victims)
            keys_out.append(self.last_keys)
            need -= victims.size
            progress = True
        self.last_keys = np.concatenate(keys_out) if keys_out else _EMPTY
        return np.concatenate(out) if out else _EMPTY


class _Ring:
    """FIFO of slot numbers in a fixed ring buffer (each slot at most once in one ring)."""

    def __init__(self, size: int):
        self.buf = np.empty(max(1, size), dtype=np.int32)  # slot numbers (< 2**31)
        self.head = 0
        self.len = 0

    def push(self, slots: np.ndarray) -> None:
        n = slots.size
        if n == 0:
            return
        if self.len + n > self.buf.size:
            raise AssertionError("ring overflow")  # internal invariant
        start = (self.head + self.len) % self.buf.size
        end = start + n
        if end <= self.buf.size:
            self.buf[start:end] = slots
        else:
            cut = self.buf.size - start
            self.buf[start:] = slots[:cut]
            self.buf[: n - cut] = slots[cut:]
        self.len += n

    def pop(self, n: int) -> np.ndarray:
        n = min(n, self.len)
        idx = (self.head + np.arange(n)) % self.buf.size
        out = self.buf[idx].astype(np.int64)
        self.head = (self.head + n) % self.buf.size
        self.len -= n
        return out


def _hash64(rows: np.ndarray, seed: int | np.ndarray) -> np.ndarray:
    """Multiplicative hash of row ids (wrapping uint64), top bits are well mixed. ``seed``
    may be a uint64 array that broadcasts against ``rows`` (several hashes in one pass)."""
    x = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.asarray(seed, dtype=np.uint64)
    x ^= x >> np.uint64(29)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(32)
    return x


class FrequencySketch:
    """Count-min sketch of recent access counts with periodic halving (TinyLFU's aging).

    Memory is O(capacity), not O(table rows): ``depth`` rows of 4-bit-saturating counters
    (uint16 storage), width the next power of two above ``width_per_item * capacity``.
    After ``sample_factor * capacity`` increments every counter is halved, so old
    popularity fades.
    """

    def __init__(self, capacity: int, *, rng: np.random.Generator, depth: int = 4,
                 width_per_item: int = 4, sample_factor: int = 10, max_count: int = 15):
        w = 1 << max(4, int(np.ceil(np.log2(max(1, capacity) * width_per_item))))
        self.shift = np.uint64(64 - int(np.log2(w)))
        self.table = np.zeros((depth, w), dtype=np.uint16)
        self.seeds = [int(s) for s in rng.integers(1, 2**62, size=depth)]
        self._seed_col = np.array(self.seeds, dtype=np.uint64)[:, None]  # (depth, 1)
        self._row_base = (np.arange(depth, dtype=np.int64) * w)[:, None]  # row r's offset in table.ravel()
        self.max_count = max_count
        self.sample = max(1, sample_factor * max(1, capacity))
        self.added = 0

    def _flat_idx(self, rows: np.ndarray) -> np.ndarray:
        """(depth, n) indices into ``table.ravel()``: every row's counter in every sketch row,
        hashed in one broadcast pass instead of one pass per seed."""
        h = _hash64(rows[None, :], self._seed_col) >> self.shift
        return h.astype(np.int64) + self._row_base

    def add(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        # only the counters hit, not all depth x width. A small batch updates every sketch row
        # in one call (fewer numpy calls per decode step); a large one row by row (one sort of
        # depth x n ids costs more than depth sorts of n, measured at 16K ids)
        flat, table = self._flat_idx(rows), self.table.reshape(-1)
        for part in ((flat.reshape(-1),) if rows.size <= 4096 else flat):
            _add_capped(table, part, self.max_count)
        self.added += rows.size
        if self.added >= self.sample:
            self.table >>= 1
            self.added //= 2

    def estimate(self, rows: np.ndarray) -> np.ndarray:
        if rows.size == 0:
            return _EMPTY
        return self.table.reshape(-1)[self._flat_idx(rows)].min(axis=0).astype(np.int64)


class _Ghost:
    """Direct-mapped hash set of recently evicted row ids, ~8-16 bytes per remembered id.

    Remembers about the last ``size`` ids inserted; a collision forgets the older id,
    which only makes the set forget early (never invent membership). Ages are kept modulo
    2**32 (uint32 sequence numbers), exact while younger than 2**31 insertions.
    """

    def __init__(self, size: int, seed: int = 7):
        n = 1 << max(4, int(np.ceil(np.log2(max(1, size)))))
        self.shift = np.uint64(64 - int(np.log2(n)))
        self.rows = np.full(n, -1, dtype=np.int32)  # table rows are < 2**31 (CacheIndex)
        self.seq = np.zeros(n, dtype=np.uint32)
        self.count = 0
        self.size = max(1, size)
        self.seed = seed

    def _h(self, rows: np.ndarray) -> np.ndarray:
        return (_hash64(rows, self.seed) >> self.shift).astype(np.int64)

    def add(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        h = self._h(rows)
        self.rows[h] = rows
        self.seq[h] = (self.count + np.arange(rows.size)) & 0xFFFFFFFF
        self.count += rows.size

    def age(self, rows: np.ndarray) -> np.ndarray:
        """How many ids were added after each row (int64 max when not remembered)."""
        if rows.size == 0:
            return _EMPTY
        h = self._h(rows)
        age = (np.uint32(self.count & 0xFFFFFFFF) - self.seq[h]).astype(np.int64) - 1
        return np.where(self.rows[h] == rows, age, _INF)

    def contains(self, rows: np.ndarray) -> np.ndarray:
        return self.age(rows) < self.size

    def discard(self, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        h = self._h(rows)
        hit = self.rows[h] == rows
        self.rows[h[hit]] = -1


# ----------------------------------------------------------------------------------------
# Policy base
# ----------------------------------------------------------------------------------------
class Policy:
    """Base policy: admits every missed row, evicts nothing by itself (subclasses do).

    Args:
        capacity: slots of the cache tier, pinned core included.
        rng: random generator (or seed) for the policy's hashing; fixed by default.
    """

    name = "base"

    def __init__(self, capacity: int, *, rng: np.random.Generator | int | None = None):
        if not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise TierStoreError(f"capacity={capacity!r} must be a non-negative integer number of rows")
        self.capacity = int(capacity)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(
            0x7135 if rng is None else rng)
        self.lo = 0  # first dynamic slot (after the pinned core); set by bind
        self.tick = 0  # logical time: accesses seen so far
        self.index: CacheIndex | None = None

    # --- set-up ---------------------------------------------------------------------------
    def prepare(self, profile: np.ndarray | None) -> np.ndarray:
        """Read the profile once (keep only O(capacity) of it); return the rows this policy
        would pin forever if the caller gives no explicit pinned set."""
        return _EMPTY

    def prefill(self) -> np.ndarray:
        """Rows to insert (evictably) right after ``bind``, e.g. a profile-ranked core."""
        return _EMPTY

    def bind(self, index: "CacheIndex", lo: int) -> None:
        """Attach to an index whose dynamic slots are [lo, capacity)."""
        self.index = index
        self.lo = lo
        self.n_dyn = self.capacity - lo

    def _evictable(self, slots: np.ndarray) -> np.ndarray:
        return self.index.refcount[slots] == 0

    # --- hooks ----------------------------------------------------------------------------
    def on_lookup(self, rows: np.ndarray, slots: np.ndarray, hit: np.ndarray) -> None:
        self.tick += rows.size

    def select(self, rows: np.ndarray, n_free: int) -> np.ndarray:
        return rows

    def victims(self, k: int) -> np.ndarray:
        return _EMPTY

    def on_prefill(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """``prefill()``'s rows were inserted into ``slots`` (before any lookup)."""
        self.on_insert(slots, rows)

    def on_insert(self, slots: np.ndarray, rows: np.ndarray) -> None:
        pass

    def on_evict(self, slots: np.ndarray, rows: np.ndarray) -> None:
        pass

    def hint(self, rows: np.ndarray) -> None:
        pass

    def admit(self, rows: np.ndarray, n_free: int) -> tuple[np.ndarray, np.ndarray]:
        """Decide (rows to insert, slots to evict for them). Default: select, then evict."""
        cand = self.select(rows, n_free)
        cand = cand[: self.n_dyn]
        need = cand.size - n_free
        if need <= 0:
            return cand, _EMPTY
        vic = self.victims(need)
        return cand[: n_free + vic.size], vic


# ----------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------
class LRUPolicy(Policy):
    """Least recently used. Exact LRU for batches of one access; with larger batches the
    rows of a batch are stamped in access order (the last occurrence counts) and the
    rows a batch inserts are newer than all of its hits."""

    name = "lru"

    def bind(self, index: "CacheIndex", lo: int) -> None:
        super().bind(index, lo)
        self.keys = np.full(self.capacity, _INF, dtype=np.int64)
        self.heap = _LazyMin(self.keys, lo, self._evictable)

    def on_lookup(self, rows: np.ndarray, slots: np.ndarray, hit: np.ndarray) -> None:
        pos = np.flatnonzero(hit & (slots >= self.lo))
        if pos.size:
            hs = slots[pos]
            # stamps grow with position, so the max keeps each slot's last occurrence
            # (ufunc.at: no sort, unlike unique(return_index))
            np.maximum.at(self.keys, hs, self.tick + pos)
            self.heap.touched(hs)
        self.tick += rows.size

    def victims(self, k: int) -> np.ndarray:
        return self.heap.pop(k)

    def on_insert(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self.keys[slots] = self.tick + np.arange(slots.size)
        self.tick += slots.size
        self.heap.touched(slots)


class LFUPolicy(Policy):
    """Least frequently used since insertion (ties: least recent). Counts live per slot,
    so a row's count restarts when it is re-admitted (no per-table-row state)."""

    name = "lfu"

    def bind(self, index: "CacheIndex", lo: int) -> None:
        super().bind(index, lo)
        self.keys = np.full(self.capacity, _INF, dtype=np.int64)
        self.freq = np.zeros(self.capacity, dtype=np.int64)
        self.stamp = np.zeros(self.capacity, dtype=np.int64)
        self.heap = _LazyMin(self.keys, lo, self._evictable)

    def on_lookup(self, rows: np.ndarray, slots: np.ndarray, hit: np.ndarray) -> None:
        pos = np.flatnonzero(hit & (slots >= self.lo))
        if pos.size:
            hs = slots[pos]
            np.add.at(self.freq, hs, 1)
            np.maximum.at(self.stamp, hs, self.tick + pos)
            self.keys[hs] = (self.freq[hs] << _STAMP_BITS) | self.stamp[hs]
            self.heap.touched(hs)
        self.tick += rows.size

    def victims(self, k: int) -> np.ndarray:
        return self.heap.pop(k)

    def on_insert(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self.freq[slots] = 1
        self.stamp[slots] = self.tick + np.arange(slots.size)
        self.keys[slots] = (1 << _STAMP_BITS) | self.stamp[slots]
        self.tick += slots.size
        self.heap.touched(slots)


class S3FIFOPolicy(Policy):
    """S3-FIFO (Yang et al., SOSP'23): a small FIFO (10%) filters one-hit wonders, a main
    FIFO with 2-bit reinsertion counters holds the rest, a ghost FIFO of rows evicted from
    the small queue sends returning rows straight to main."""

    name = "s3fifo"

    def __init__(self, capacity: int, *, rng: np.random.Generator | int | None = None,
                 small_fraction: float = 0.1, move_threshold: int = 1):
        super().__init__(capacity, rng=rng)
        self.small_fraction = small_fraction
        self.move_threshold = move_threshold

    def bind(self, index: "CacheIndex", lo: int) -> None:
        super().bind(index, lo)
        self.freq = np.zeros(self.capacity, dtype=np.int8)
        self.small = _Ring(self.n_dyn)
        self.main = _Ring(self.n_dyn)
        self.ghost = _Ghost(max(1, self.n_dyn - int(self.small_fraction * self.n_dyn)))
        self.small_target = max(1, int(self.small_fraction * self.n_dyn))

    def on_lookup(self, rows: np.ndarray, slots: np.ndarray, hit: np.ndarray) -> None:
        hs = slots[hit & (slots >= self.lo)]
        _add_capped(self.freq, hs, 3)
        self.tick += rows.size

    def on_insert(self, slots: np.ndarray, rows: np.ndarray) -> None:
        g = self.ghost.contains(rows)
        self.freq[slots] = 0
        self.ghost.discard(rows[g])
        self.main.push(slots[g])
        self.small.push(slots[~g])

    def victims(self, k: int) -> np.ndarray:
        out: list[np.ndarray] = []
        got = 0
        stall = 0  # entries re-queued without progress (all leased): stop rather than spin
        while got < k and (self.small.len or self.main.len):
            if stall > 2 * (self.small.len + self.main.len) + 8:
                break
            need = k - got
            if self.small.len > self.small_target or self.main.len == 0:
                s = self.small.pop(need)
                leased = ~self._evictable(s)
                keep = ~leased & (self.freq[s] >= self.move_threshold)
                ev = ~leased & ~keep
                self.small.push(s[leased])
                self.freq[s[keep]] = 0
                self.main.push(s[keep])
                victims = s[ev]
                self.ghost.add(self.index.row_of_slot[victims])
            else:
                s = self.main.pop(need)
                leased = ~self._evictable(s)
                keep = ~leased & (self.freq[s] > 0)
                ev = ~leased & ~keep
                self.freq[s[keep]] -= 1
                self.main.push(s[leased | keep])
                victims = s[ev]
            stall = stall + s.size if victims.size == 0 else 0
            out.append(victims)
            got += victims.size
        return np.concatenate(out) if out else _EMPTY


class WTinyLFUPolicy(Policy):
    """W-TinyLFU (Einziger et al.; Caffeine): a 1% admission window (FIFO) in front of an
    LRU main area; a row leaving the window enters main only if the frequency sketch says
    it is more popular than the main victim it would replace."""

    name = "wtinylfu"

    def __init__(self, capacity: int, *, rng: np.random.Generator | int | None = None,
                 window_fraction: float = 0.01):
        super().__init__(capacity, rng=rng)
        self.window_fraction = window_fraction

    def bind(self, index: "CacheIndex", lo: int) -> None:
        super().bind(index, lo)
        self.keys = np.full(self.capacity, _INF, dtype=np.int64)  # main-area LRU stamps
        self.main = _LazyMin(self.keys, lo, self._evictable)
        self.window = _Ring(self.n_dyn)
        self.window_target = max(1, int(round(self.window_fraction * self.n_dyn)))
        self.sketch = FrequencySketch(max(1, self.n_dyn), rng=self.rng)
        self.n_main = 0

    def on_lookup(self, rows: np.ndarray, slots: np.ndarray, hit: np.ndarray) -> None:
        self.sketch.add(rows)
        pos = np.flatnonzero(hit & (slots >= self.lo))
        if pos.size:
            hs = slots[pos]
            np.maximum.at(self.keys, hs, self.tick + pos)  # window slots stay at _INF
            self.main.touched(hs[self.keys[hs] != _INF])
        self.tick += rows.size

    def admit(self, rows: np.ndarray, n_free: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch form of W-TinyLFU's insertion: new rows join the window's tail; what
        overflows the window (its oldest rows first, then the oldest new rows) enters main
        while main has room, then duels main's least recent rows by sketch frequency. A
        losing window row is evicted; a losing new row bypasses the tier."""
        m = rows.size
        overflow = max(0, self.window.len + m - self.window_target)
        a = self.window.pop(min(overflow, self.window.len))  # old window rows leaving
        leased = ~self._evictable(a)
        n_leased = int(np.count_nonzero(leased))
        if n_leased:
            self.window.push(a[leased])  # leased rows wait in the window
            a = a[~leased]
        inc = rows[: max(0, min(m, overflow - a.size - n_leased))]  # new rows overflowing at once
        room = max(0, self.n_dyn - self.window_target - self.n_main)
        n_direct_a = min(room, a.size)
        self._to_main(a[:n_direct_a])
        room -= n_direct_a
        direct_inc = inc[:room]
        a_rest, inc_rest = a[n_direct_a:], inc[direct_inc.size:]
        r = self.index.row_of_slot
        cand_rows = np.concatenate([r[a_rest], inc_rest])  # in age order
        vic = self.main.pop(cand_rows.size) if cand_rows.size else _EMPTY
        vkeys = self.main.last_keys if vic.size else _EMPTY
        nv = vic.size
        fc = self.sketch.estimate(cand_rows)
        fv = self.sketch.estimate(r[vic])
        # the most popular candidates duel the least recent victims, pair by pair
        order = np.argsort(-fc, kind="stable")[:nv]
        beats = fc[order] > fv
        win = np.zeros(cand_rows.size, dtype=bool)
        win[order[beats]] = True
        stay = vic[~beats]  # victims that won keep their LRU place
        self.keys[stay] = vkeys[~beats]
        self.main.touched(stay)
        evicted_main = vic[beats]
        self.n_main -= evicted_main.size
        win_a = win[: a_rest.size]
        self._to_main(a_rest[win_a])
        evicted_window = a_rest[~win_a]
        win_inc = win[a_rest.size:]
        to_main = np.concatenate([direct_inc, inc_rest[win_inc]])
        bypass = inc_rest[~win_inc]
        admitted = rows[~np.isin(rows, bypass)] if bypass.size else rows
        self._pending_main = to_main
        victims = np.concatenate([evicted_window, evicted_main])
        return admitted[: n_free + victims.size], victims

    def on_insert(self, slots: np.ndarray, rows: np.ndarray) -> None:
        pend = getattr(self, "_pending_main", _EMPTY)
        if pend.size:
            mm = np.isin(rows, pend)
            self._to_main(slots[mm])
            self.window.push(slots[~mm])
            self._pending_main = _EMPTY
        else:
            self.window.push(slots)

    def _to_main(self, slots: np.ndarray) -> None:
        self.keys[slots] = self.tick + np.arange(slots.size)
        self.tick += slots.size
        self.n_main += slots.size
        self.main.touched(slots)


class StaticPolicy(Policy):
    """Only the pinned hot set (from a profile): nothing else is ever admitted."""

    name = "static"

    def prepare(self, profile: np.ndarray | None) -> np.ndarray:
        return hot_rows(profile, self.capacity)

    def select(self, rows: np.ndarray, n_free: int) -> np.ndarray:
        return _EMPTY


def hot_rows(profile: np.ndarray | None, k: int) -> np.ndarray:
    """The k most accessed rows of a profile (only rows seen at least once), hottest first;
    ties broken by row id so the set is deterministic."""
    if profile is None or k <= 0:
        return _EMPTY
    profile = np.asarray(profile)
    nz = np.flatnonzero(profile > 0)
    if nz.size > k:
        c = profile[nz]
        part = np.argpartition(-c, k - 1)[:k]
        thresh = c[part].min()
        above = nz[c > thresh]
        tied = nz[c == thresh][: k - above.size]
        nz = np.concatenate([above, tied])
    order = np.lexsort((nz, -profile[nz]))
    return nz[order].astype(np.int64)


class _HintTable:
    """Outstanding hints: rows an announced future batch will use, not yet looked up.

    Direct-mapped (O(capacity) memory): per bucket a row id, a small count (+1 per hint,
    -1 when the row is looked up) and the access time of its latest hint. A hint not used
    within ``horizon`` accesses expires: a serving loop that announced a request it then
    dropped must not protect those rows forever. A collision with an outstanding hint
    drops the new one (a lost hint, never a false one). ``now`` is the policy's access
    count; bucket times are kept mod 2**32 (ages compared wrap-aware).
    """

    def __init__(self, size: int, seed: int = 11, horizon: int = 1 << 20):
        n = 1 << max(10, int(np.ceil(np.log2(max(1, 4 * size)))))
        self.shift = np.uint64(64 - int(np.log2(n)))
        self.rows = np.full(n, -1, dtype=np.int32)
        self.count = np.zeros(n, dtype=np.uint8)
        self.stamp = np.zeros(n, dtype=np.uint32)
        self.seed = seed
        self.horizon = int(horizon)
        self.live = 0  # buckets with count > 0 (fresh or not yet noticed stale)
        self.last_add = 0

    def _h(self, rows: np.ndarray) -> np.ndarray:
        return (_hash64(rows, self.seed) >> self.shift).astype(np.int64)

    def _fresh(self, h: np.ndarray, now: int) -> np.ndarray:
        return ((np.uint32(now & 0xFFFFFFFF) - self.stamp[h]) & np.uint32(0xFFFFFFFF)) <= self.horizon

    def _idle(self, now: int) -> bool:
        """True when no hint can be outstanding (then lookups skip all hashing). Once every
        hint is older than the horizon, the table is cleared in one pass."""
        if self.live and now - self.last_add > self.horizon:
            self.count[:] = 0
            self.live = 0
        return self.live == 0

    def add(self, rows: np.ndarray, now: int) -> None:
        if rows.size == 0:
            return
        h = self._h(rows)
        fresh = self._fresh(h, now) & (self.count[h] > 0)
        same = (self.rows[h] == rows) & fresh
        # an outstanding hint of another row keeps its bucket (the new hint is lost instead:
        # a flood of short-lived hints must not erase a long-range one)
        ok = same | ~fresh
        h, rows, same = h[ok], rows[ok], same[ok]
        self.live += np.unique(h[self.count[h] == 0]).size
        # a row hinted several times in one call counts once (fancy assignment, no sort)
        self.count[h] = np.where(same, np.minimum(self.count[h], 254) + 1, 1)
        self.rows[h] = rows
        self.stamp[h] = np.uint32(now & 0xFFFFFFFF)
        self.last_add = now

    def consume(self, rows: np.ndarray, now: int) -> None:
        if rows.size == 0 or self._idle(now):
            return
        h = self._h(rows)
        hs = h[self.rows[h] == rows]
        c = self.count[hs]
        new = np.where((c > 0) & self._fresh(hs, now), c - 1, 0).astype(np.uint8)  # a stale hint is dropped
        self.live -= np.unique(hs[(c > 0) & (new == 0)]).size
        self.count[hs] = new

    def outstanding(self, rows: np.ndarray, now: int) -> np.ndarray:
        if rows.size == 0 or self._idle(now):
            return np.zeros(rows.size, dtype=bool)
        h = self._h(rows)
        return (self.rows[h] == rows) & (self.count[h] > 0) & self._fresh(h, now)


class _ProfileRank:
    """Hotness rank of the top ``m`` rows of a profile, O(m) memory (not per table row).

    ``rank(rows)`` is 0 for the hottest row, ..., ``m`` (= "not ranked") for the rest.
    """

    def __init__(self, profile: np.ndarray | None, m: int):
        top = hot_rows(profile, m)
        order = np.argsort(top, kind="stable")
        # int64 like the row ids it is searched with: a mixed-dtype searchsorted converts the
        # whole array on every call (~11 calls per lookup). 8 bytes per ranked row, not per table row.
        self.rows = top[order].astype(np.int64)
        self.ranks = order.astype(np.int64)  # position in hotness order
        self.m = top.size

    def rank(self, rows: np.ndarray) -> np.ndarray:
        if self.m == 0:
            return np.full(rows.size, 0, dtype=np.int64)
        i = np.searchsorted(self.rows, rows)
        i[i >= self.m] = self.m - 1
        return np.where(self.rows[i] == rows, self.ranks[i], self.m)


class DefaultPolicy(Policy):
    """The store's policy: a static hot core, an adaptive profile-ranked core and S3-FIFO.

    Three parts share the tier:

    * **Pinned core** (``pin_fraction`` of capacity): the profile's hottest rows, placed at
      open and never evicted.
    * **Ranked core**: the next hottest rows by the profile, prefilled at open, admitted
      again on a miss, evicted coldest-rank first. Its target size adapts every batch
      toward the side whose next slots earn more (see ``_adapt``): misses on rows ranked
      just past its edge (a bigger core would have hit), hits on its last ranks (a smaller
      one would miss), against the dynamic part's hits per slot or its ghost hits. A
      single document favours recency, many interleaved requests favour the profile; the
      split follows whichever the trace rewards (docs/profiling.md).
    * **Dynamic part**: S3-FIFO (small probation FIFO, main FIFO with reinsertion, ghost),
      which keeps one-hit wonders (most of a Zipfian n-gram stream) out of main.

    Hints (``Store.hint``: ids a later batch will use): a row with an outstanding hint
    (hinted, not yet looked up, not older than ``hint_horizon`` accesses) is not evicted
    from the dynamic part while others can go, and enters main directly when it misses.
    """

    name = "default"

    def __init__(self, capacity: int, *, rng: np.random.Generator | int | None = None,
                 pin_fraction: float = 0.1, small_fraction: float = 0.25,
                 adapt_step: float = 2.0, margin: float = 0.1, initial_core: float = 0.5,
                 adapt: str = "density", hint_horizon: int | None = None):
        super().__init__(capacity, rng=rng)
        # accesses after which an unused hint expires (default: max(4 x capacity, 2**20))
        self.hint_horizon = hint_horizon
        if not 0.0 <= pin_fraction <= 1.0:
            raise TierStoreError(f"pin_fraction={pin_fraction!r} must lie in [0, 1]")
        self.pin_fraction = pin_fraction
        self.small_fraction = small_fraction
        self.adapt_step = adapt_step
        self.margin = margin
        self.initial_core = initial_core
        if adapt not in ("density", "ghost"):
            raise TierStoreError(f"adapt={adapt!r} must be 'density' or 'ghost'")
        self.adapt_mode = adapt
        self._miss_ema = 0.0
        self.ranking = _ProfileRank(None, 0)

    def prepare(self, profile: np.ndarray | None) -> np.ndarray:
        self.ranking = _ProfileRank(profile, self.capacity)
        return self.ranking_rows()[: int(self.pin_fraction * self.capacity)]

    def ranking_rows(self) -> np.ndarray:
        r = self.ranking
        out = np.empty(r.m, dtype=np.int64)
        out[r.ranks] = r.rows
        return out

    def bind(self, index: "CacheIndex", lo: int) -> None:
        super().bind(index, lo)
        n = self.n_dyn
        self.seg = np.zeros(self.capacity, dtype=np.int8)  # 0 free/pinned, 1 core, 2 small, 3 main
        self.core_keys = np.full(self.capacity, _INF, dtype=np.int64)
        self.core = _LazyMin(self.core_keys, lo, self._evictable)
        self.n_core = 0
        self.freq = np.zeros(self.capacity, dtype=np.int8)
        self.small = _Ring(n)
        self.main = _Ring(n)
        self.ghost = _Ghost(max(1, n))
        self.hinted = _HintTable(max(1, n), horizon=self.hint_horizon or max(4 * self.capacity, 1 << 20))
        # ranks below rank_lo are pinned (never missed); the ranked core starts half the rest
        self.rank_lo = lo if self.ranking.m else 0
        self.core_target = self.initial_core * n if self.ranking.m > self.rank_lo else 0.0

    def prefill(self) -> np.ndarray:
        # every free slot starts with the next-ranked rows: no compulsory misses on the core;
        # ranks past the target are the first to go when the dynamic part needs room
        return self.ranking_rows()[self.rank_lo: self.rank_lo + self.n_dyn]  # see on_prefill

    # -- helpers ---------------------------------------------------------------------------
    def _core_worthy(self, ranks: np.ndarray) -> np.ndarray:
        return ranks < self.rank_lo + int(self.core_target)

    def on_lookup(self, rows: np.ndarray, slots: np.ndarray, hit: np.ndarray) -> None:
        hs = slots[hit & (slots >= self.lo)]
        _add_capped(self.freq, hs, 3)
        self.hinted.consume(rows, self.tick)
        if self.ranking.m > self.rank_lo:
            self._adapt(rows, slots, hit, hs)
        self.tick += rows.size

    def _adapt(self, rows: np.ndarray, slots: np.ndarray, hit: np.ndarray, hs: np.ndarray) -> None:
        """Move the core/dynamic boundary toward the side whose next slots earn more hits.

        Per batch, over a margin of w slots: what growing the core would gain (misses on
        rows ranked just past its edge), what shrinking it would lose (hits on its last w
        ranks), and what w dynamic slots earn (the dynamic part's hits per slot times w,
        or, in ``adapt="ghost"`` mode, misses on rows it dropped within its last w evictions).
        """
        w = max(16, int(self.margin * self.n_dyn))
        edge = self.rank_lo + self.core_target
        missed = rows[~hit]
        gain = ghost = 0
        if missed.size:
            r_miss = self.ranking.rank(missed)
            gain = np.count_nonzero((r_miss >= edge) & (r_miss < edge + w))
            ghost = np.count_nonzero(self.ghost.age(missed[r_miss >= edge]) <= w)
        if self.adapt_mode == "ghost":
            delta = gain - ghost
        else:
            seg = self.seg[hs]
            core_hits = hs[seg == 1]
            r_hit = self.ranking.rank(self.index.row_of_slot[core_hits]) if core_hits.size else _EMPTY
            loss = np.count_nonzero(r_hit >= edge - w)
            n_dyn_rows = self.small.len + self.main.len
            dyn_hits = np.count_nonzero(seg >= 2)
            # the dynamic part's average density overstates its margin when it cannot even
            # hold a few batches' misses (nothing it admits lives to the next use): trust
            # the ghost there, the density when it is large
            self._miss_ema = 0.9 * self._miss_ema + 0.1 * missed.size
            trust = min(1.0, self.n_dyn / (4.0 * self._miss_ema + 1.0))
            dyn = max(ghost, trust * dyn_hits * w / (n_dyn_rows + w))
            if gain > dyn:
                delta = gain - dyn
            elif loss < dyn:
                delta = loss - dyn
            else:
                delta = 0.0
        self.core_target = min(max(self.core_target + self.adapt_step * float(delta), 0.0), float(self.n_dyn))

    def on_prefill(self, slots: np.ndarray, rows: np.ndarray) -> None:
        # the prefilled ranked rows all join the core (trimmed when over target). This was a
        # flag set by prefill() and cleared by the next insert: with nothing to prefill (no
        # profile) the first rows ever admitted joined the core and were evicted first.
        self._place(slots, rows, np.ones(rows.size, dtype=bool))

    def on_insert(self, slots: np.ndarray, rows: np.ndarray) -> None:
        if self.ranking.m:
            core = self._core_worthy(self.ranking.rank(rows))
        else:
            core = np.zeros(rows.size, dtype=bool)
        self._place(slots, rows, core)

    def _place(self, slots: np.ndarray, rows: np.ndarray, core: np.ndarray) -> None:
        self.freq[slots] = 0
        cs = slots[core]
        if cs.size:
            self.seg[cs] = 1
            self.core_keys[cs] = -self.ranking.rank(rows[core])
            self.core.touched(cs)
            self.n_core += cs.size
        ds, dr = slots[~core], rows[~core]
        to_main = self.ghost.contains(dr) | self.hinted.outstanding(dr, self.tick)
        self.ghost.discard(dr[to_main])
        self.seg[ds[to_main]] = 3
        self.main.push(ds[to_main])
        self.seg[ds[~to_main]] = 2
        self.small.push(ds[~to_main])

    def admit(self, rows: np.ndarray, n_free: int) -> tuple[np.ndarray, np.ndarray]:
        """Core-worthy rows (best rank first) may displace the dynamic part; other rows
        only compete among themselves, so a burst of one-off misses cannot flush the core."""
        if self.ranking.m:
            ranks = self.ranking.rank(rows)
            core = self._core_worthy(ranks)
            c_rows = rows[core][np.argsort(ranks[core], kind="stable")]
            c_rows = c_rows[: max(0, int(self.core_target) - self.n_core)]
            d_rows = rows[~core]
        else:
            c_rows, d_rows = _EMPTY, rows
        if d_rows.size > 1:  # rows with a known next use first: if room runs out, others bypass
            soon = self.hinted.outstanding(d_rows, self.tick)
            if soon.any():
                d_rows = np.concatenate([d_rows[soon], d_rows[~soon]])
        # the dynamic part may use everything but the core's target (a core over target shrinks)
        d_space = max(0, self.n_dyn - min(self.n_core, int(self.core_target)) - c_rows.size)
        if d_rows.size > d_space:  # bypassed rows count as evicted at once (adaptation signal)
            self.ghost.add(d_rows[d_space:])
            d_rows = d_rows[:d_space]
        cand = np.concatenate([c_rows, d_rows])
        need = cand.size - n_free
        if need <= 0:
            return cand, _EMPTY
        out = []
        over = self.n_core - int(self.core_target)
        if over > 0:
            v = self.core.pop(min(need, over))
            self.n_core -= v.size
            out.append(v)
            need -= v.size
        if need > 0:
            v = self._dyn_victims(need)
            out.append(v)
            need -= v.size
        if need > 0 and c_rows.size:  # dynamic part all leased: core rows may still swap
            v = self.core.pop(min(need, c_rows.size))
            self.n_core -= v.size
            out.append(v)
        vic = np.concatenate(out) if out else _EMPTY
        self.seg[vic] = 0
        return cand[: n_free + vic.size], vic

    def _dyn_victims(self, k: int) -> np.ndarray:
        out: list[np.ndarray] = []
        got = stall = 0
        small_target = max(1, int(self.small_fraction * (self.small.len + self.main.len)))
        while got < k and (self.small.len or self.main.len):
            if stall > 2 * (self.small.len + self.main.len) + 8:
                break
            need = k - got
            if self.small.len > small_target or self.main.len == 0:
                s = self.small.pop(need)
                leased = ~self._evictable(s)
                soon = self.hinted.outstanding(self.index.row_of_slot[s], self.tick)
                keep = ~leased & ((self.freq[s] >= 1) | soon)
                ev = ~leased & ~keep
                self.small.push(s[leased])
                self.freq[s[keep]] = 0
                self.seg[s[keep]] = 3
                self.main.push(s[keep])
            else:
                s = self.main.pop(need)
                leased = ~self._evictable(s)
                soon = self.hinted.outstanding(self.index.row_of_slot[s], self.tick)
                keep = ~leased & ((self.freq[s] > 0) | soon)
                ev = ~leased & ~keep
                dec = keep & (self.freq[s] > 0)
                self.freq[s[dec]] -= 1
                self.main.push(s[leased | keep])
            victims = s[ev]
            self.ghost.add(self.index.row_of_slot[victims])
            stall = stall + s.size if victims.size == 0 else 0
            out.append(victims)
            got += victims.size
        return np.concatenate(out) if out else _EMPTY

    def hint(self, rows: np.ndarray) -> None:
        self.hinted.add(np.asarray(rows, dtype=np.int64), self.tick)


POLICIES: dict[str, type[Policy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "s3fifo": S3FIFOPolicy,
    "wtinylfu": WTinyLFUPolicy,
    "static": StaticPolicy,
    "default": DefaultPolicy,
}


def policy_names() -> list[str]:
    """Registered policy names (``opt`` is not a policy: see ``tierstore.belady``)."""
    return list(POLICIES)


def make_policy(name: str, capacity: int, **kwargs) -> Policy:
    """Build a registered policy by name; unknown names raise, listing the known ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise TierStoreError(
            f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(capacity, **kwargs)
