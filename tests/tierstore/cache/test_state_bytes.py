"""A tier's bookkeeping per slot (issue 19: policy state in O(budget), as small as is safe):
int32 wherever the values fit, the hint table only once a hint arrives, lease markers
that wrap instead of growing and also mark pending fills, free slots as a counter."""

from __future__ import annotations

import numpy as np
import pytest

from tierstore.cache import CacheIndex, policy_names
from tierstore.cache.layout import BELOW, CACHED, FILL, HIT, M_EPOCH, M_HLIVE, NONE
from tierstore.cache.lookup import Walker
from tierstore.cache.walk import EPOCH_WRAP

CAP = 4096
# bytes per slot at 4,096 slots with a profile, ghosts and the row map included (before:
# lru 60, lfu 92, s3fifo 112, wtinylfu 65, arc 116, static 60, default 248)
PER_SLOT = {"lru": 45, "lfu": 77, "s3fifo": 79, "wtinylfu": 50, "arc": 81, "static": 45, "default": 99}


def _index(name: str, n_rows: int = 10**6) -> CacheIndex:
    rng = np.random.default_rng(7)
    hot = rng.choice(n_rows, size=3 * CAP, replace=False)
    return CacheIndex(n_rows, CAP, name, profile=(hot, np.maximum(1, 10**6 // np.arange(1, hot.size + 1))))


@pytest.mark.parametrize("name", policy_names())
def test_state_bytes_per_slot(name):
    idx = _index(name)
    per_slot = idx.nbytes / CAP
    assert per_slot <= PER_SLOT[name], f"{name}: {per_slot:.1f} B per slot (bound {PER_SLOT[name]})"
    assert idx.nbytes == sum(a.nbytes for a in idx.state)


def test_default_allocates_its_hint_table_on_the_first_hint():
    """No hint, no table: 96 bytes per slot saved. A Walker built before the first hint takes
    up the new state (its lookups consume the hints: M_HLIVE back to 0), whichever way the
    hint came (the index's own ``hint`` or the Walker's ``announce``)."""
    for via_walker in (False, True):
        idx = _index("default")
        w = Walker(idx, CACHED, None, NONE)
        before = idx.nbytes
        rows = np.arange(100, 164, dtype=np.int64)  # rows past the ranked core: dynamic misses
        if via_walker:
            w.announce(rows)
        else:
            idx.hint(rows)
        assert idx.nbytes - before > 64 * CAP, "the hint table was not allocated"  # 24 B x 4 x dynamic slots
        assert idx.state[0][M_HLIVE] == rows.size
        lk = w.begin(rows)
        w.end(lk)
        assert idx.state[0][M_HLIVE] == 0, "the walker looked the rows up in a stale hint table"
        assert w.dstate is idx.state


@pytest.mark.parametrize("name", ["lru", "default"])
def test_lease_markers_wrap(name):
    """The lease markers are int32: the lookup counter restarts below 2**31, and a row
    admitted earlier in the same lookup is still that lookup's FILL across the wrap."""
    idx = _index(name)
    idx.state[0][M_EPOCH] = 2**31 + 5  # as if 2**31 lookups had run (past int32 without the wrap)
    for i in range(3):
        a, b = 900_001 + 2 * i, 900_002 + 2 * i  # new rows each time, unranked: misses
        rows = np.array([a, a, b, a], dtype=np.int64)
        slots, codes, leased = idx.access(rows)
        admitted = codes[0] == FILL
        if admitted:
            assert codes.tolist() == [FILL, FILL, FILL, FILL], codes
            assert slots[0] == slots[1] == slots[3] != slots[2]
        else:
            assert (codes == BELOW).all()
        assert leased.size == len(set(slots[codes != BELOW].tolist())), "a slot leased twice in one lookup"
        idx.finish(leased)
        assert (idx.refcount == 0).all()
        assert 0 < idx.state[0][M_EPOCH] < EPOCH_WRAP
        idx.state[0][M_EPOCH] = EPOCH_WRAP - 1  # the next lookup wraps


@pytest.mark.parametrize("name", ["lru", "default"])
def test_a_pending_fill_stays_pending_across_the_wrap(name):
    """A row admitted by a lookup that has not ended (its bytes not yet written) is BELOW
    for every other lookup, also one that starts the epochs again."""
    idx = _index(name)
    a = np.array([950_001], dtype=np.int64)
    slots, codes, leased_a = idx.access(a)
    assert codes.tolist() == [FILL]
    idx.state[0][M_EPOCH] = EPOCH_WRAP - 1  # the next lookup wraps
    _, codes_b, leased_b = idx.access(a)
    assert codes_b.tolist() == [BELOW], "a concurrent lookup would read a slot whose bytes are not written"
    idx.finish(leased_b)
    idx.finish(leased_a)  # now its bytes are in place
    _, codes_c, leased_c = idx.access(a)
    assert codes_c.tolist() == [HIT]
    idx.finish(leased_c)
    assert (idx.refcount == 0).all()
