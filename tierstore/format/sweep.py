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
contiguous id range less the hot ids in it) and on the way hands each hot row, in id order,
and the cold rows of the head's last chunk, to the head's rank pass
(:class:`tierstore.format.rankspill.RankSpill`); each head chunk is then gathered out of it
in rank order (``index_select`` into the chunk buffer). A head up to ``HEAD_BYTES`` stays in
memory (the rows are gathered straight into it); a larger one is spilled into the head's own
region of the row file, bucket by bucket (``BUCKET_BYTES`` of whole chunks), and each bucket
read back once, in one sequential read, when its first chunk is written. So the checkpoint is
read exactly once whatever the head's size (it used to be read once more per ``HEAD_BYTES`` of
head: 16 sweeps of a 189 GiB checkpoint for V4.1's 16 GiB head), and a spilled head costs one
extra write and read of its own bytes. Copies are torch index ops (they release the GIL, so
they overlap the writer's and the reader's threads); no indexed write anywhere (an
``index_copy_`` scatter into rank order was ~5x slower than the gather). Memory: the head
buffer (at most ``HEAD_BYTES``) or one bucket plus the staging buffers (``rankspill``), the
gather index (8 bytes per head row), two read chunks per tensor, and per-chunk index arrays;
nothing sized by the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .hotorder import HotOrder
from .prefetch import RowPrefetcher
from .quant import NAN_SCALE
from .rankspill import BUCKET_BYTES, RankSpill, widest_word
from .spec import DTYPES, PAGE_SIZE, TableInfo

__all__ = ["OrderedSweep", "HEAD_BYTES", "HEAD_ROWS", "widest_word"]

HEAD_BYTES = 1 << 30  # a head up to this is held in memory; a larger one spills (format.rankspill)
HEAD_ROWS = 1 << 24  # and up to this many rows (the gather index is 8 bytes a row: 128 MiB)


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
    :func:`tierstore.format.writer.write_row_file` writing table ``info`` in ``order`` into
    the row file ``path``.

    ``parts``: (tensor, first byte, last byte of the row, source dtype or None for raw bytes)
    per source tensor: the row's values, and for a quantized table its scales. A quantized
    table's NaN scales (``scale`` tensor) are added to ``nan_scales[0]`` as the sweep meets them.
    Not thread-safe: one caller thread (the build's filler).
    """

    def __init__(self, ckpt: Checkpoint, info: TableInfo, step: int, order: HotOrder,
                 parts: list[tuple[str, int, int, str | None]], path: Path, scale: str | None = None,
                 nan_scales: list[int] | None = None) -> None:
        self.info, self.step, self.order, self.path = info, step, order, path
        self.rows, self.k = info.rows, order.hot.size
        self.head_rows = min(self.rows, -(-self.k // step) * step)  # H: positions 0:H are the head
        tail = list(range(self.head_rows, self.rows, step))
        self.starts = tail + list(range(0, self.head_rows, step))
        self.parts, self.scale, self.nan_scales = parts, scale, nan_scales
        self.readers = {t: _Reader(ckpt, t, step) for t, *_ in parts}
        self.spill: RankSpill | None = None  # the head's rows, in the order the sweep meets them
        self.next_id = 0  # the sweep's progress
        self._scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # gathered rows, per tensor
        self._rows: torch.Tensor | None = None  # (step, row_stride) uint8: head rows on their way to a spilled pass

    def _head(self) -> RankSpill:
        """The head's rank pass, opened on the row file once ``write_row_file`` has created it:
        in memory when the head fits ``HEAD_BYTES`` (and ``HEAD_ROWS``), else spilled into the
        head's own region of the row file in buckets of ``BUCKET_BYTES`` (whole chunks)."""
        if self.spill is None:
            self.spill = RankSpill(self.path, PAGE_SIZE, self.head_rows, self.info.row_stride, memory=HEAD_BYTES,
                                   bucket_bytes=min(BUCKET_BYTES, HEAD_BYTES), multiple=self.step,
                                   max_rows=HEAD_ROWS)
        return self.spill

    def _to_head(self, pos: np.ndarray, src: dict[str, torch.Tensor], sel: slice | torch.Tensor) -> None:
        """Rows ``sel`` of the read chunk, bound for head positions ``pos``, into the rank pass."""
        spill = self._head()
        if spill.resident:  # gathered straight into the head buffer
            dst = spill.slots(pos)
            for part in self.parts:
                self._put(dst, part, src[part[0]], sel)
            return
        if self._rows is None:  # padding columns zero, and left so
            self._rows = torch.zeros((self.step, self.info.row_stride), dtype=torch.uint8)
        dst = self._rows[: len(pos)]
        for part in self.parts:
            self._put(dst, part, src[part[0]], sel)
        spill.add(pos, dst)

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
        """Advance the sweep to id ``hi``: the head's rows (hot ones, and the cold ones of the
        head's last chunk) into the rank pass, the cold rows at positions
        ``out_start : out_start + len(out)`` into ``out``."""
        step, k, H = self.step, self.k, self.head_rows
        n_out = len(out) if out is not None else 0
        while self.next_id < hi:
            a = self.next_id
            j = a // step
            b = min(hi, (j + 1) * step)
            base = j * step
            src = {t: r.chunk(j) for t, r in self.readers.items()}  # the same chunk again is no new read
            i0, ids, pos = self.order.hot_between(a, b)
            i1 = i0 + ids.size
            if i1 > i0:  # hot rows in a:b, in id order: a gather out of the read chunk
                first = int(ids[0]) - base
                run = int(ids[-1]) - base - first == ids.size - 1  # a run of ids (every row hot): one slice
                self._to_head(pos, src, slice(first, first + ids.size) if run else torch.from_numpy(ids - base))
            # cold rows of a:b: positions p0 : p0 + n, in ascending id
            p0, n = k + a - i0, (b - a) - (i1 - i0)
            if i1 > i0:
                mask = np.ones(b - a, dtype=bool)
                mask[ids - a] = False
                cold = torch.from_numpy(np.flatnonzero(mask) + (a - base))
            lo, hi_ = max(p0, k), min(p0 + n, H)  # the head's last chunk: cold rows past the hot ones
            if lo < hi_:
                sel = slice(a - base + lo - p0, a - base + hi_ - p0) if i1 == i0 else cold[lo - p0: hi_ - p0]
                self._to_head(np.arange(lo, hi_, dtype=np.int64), src, sel)
            lo, hi_ = max(p0, out_start), min(p0 + n, out_start + n_out)
            if lo < hi_ and out is not None:
                sel = slice(a - base + lo - p0, a - base + hi_ - p0) if i1 == i0 else cold[lo - p0: hi_ - p0]
                for part in self.parts:
                    self._put(out[lo - out_start: hi_ - out_start], part, src[part[0]], sel)
            if self.scale is not None and self.nan_scales is not None:
                self.nan_scales[0] += int((src[self.scale][a - base: b - base] == NAN_SCALE).sum())
            self.next_id = b

    # -- write_row_file's callbacks --------------------------------------------------------------

    def fill(self, start: int, stop: int, out_np: np.ndarray) -> None:
        out = torch.from_numpy(out_np)
        if start >= self.head_rows:  # a tail chunk: the sweep up to its last cold row
            hi = self.rows if stop == self.rows else int(self.order.ids(stop - 1, stop)[0]) + 1
            self._consume(hi, out, start)
            return
        if self.next_id < self.rows:  # the first head chunk: the sweep's rest (head rows only)
            self._consume(self.rows, None, self.rows)
        self._head().gather(start, stop, out)  # rows in rank order, straight into the chunk

    def hint(self, start: int, stop: int) -> None:
        """Nothing: the readers read one chunk ahead by themselves."""

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        if self.spill is not None:
            self.spill.close()

