"""The hot-ordered build's filler: the checkpoint read once, front to back, at the disk's speed.

A hot-ordered row file holds the profile's ``k`` accessed rows first (hottest first: their ids
are scattered over the whole table), then every other ("cold") row in ascending id
(:class:`tierstore.format.hotorder.HotOrder`). Filling it in file order read the checkpoint
twice: the head's rows by spans over the whole table (with 1% hot rows nearly every span is
read), then the cold rows again; buffered, in the filler's thread, nothing read ahead; then
gathered with numpy (which holds the GIL) into a temporary and copied again. That ran at
0.14-0.53x of a direct-I/O copy.

So the build writes the file's chunks out of order (:func:`tierstore.format.writer.write_row_file`
takes the order; each chunk lands at its own offset, and the file is published only once
whole): first the **tail** (the chunks wholly past the head, all cold rows), then the **head**
chunks (positions ``0 : H``, ``H`` the first chunk boundary at or past ``k``). One sequential
sweep of the checkpoint, through :class:`RowPrefetcher` (``O_DIRECT``, the next read chunk read
while this one is used), fills the tail chunk by chunk (a tail chunk's cold rows are one
contiguous id range less the hot ids in it) and on the way appends each hot row, in id order,
and the cold rows of the head's last chunk, to a page-aligned head buffer; each head chunk is
then gathered out of it in rank order (``index_select`` into the chunk buffer). Both copies
write sequentially; the one random access is the gather's read. (The head used to be
scattered into rank order as the sweep went, ``index_copy_`` at random rows of a 1 GiB buffer:
~5x slower than the gather, 0.05-0.11x dd with every row hot.) Copies are torch index ops
(they release the GIL, so they overlap the writer's and the reader's threads). Reads: the
table once when the head fits ``HEAD_BYTES``; a larger head is built in groups of
``HEAD_BYTES``, one more sweep per group (so memory stays bounded whatever the profile's
size). Memory: the head buffer (at most ``HEAD_BYTES``), its gather index (4 bytes per head
row of the group), two read chunks per tensor, and per-chunk index arrays; nothing sized by
the table.
"""

from __future__ import annotations

import numpy as np
import torch

from .checkpoint import Checkpoint
from .hotorder import HotOrder
from .prefetch import RowPrefetcher, aligned_buffer
from .quant import NAN_SCALE
from .spec import DTYPES, TableInfo

__all__ = ["OrderedSweep", "HEAD_BYTES", "widest_word"]

HEAD_BYTES = 1 << 30  # the head buffer's cap; a larger head costs one more sweep per this much
HEAD_ROWS = 1 << 24  # and its rows' (the gather index is 4 bytes a row: 64 MiB)


def widest_word(*ts: torch.Tensor) -> torch.dtype:
    """The widest integer dtype every uint8 matrix in ``ts`` can be viewed as (rows, offset and
    row stride all multiples of its size)."""
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if all(t.shape[1] % size == 0 and t.storage_offset() % size == 0 and t.stride(0) % size == 0 for t in ts):
            return dtype
    return torch.uint8


class _Reader:
    """Read chunk ``j`` (rows ``j*step : (j+1)*step``) of one tensor; chunk ``j+1`` is read ahead
    (``O_DIRECT``, safetensors) while ``j`` is used. Chunk ``j``'s rows stay valid until
    chunk ``j+2`` is asked for."""

    def __init__(self, ckpt: Checkpoint, tensor: str, step: int) -> None:
        self.ckpt, self.tensor, self.step = ckpt, tensor, step
        meta = ckpt.tensors[tensor]
        self.rows = meta.shape[0]
        self.ahead = RowPrefetcher(ckpt, tensor, step) if meta.file.suffix == ".safetensors" else None
        self.scratch = None if self.ahead else np.empty(step * meta.shape[1] * meta.element_size, dtype=np.uint8)
        self.last: tuple[int, torch.Tensor] | None = None  # the chunk in use: asked for again across fills
        self.prefetch(0)

    def prefetch(self, j: int) -> None:
        if self.ahead is not None and j * self.step < self.rows:
            self.ahead.prefetch(j * self.step, min((j + 1) * self.step, self.rows))

    def chunk(self, j: int) -> torch.Tensor:
        if self.last is not None and self.last[0] == j:
            return self.last[1]
        start, stop = j * self.step, min((j + 1) * self.step, self.rows)
        if self.ahead is None:
            rows = self.ckpt.read_rows(self.tensor, start, stop, out=self.scratch)
        else:
            rows = self.ahead.rows(start, stop)
            self.prefetch(j + 1)
        self.last = (j, torch.from_numpy(rows))
        return self.last[1]

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()


class OrderedSweep:
    """``fill``/``hint``/``close`` and the chunk order (``starts``) for
    :func:`tierstore.format.writer.write_row_file` writing table ``info`` in ``order``.

    ``parts``: (tensor, first byte, last byte of the row, source dtype or None for raw bytes)
    per source tensor: the row's values, and for a quantized table its scales. A quantized
    table's NaN scales (``scale`` tensor) are added to ``nan_scales[0]`` on the first sweep.
    Not thread-safe: one caller thread (the build's filler).
    """

    def __init__(self, ckpt: Checkpoint, info: TableInfo, step: int, order: HotOrder,
                 parts: list[tuple[str, int, int, str | None]], scale: str | None = None,
                 nan_scales: list[int] | None = None) -> None:
        self.info, self.step, self.order = info, step, order
        self.rows, self.k = info.rows, order.hot.size
        self.head_rows = min(self.rows, -(-self.k // step) * step)  # H: positions 0:H are the head
        self.group = max(step, min(HEAD_BYTES // info.row_stride, HEAD_ROWS) // step * step)  # head rows per sweep
        tail = list(range(self.head_rows, self.rows, step))
        self.starts = tail + list(range(0, self.head_rows, step))
        self.parts, self.scale, self.nan_scales = parts, scale, nan_scales
        self.readers = {t: _Reader(ckpt, t, step) for t, *_ in parts}
        self.head: torch.Tensor | None = None  # (group rows, row_stride) uint8: hot rows by id, then cold
        self.slot: torch.Tensor | None = None  # head row of position g0 + i (int32)
        self.g0 = self.g1 = -1  # head positions g0 : g1 are in self.head
        self.n_hot = 0  # the group's hot rows appended to self.head so far
        self.next_id, self.swept = 0, 0  # the sweep's progress; sweeps finished
        self._scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # gathered rows, per tensor

    # -- the sweep -------------------------------------------------------------------------------

    def _begin(self, g0: int) -> None:
        """Start a sweep that collects head positions ``g0 : g0 + group``."""
        n = min(self.group, self.head_rows - g0)
        if self.head is None or self.head.shape[0] < n:
            buf = aligned_buffer(n * self.info.row_stride, populate=True)  # filled whole: no fault per page
            self.head = torch.from_numpy(buf.reshape(n, self.info.row_stride))
        self.g0, self.g1, self.next_id, self.n_hot = g0, g0 + n, 0, 0
        self.slot = None
        # The head buffer's rows: the group's hot rows (positions g0 : min(g1, k)) in ascending id,
        # as the sweep meets them, then the cold rows of positions k : g1 at row p - g0. slot[i]
        # is the buffer row of position g0 + i: for a hot row, how many of the group's hot rows
        # have a smaller id.
        nh = max(0, min(self.g1, self.k) - g0)
        slot = np.arange(n, dtype=np.int32)
        if nh:
            rank = self.order.sorted_ranks()  # position of each hot id, ascending id
            if g0 == 0 and nh == self.k:  # every hot row in this group: its slot is its sorted index
                slot[rank] = np.arange(nh, dtype=np.int32)
            else:
                mine = np.flatnonzero((rank >= g0) & (rank < g0 + nh))  # ascending id
                slot[rank[mine] - g0] = np.arange(nh, dtype=np.int32)
        self.slot = torch.from_numpy(slot)
        if g0 > 0:  # a later sweep: start reading its first chunk now
            for r in self.readers.values():
                r.prefetch(0)

    def _put(self, dst: torch.Tensor, part: tuple[str, int, int, str | None], src: torch.Tensor,
             sel: slice | torch.Tensor) -> None:
        """Rows ``sel`` of ``src`` (one tensor's read chunk) into ``dst`` (rows of the row file,
        all of them, in order), that tensor's bytes of each row."""
        _, c0, c1, dtype = part
        cols = dst[:, c0:c1]
        if dtype is not None and dtype != self.info.dtype:  # convert (round to nearest)
            cols = cols.view(DTYPES[self.info.dtype][0])
            src = src.view(DTYPES[dtype][0])
        else:  # bytes: moved as the widest words both sides allow (index_select of uint8 is ~3x slower)
            w = widest_word(src, cols)
            src, cols = src.view(w), cols.view(w)
        if isinstance(sel, slice):  # a run of rows: one copy
            rows = src[sel]
        elif cols.is_contiguous() and cols.dtype == src.dtype:  # gathered straight into the rows
            torch.index_select(src, 0, sel, out=cols)
            return
        else:  # gathered into a scratch reused across chunks (a fresh 32 MiB result page-faults every chunk)
            key = (part[0], src.dtype)
            need = sel.numel() * src.shape[1]
            if key not in self._scratch or self._scratch[key].numel() < need:
                self._scratch[key] = torch.empty(max(need, self.step * src.shape[1]), dtype=src.dtype)
            rows = self._scratch[key][:need].view(sel.numel(), src.shape[1])
            torch.index_select(src, 0, sel, out=rows)
        cols.copy_(rows)  # converts the dtype where it differs

    def _consume(self, hi: int, out: torch.Tensor | None, out_start: int) -> None:
        """Advance the sweep to id ``hi``: hot rows of the current group into the head buffer,
        cold rows into the head buffer or, at positions ``out_start : out_start + len(out)``, into ``out``."""
        step, k, g0, g1 = self.step, self.k, self.g0, self.g1
        while self.next_id < hi:
            a = self.next_id
            j = a // step
            b = min(hi, (j + 1) * step)
            base = j * step
            src = {t: r.chunk(j) for t, r in self.readers.items()}  # the same chunk again is no new read
            i0, ids, pos = self.order.hot_between(a, b)
            i1 = i0 + ids.size
            if i1 > i0:  # hot rows in a:b whose position is in this group
                keep = (pos >= g0) & (pos < g1)
                m = int(np.count_nonzero(keep))
                if m:  # appended in id order: a gather out of the read chunk, written sequentially
                    kept = ids[keep]
                    first = int(kept[0]) - base
                    # a run of ids (every row hot): one slice copy, else a gather
                    run = int(kept[-1]) - base - first == m - 1
                    local = slice(first, first + m) if run else torch.from_numpy(kept - base)
                    for part in self.parts:
                        self._put(self.head[self.n_hot : self.n_hot + m], part, src[part[0]], local)
                    self.n_hot += m
            # cold rows of a:b: positions p0 : p0 + n, in ascending id
            p0, n = k + a - i0, (b - a) - (i1 - i0)
            if i1 > i0:
                mask = np.ones(b - a, dtype=bool)
                mask[ids - a] = False
                cold = torch.from_numpy(np.flatnonzero(mask) + (a - base))
            for lo, hi_, dst, d0 in ((max(p0, g0, k), min(p0 + n, g1), self.head, g0),
                                     (max(p0, out_start), min(p0 + n, out_start + (len(out) if out is not None else 0)),
                                      out, out_start)):
                if lo >= hi_ or dst is None:
                    continue
                sel = slice(a - base + lo - p0, a - base + hi_ - p0) if i1 == i0 else cold[lo - p0 : hi_ - p0]
                for part in self.parts:
                    self._put(dst[lo - d0 : hi_ - d0], part, src[part[0]], sel)
            if self.swept == 0 and self.scale is not None and self.nan_scales is not None:
                self.nan_scales[0] += int((src[self.scale][a - base : b - base] == NAN_SCALE).sum())
            self.next_id = b

    # -- write_row_file's callbacks --------------------------------------------------------------

    def fill(self, start: int, stop: int, out_np: np.ndarray) -> None:
        out = torch.from_numpy(out_np)
        if start >= self.head_rows:  # a tail chunk: sweep 0 up to its last cold row
            if self.g0 < 0:
                self._begin(0)
            hi = self.rows if stop == self.rows else int(self.order.ids(stop - 1, stop)[0]) + 1
            self._consume(hi, out, start)
            return
        g0 = start // self.group * self.group
        if self.g0 != g0 or self.next_id < self.rows:  # this group's sweep is not done: do it now
            if self.g0 != g0:
                if self.g0 >= 0:
                    self.swept += 1
                self._begin(g0)
            self._consume(self.rows, None, self.rows)
        assert self.head is not None and self.slot is not None and stop <= self.g1
        assert self.n_hot == max(0, min(self.g1, self.k) - g0), "the sweep missed hot rows"
        w = widest_word(out, self.head)  # rows in rank order: gathered straight into the chunk
        torch.index_select(self.head.view(w), 0, self.slot[start - g0 : stop - g0], out=out.view(w))

    def hint(self, start: int, stop: int) -> None:
        """Nothing: the readers read one chunk ahead by themselves."""

    def close(self) -> None:
        for r in self.readers.values():
            r.close()

