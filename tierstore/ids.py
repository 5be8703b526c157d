"""The one validator of row ids: every public entry point that takes ids calls :func:`as_row_ids`.

It returns a private int64 copy by default. A ``prefetch``, whose work runs later on a
worker, must read the ids as they were at the call: a serving loop that refills
its id buffer right after ``prefetch`` returns would otherwise get other rows than it
asked for, and the range check done at the call would no longer cover what is read.
A synchronous ``lookup`` is done with them before it returns and skips the copy (~50 us
per 64K ids).
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from .jit import kernel, specialized
from .errors import IdTypeError, InvalidIdError

if TYPE_CHECKING:
    import torch

__all__ = ["IdLike", "as_row_ids", "check_id_tensor", "distinct"]

IdLike = Any  # torch integer tensor, numpy integer array, or a (nested, rectangular) sequence of ints

_INT64_MAX = np.iinfo(np.int64).max


@functools.cache
def _int_dtypes(torch: Any) -> frozenset:
    """torch's integer dtypes: ids of any other (floats, bool, complex, quantized, bits) are
    refused (quantized and bits tensors raised RuntimeError/NotImplementedError on .to())."""
    return frozenset((torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32,
                      torch.int64, torch.uint64))


def check_id_tensor(ids: torch.Tensor, where: str) -> None:
    """The checks of an id tensor that need none of its values (a CUDA tensor's values are
    checked later, once copied to the host without making the caller wait)."""
    import torch

    if ids.is_nested:  # ragged rows: no one shape to give the result (torch raises RuntimeError on .numpy())
        raise IdTypeError(f"ids for {where} are a nested tensor; pass a dense integer tensor "
                          "(torch.cat(ids.unbind()) for one flat batch, or ids.to_padded_tensor(0))")
    if ids.layout != torch.strided:
        raise IdTypeError(f"ids for {where} are a {ids.layout} tensor; pass a dense integer tensor (ids.to_dense())")
    if ids.is_meta:
        raise IdTypeError(f"ids for {where} are on the meta device and hold no values")
    if ids.dtype not in _int_dtypes(torch):
        raise IdTypeError(f"ids for {where} have dtype {ids.dtype}; pass an integer tensor (e.g. torch.long)")


def _to_numpy(ids: IdLike, where: str, copy: bool) -> np.ndarray:
    # torch is not imported here: a process that has not imported it holds no tensor, and
    # the tools that validate ids without one (`tierstore profile` of a trace) start ~1.5 s
    # faster without it
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(ids, torch.Tensor):
        check_id_tensor(ids, where)
        # integer tensors never require grad: no detach(). Attribute tests, not calls: a decode
        # step's ids pay each call here (~0.3-0.9 us apiece: detach, device.type, to())
        t = ids if ids.is_cpu else ids.cpu()
        if t.dtype is torch.int64 or t.dtype is torch.uint64:  # numpy keeps unsigned values for the range check
            arr = t.numpy()
        else:
            arr = t.to(torch.int64).numpy()
        return arr.copy() if copy else arr
    if ids is None or isinstance(ids, (str, bytes, dict, set)):
        raise IdTypeError(f"ids for {where} are {type(ids).__name__}; pass integers (int64 recommended)")
    try:
        arr = np.array(ids, copy=True) if copy else np.asarray(ids)
    except (ValueError, TypeError) as e:  # ragged nesting, objects numpy cannot convert
        raise IdTypeError(f"ids for {where} are not a rectangular array of integers ({e})") from None
    if arr.size == 0 and arr.dtype.kind == "f":  # `[]` parses as float64
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise IdTypeError(f"ids for {where} have dtype {arr.dtype}; pass integers (int64 recommended)")
    return arr


@kernel
def _first_out_of_range(flat, rows):  # pragma: no cover - compiled
    """Position of the first id outside [0, rows), -1 if none: one pass, no GIL (a numpy
    min() and max() cost ~3 us per call on a decode step's few dozen ids)."""
    for i in range(flat.size):
        v = flat[i]
        if v < 0 or v >= rows:
            return i
    return -1


_checker = None  # _first_out_of_range's compiled entry point (on first use)


def _range_check(flat: np.ndarray, rows: int) -> int:
    """``_first_out_of_range`` called through its compiled entry point: numba's per-call type
    dispatch costs more than the check of a decode step's ids."""
    global _checker
    if _checker is None:
        _checker = specialized(_first_out_of_range, flat, 0)
    return _checker(flat, int(rows))


def out_of_range(flat: np.ndarray, pos: int, rows: int, where: str) -> InvalidIdError:
    """The error for ``flat[pos]``, an id outside ``0..rows-1``."""
    return InvalidIdError(f"id {int(flat[pos])} at flat position {pos} is out of range for {where} "
                          f"with {rows} rows (valid ids are 0..{rows - 1})")


def as_row_ids(ids: IdLike, rows: int, *, where: str, copy: bool = True, check: bool = True
               ) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate ``ids`` for a table of ``rows`` rows; return them flat as int64 (a private
    copy unless ``copy=False``, for callers that are done with them before returning) and
    their shape. Raises ``IdTypeError`` (not integers, ragged, sparse, meta) or
    ``InvalidIdError`` (an id outside ``0..rows-1``, with its value and flat position).
    ``check=False``: every check but the range of signed ids, which the caller makes in its
    own compiled call and reports with ``out_of_range`` (``Store.hint``: one call less)."""
    arr = _to_numpy(ids, where, copy)
    shape = arr.shape
    flat = arr.reshape(-1)
    if flat.dtype != np.int64 or not flat.flags.c_contiguous:
        if flat.dtype.kind == "u":  # compare unsigned values before any conversion can wrap them
            if flat.size and flat.max() >= rows:
                raise out_of_range(flat, int(np.argmax(flat)), rows, where)  # the first largest
        flat = np.ascontiguousarray(flat, dtype=np.int64)
    if check and flat.size:
        pos = _range_check(flat, rows)
        if pos >= 0:
            raise out_of_range(flat, pos, rows, where)
    return flat, shape


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an integer array: one sort and a comparison of neighbours.

    Use it, not ``np.unique(a)``: numpy 2.4 answers a plain ``np.unique`` (no indices, no
    counts) from a hash table, 5x slower than this at 1,500 ids and 20x at 8M (23 s against
    1 s on this machine: 8M is the distinct rows of a V4.1-scale trace).
    """
    s = np.sort(np.asarray(values).reshape(-1))
    if s.size < 2:
        return s
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]

