"""Where a lookup's rows go on the CPU, as two compiled calls (GIL-free): ``move_cpu``.

After the walk (tierstore.cache.walk.lookup) has said, per id, which device slot holds it
or admitted it (``d_code``/``d_slot``) and, per row below the device tier, which host slot
holds it or admitted it (``h_code``/``h_slot``), the bytes move:

1. ``place_memory``, once per lookup: device hits and host hits into their output
   positions, host hits into the device slots the walk admitted them to; for the rows read
   from disk it lists them (``cold``) and groups their output positions by row (a counting
   sort: ``start``/``pos``) and notes their admitted device slot (``dfill``).
2. ``place_arrived``, once per chunk of rows the disk tier has read and verified (from the
   chunk's thread: at most two at once, on disjoint rows, so disjoint slots and positions):
   each row into the host slot and device slot the walk admitted it to and into each of its
   output positions.

Every copy is a row of bytes (uint8 ``[*, row bytes]`` views of the slabs and of ``out``:
one specialization for every dtype), so rows stay bit-exact. The slots written are the
lookup's own FILL slots, leased and pending until the lookup ends (cache.walk.access): no
other lookup reads them before then, so no lock is held while they are written (as before).

Why: the same work as a dozen numpy and torch calls per lookup and three per chunk (each
~5-20 us of fixed cost, under the GIL) cost ~1.7 ms of a V4.1 decode step's CPU on a loaded
2-core machine (issue 19); here it is two calls plus one per chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from ..cache.layout import FILL, HIT
from ..jit import kernel, specialized

__all__ = ["move_cpu", "place_memory", "place_arrived"]


@kernel
def place_memory(dslab, hslab, out, d_code, d_slot, need_of, h_code, h_slot, m, start, pos, dfill, cold,
                 cold_rows, need):  # pragma: no cover - compiled
    """Copy the device hits and host hits of a lookup of ``out.shape[0]`` ids into ``out``
    and the host hits the device tier admitted into their device slots; prepare the rows
    below the host tier (``m`` rows ``need``, each with ``h_code``/``h_slot``). Fills
    ``cold[:k]`` (need indices read from disk, ascending), ``cold_rows[:k]`` (their rows),
    ``dfill[j]`` (device slot admitted for need j, -1 none) and ``start``/``pos`` (the output
    positions of need j: ``pos[start[j]:start[j + 1]]``, ascending). Returns (k, identity,
    host hits): identity when output position i is need row i for every i (read straight
    into ``out``)."""
    n, w = out.shape[0], out.shape[1]
    for j in range(m + 1):
        start[j] = 0
    for j in range(m):
        dfill[j] = -1
    identity = n == m
    for i in range(n):
        c = d_code[i]
        if c == HIT:
            identity = False
            s = d_slot[i]
            for b in range(w):
                out[i, b] = dslab[s, b]
            continue
        j = need_of[i]
        if j != i:
            identity = False
        if h_code[j] == HIT:
            hs = h_slot[j]
            for b in range(w):
                out[i, b] = hslab[hs, b]
            if c == FILL and dfill[j] < 0:  # a repeated id: its slot once
                ds = d_slot[i]
                for b in range(w):
                    dslab[ds, b] = hslab[hs, b]
                dfill[j] = ds
            continue
        start[j + 1] += 1
        if c == FILL:
            dfill[j] = d_slot[i]
    for j in range(m):
        start[j + 1] += start[j]
    k = 0
    hits = 0
    for j in range(m):
        if h_code[j] == HIT:
            hits += 1
        else:
            cold[k] = j
            cold_rows[k] = need[j]
            k += 1
    if k == 0:
        return 0, False, hits
    nxt = start[:m].copy()  # counting sort: output positions of the cold rows, by need index
    for i in range(n):
        if d_code[i] != HIT:
            j = need_of[i]
            if h_code[j] != HIT:
                pos[nxt[j]] = i
                nxt[j] += 1
    return k, identity and k == m, hits


@kernel
def place_arrived(src, sel, cold, h_code, h_slot, hslab, dfill, dslab, start, pos, out,
                  in_out):  # pragma: no cover - compiled
    """Rows ``src[sel[q]]`` (need index ``cold[sel[q]]``) have arrived: each into the host
    slot the host tier admitted it to, the device slot the device tier did, and (unless
    ``in_out``: they are in ``out`` already) each of its output positions."""
    w = src.shape[1]
    for q in range(sel.size):
        r = sel[q]
        j = cold[r]
        if h_code[j] == FILL:
            hs = h_slot[j]
            for b in range(w):
                hslab[hs, b] = src[r, b]
        ds = dfill[j]
        if ds >= 0:
            for b in range(w):
                dslab[ds, b] = src[r, b]
        if not in_out:
            for p in range(start[j], start[j + 1]):
                i = pos[p]
                for b in range(w):
                    out[i, b] = src[r, b]


_entry: dict[str, object] = {}  # the compiled entry points (jit.specialized: no per-call type dispatch)


def _entries(args_memory: tuple, args_arrived: tuple | None) -> tuple[object, object]:
    if "memory" not in _entry:
        _entry["memory"] = specialized(place_memory, *args_memory)
    if args_arrived is not None and "arrived" not in _entry:
        _entry["arrived"] = specialized(place_arrived, *args_arrived)
    return _entry["memory"], _entry.get("arrived")


def move_cpu(lk, dslab: np.ndarray, hslab: np.ndarray, out: torch.Tensor, disk) -> int:
    """The CPU path of a begun lookup ``lk`` that reaches below the device tier (``lk.m`` > 0):
    ``dslab``/``hslab`` the device and host slabs' bytes (uint8 ``[slots, row bytes]``,
    C-contiguous), ``out`` (C-contiguous, its rows' bytes the same width), ``disk`` the disk
    tier (``DiskTier.read``, whose ``on_chunk`` places each chunk as it is verified).
    Returns the host hits (distinct rows), for a resident host tier's counter."""
    n, m = lk.d_code.size, lk.m
    ob = out.view(torch.uint8).numpy()
    buf = np.empty(2 * n + 4 * m + 1, dtype=np.int64)  # one allocation for the index arrays
    start, pos, dfill = buf[: m + 1], buf[m + 1 : m + 1 + n], buf[m + 1 + n : 2 * m + 1 + n]
    cold, cold_rows = buf[2 * m + 1 + n : 3 * m + 1 + n], buf[3 * m + 1 + n : 4 * m + 1 + n]
    args = (dslab, hslab, ob, lk.d_code, lk.d_slot, lk.need_of, lk.h_code, lk.h_slot, m, start, pos, dfill, cold,
            cold_rows, lk.need)
    memory, _ = _entries(args, None)
    k, identity, hits = memory(*args)
    if k == 0:
        return hits
    rows = cold_rows[:k]
    if identity:  # out[i] is row need[i] and every one is read from disk: straight into out
        dst, db = out, ob
    else:
        dst = torch.empty((k, out.shape[1]), dtype=out.dtype)
        db = dst.view(torch.uint8).numpy()
    h_code, h_slot = lk.h_code, lk.h_slot
    arrived = None

    def on_chunk(sel: np.ndarray, got: torch.Tensor) -> None:
        # ``got`` is dst[sel] (DiskTier.read writes every chunk's rows at their positions in
        # its ``out`` before this call), so the kernel reads them from ``db``
        a = (db, sel, cold, h_code, h_slot, hslab, dfill, dslab, start, pos, ob, identity)
        nonlocal arrived
        if arrived is None:
            arrived = _entries(args, a)[1]
        arrived(*a)

    disk.read(rows, dst, on_chunk=on_chunk)
    return hits

