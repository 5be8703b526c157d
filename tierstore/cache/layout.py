"""The arrays one cache tier's state lives in, and the names of their fields.

A tier's whole state is one tuple of numpy arrays, ``T``, passed to every kernel (a numba
call with it costs ~1 us); nothing lives in Python objects, so a kernel runs without the
GIL and the state survives any number of calls. Memory: nothing per *table* row; per
*slot* (row the tier can hold), the row map and ghosts included, at most: static 14, lru
32, wtinylfu 29-32, arc 58, s3fifo 59.4, lfu 64, default 100 with its hint table (84
until the first hint); issue 19's bound is 32 (tests/tierstore/cache/test_state_bytes.py,
which also says why the last four keep more). A store pays for it out of the tier's budget:
``index.state_bytes`` is the most these arrays can hold at a capacity, ``slots_within``
the capacity a budget buys at row bytes plus that.

``T = (M, RM, ros, ref, ep, K, L, GH, SK, HT, RK)``:

- ``M`` int64[72]: scalars (the ``M_*`` indices below): counters, queue lengths, params.
- ``RM`` int64[1.25 x (cap + ghost entries), a multiple of 8]: the row -> slot map, a hash table
  (tierstore.cache.rowmap): a row's slot; -1 absent; ``-2 - g`` remembered in ghost entry
  ``g`` (a recently evicted row: S3-FIFO's and ARC's ghosts, exact: keyed by the row).
- ``ros`` int32[cap]: row in each slot, -1 free.
- ``ref``, ``ep`` and ``L`` are one-entry stand-ins for a policy that admits nothing
  (``Policy.admits``: static), whose slots are never leased or queued.
- ``ref`` uint16[cap] (uint8 for wtinylfu): leases (a leased slot is never evicted);
  ``M[M_REFMAX]`` at most.
- ``ep`` int32[cap] (int16 for wtinylfu): the lookup that last leased the slot (``epoch``; ``-epoch`` when that
  lookup admitted the row and has not ended: the slot is *pending*, its bytes still to be
  written; 0 once it ended).
- ``K`` int64 (int32 for default)[nk, cap]: per-slot keys (``K_KEY``) and an indexed min-heap (``K_HEAP``,
  ``K_HPOS``) for the policies that evict by key (lfu, default's ranked core); wtinylfu's
  is uint8[1, cap], each slot's queue byte (its queue and saturation bit, wtinylfu.py).
- ``L`` int32[3 or 4, cap + NQ]: doubly linked queues over slots (``L_NEXT``/``L_PREV``,
  the sentinel of queue q at index ``cap + q``), each slot's queue (``L_QID``; wtinylfu's
  L has the links only, 2 rows: its queues are in K, with its own push and unlink) and (s3fifo, default
  only: ``Policy.l_rows``) a small frequency counter. The free slots are [CAP - NFREE, CAP) (structs.take_free).
- ``GH`` int32[4, gcap + NQ]: ghost entries (row, queue links, queue; free ones chained).
- ``SK`` uint8[...]: W-TinyLFU's count-min sketch and doorkeeper.
- ``HT`` int64[2, h]: the hint table (row << 8 | count, time of the latest hint), see
  hints.py; one bucket until the first hint (``CacheIndex.hint_table``).
- ``RK`` int64[1.25 x m, a multiple of 8]: the rank map (tierstore.cache.rankmap): a profile's m ranked
  rows -> their ranks, a hash table (default; empty for the others).
"""

from __future__ import annotations

# -- M: scalars ------------------------------------------------------------------------------
M_EPWRAP = 0  # lease markers (``ep``) restart below this: half the marker type's range (walk.access;
# M[0] held a policy id while the walk dispatched on one)
M_CAP = 1  # slots
M_LO = 2  # pinned slots [0, LO): never evicted, no policy state
M_NFREE = 3  # free slots: [CAP - NFREE, CAP), never used yet (structs.take_free)
M_TICK = 4  # accesses seen (logical time)
M_HITS = 5
M_MISSES = 6
M_EVICT = 7
M_INSERT = 8
M_EPOCH = 9  # lookups started (lease marker)
M_NROWS = 10
M_GCAP = 11  # ghost entries
M_GFREE = 12  # free ghost entries: the list from M_GHEAD through G_NEXT, then [M_GNEW, GCAP)
M_HLIVE = 13  # hint buckets with a count (0: lookups skip all hint work)
M_HLAST = 14  # tick of the latest hint
M_HORIZON = 15  # accesses after which an unused hint expires
M_GHEAD = 16  # the last ghost entry freed (a stack through G_NEXT), -1 none (it held log2 of the
# hint buckets while the table was a power of two)
M_RANKM = 17  # ranked rows in RK
M_HEAPN = 18  # entries in the heap K[K_HEAP]
M_BYPASS = 19  # misses the policy did not admit (all slots leased, or the policy said no)
M_HINTS = 20  # 1 if the policy acts on hints (others skip all hint work)
M_NREF = 21  # slots with a lease (when all dynamic slots are leased, a miss bypasses at once)
M_SCAN = 22  # work counter: leased entries victim searches stepped over or parked, candidates re-queued
M_REFMAX = 23  # the most leases a slot takes (the lease type's maximum: walk.access serves past it from below)
M_QLEN = 24  # M[M_QLEN + q]: slots in queue q (q < NQ)
M_GQLEN = 32  # M[M_GQLEN + q]: entries in ghost queue q (q < NQ)
M_PARAM = 40  # M[M_PARAM + i]: policy-specific scalars (each policy names its own)
M_QSCAN = 64  # M[M_QSCAN + q]: the last slot of queue q's leased front, -1 none (q_first_free)
M_GNEW = 72  # ghost entries [M_GNEW, GCAP) were never used: taken in order once the freed ones are
NM = 73

NQ = 8  # queues per tier (slot queues and ghost queues)
Q_HPARK = NQ - 1  # slot queue of leased heap entries taken off the heap (structs.h_top_free)

# -- K: per-slot int64 ------------------------------------------------------------------------
K_KEY = 0
K_HEAP = 1
K_HPOS = 2
K_AUX = 3

# -- L: per-slot int32 ------------------------------------------------------------------------
L_NEXT = 0
L_PREV = 1
L_QID = 2
L_FREQ = 3  # only for the policies that count (s3fifo, default): the others' L has NL - 1 rows
NL = 4

# -- GH: ghost entries ------------------------------------------------------------------------
G_ROW = 0
G_NEXT = 1  # also the freed entries' stack link (a stack in its own row cost 4 bytes per entry)
G_PREV = 2
G_QID = 3
NG = 4

# -- HT: the hint table (hints.py) -----------------------------------------------------------
HT_ROWS = 2  # row << 8 | count (count <= 255), the tick of the latest hint

# -- leases ------------------------------------------------------------------------------------
# ``ref``: uint16 leases per slot (2 bytes, not 4: issue 19's 32-byte bound). A slot is
# leased once per lookup that touched it and has not ended, so a count reaches REF_MAX only
# with 65,535 lookups in flight on one tier at once; walk.access then serves that row from
# below rather than lease it again (never an overflow, never a wrong row). These are the
# defaults (``Policy.ref_dtype``, ``Policy.ep_dtype``); a policy may take narrower ones
# (wtinylfu: uint8 leases, at most 255 lookups in flight on a slot, and int16 lease
# markers, restarted every 2**14 lookups), and the index writes their limits into
# ``M[M_REFMAX]`` and ``M[M_EPWRAP]``.
REF_DTYPE = "uint16"
REF_MAX = 0xFFFF
EP_DTYPE = "int32"

# -- per-access result codes (``access``'s ``code`` output) -------------------------------------
HIT = 0  # the row's bytes are in its slot
FILL = 1  # admitted by this lookup: read it from below, then write it into its slot
BELOW = 2  # not served by this tier (bypass, or a slot another lookup is still filling)

# -- tier kinds for the walk -------------------------------------------------------------------
NONE = 0  # disabled: every row comes from below
CACHED = 1  # a budgeted tier with a policy (or a read-only shared tier: policy "static")
RESIDENT = 2  # the slab is the table: slot == row
