"""Exact access counts per row id of a long id stream, in memory sized by its distinct ids.

The V4.1 sizing study (benchmarks/v41_sizing.py) counts, per table and n-gram order, how
often each row was read over 10M tokens (80M lookups per order), and how many distinct rows
were read after 1K, 2K, 5K, ... tokens. ``np.unique`` per document did that at ~330 ns per id
(numpy 2.4's hash-based unique on a few thousand ids at a time, then a bitmap of the table's
rows); this keeps the counts as two sorted arrays (ids, counts) and adds ids in chunks:

- ``add`` copies ids into a fixed buffer (``chunk`` ids, 32 MiB by default);
- a full buffer (or ``flush``) is sorted (``np.sort``), cut into runs (``_run_lengths``) and
  merged into the sorted counts in one linear pass (``_merge_counts``).

Memory: 8 bytes per distinct id held, plus the buffer, plus the merge's output while it
runs (the old and new arrays: 16 bytes per distinct id at the peak). Nothing is sized by
the table's rows: 40M distinct ids of a 384M-row table take 320 MB, where a table-sized
count array would take 1.5 GB. Time: a sort of each chunk plus a pass over the distinct ids
per flush (the study flushes at its checkpoints and every ``chunk`` ids).
"""

from __future__ import annotations

import numpy as np

from tierstore.jit import kernel

__all__ = ["RowCounter"]

_COUNT_MAX = np.iinfo(np.uint32).max


@kernel
def _run_lengths(s, out_ids, out_cnt):  # pragma: no cover - compiled
    """Distinct values of the sorted ``s`` and how often each occurs; returns how many."""
    k = 0
    n = s.size
    i = 0
    while i < n:
        v = s[i]
        j = i + 1
        while j < n and s[j] == v:
            j += 1
        out_ids[k] = v
        out_cnt[k] = j - i
        k += 1
        i = j
    return k


@kernel
def _merge_counts(a_ids, a_cnt, b_ids, b_cnt, out_ids, out_cnt):  # pragma: no cover - compiled
    """Merge two sorted (ids, counts) without repeats into one, adding the counts of ids in
    both; returns its length."""
    i = 0
    j = 0
    k = 0
    na = a_ids.size
    nb = b_ids.size
    while i < na and j < nb:
        x = a_ids[i]
        y = b_ids[j]
        if x < y:
            out_ids[k] = x
            out_cnt[k] = a_cnt[i]
            i += 1
        elif y < x:
            out_ids[k] = y
            out_cnt[k] = b_cnt[j]
            j += 1
        else:
            out_ids[k] = x
            out_cnt[k] = a_cnt[i] + b_cnt[j]
            i += 1
            j += 1
        k += 1
    while i < na:
        out_ids[k] = a_ids[i]
        out_cnt[k] = a_cnt[i]
        i += 1
        k += 1
    while j < nb:
        out_ids[k] = b_ids[j]
        out_cnt[k] = b_cnt[j]
        j += 1
        k += 1
    return k


class RowCounter:
    """How often each id of a stream occurred: ``add`` ids, read ``distinct``, ``ids``,
    ``counts`` (sorted by id; each flushes the buffer first). Counts are exact (uint32: a
    stream of more than 2**32 - 1 ids is refused)."""

    def __init__(self, dtype: type = np.int32, chunk: int = 1 << 23):
        if chunk < 1:
            raise ValueError(f"chunk={chunk}: the buffer must hold at least one id")
        self.dtype = np.dtype(dtype)
        self._ids = np.empty(0, self.dtype)
        self._cnt = np.empty(0, np.uint32)
        self._buf = np.empty(chunk, self.dtype)
        self._fill = 0
        self.lookups = 0

    def add(self, ids: np.ndarray) -> None:
        """Count every element of ``ids`` (any shape; cast to the counter's dtype, which must
        hold them: the caller's row ids)."""
        flat = np.asarray(ids).reshape(-1)
        if self.lookups + flat.size > _COUNT_MAX:
            raise OverflowError(f"{self.lookups + flat.size:,} ids: more than a uint32 count can hold; "
                                "count the stream in parts")
        self.lookups += flat.size
        pos = 0
        while pos < flat.size:
            n = min(flat.size - pos, self._buf.size - self._fill)
            self._buf[self._fill:self._fill + n] = flat[pos:pos + n]
            self._fill += n
            pos += n
            if self._fill == self._buf.size:
                self.flush()

    def flush(self) -> None:
        """Merge the buffered ids into the counts."""
        if not self._fill:
            return
        s = np.sort(self._buf[:self._fill])
        u_ids, u_cnt = np.empty(s.size, self.dtype), np.empty(s.size, np.uint32)
        nu = _run_lengths(s, u_ids, u_cnt)
        del s
        out_ids = np.empty(self._ids.size + nu, self.dtype)
        out_cnt = np.empty(self._ids.size + nu, np.uint32)
        k = _merge_counts(self._ids, self._cnt, u_ids[:nu], u_cnt[:nu], out_ids, out_cnt)
        self._ids, self._cnt = out_ids[:k], out_cnt[:k]  # the tail past k was never written: no pages
        self._fill = 0

    @property
    def distinct(self) -> int:
        self.flush()
        return int(self._ids.size)

    @property
    def ids(self) -> np.ndarray:
        """The distinct ids, ascending (a view: do not write)."""
        self.flush()
        return self._ids

    @property
    def counts(self) -> np.ndarray:
        """How often each id of ``ids`` occurred (a view: do not write)."""
        self.flush()
        return self._cnt
