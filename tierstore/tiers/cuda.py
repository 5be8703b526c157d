"""What the tiers' CUDA paths share, in one place, so the CPU path never reaches it.

Each helper exists because the reading of the CUDA paths found a fault:

- :func:`to_device`: a lookup's index arrays (slots, positions, inverse maps) go to the GPU
  as *one* pinned buffer in *one* non-blocking copy; pageable ``.to(cuda)`` copies block
  the thread and drain the stream, up to six per lookup before. On the CPU it returns the
  arrays as tensors without a copy, exactly as before.
- :class:`StreamFences`: a device slab is read and written by several CUDA streams (the
  workers' side streams, the callers' streams). Leases are released once a gather is
  *queued*, and a slot is visible once its fill is *queued*, so without events another
  stream could overwrite a slot a queued gather still reads, or read a slot before its
  fill ran. Every gather and fill records an event on its stream; a fill first makes its
  stream wait for the other streams' last gathers and fills, a gather for the other
  streams' fills since it last looked. A few events per lookup, never a device-wide sync.
- :class:`PinnedRegion`: pins exactly a tensor's bytes with ``cudaHostRegister`` (the
  caching host allocator behind ``pin_memory=True`` rounds a 20 GiB request up to a power
  of two and pins 32 GiB); also pins the shared host tier's mapping, which no allocator
  made. :func:`device_view` gives the GPU a tensor over such memory (zero-copy reads).
- :func:`check_device_room` and :func:`capacity_error`: budgets count GPU memory; an
  allocation that cannot fit raises ``CapacityError`` naming the budget, never a CUDA
  out-of-memory error from inside a worker.

Status: on a CUDA device none of this has ever run (no GPU where it was written). The CPU
tests run :func:`_pack` (the one-buffer packing), :class:`StreamFences`' ordering with
stand-in streams and events, :class:`PinnedRegion` with a stand-in runtime, and the room
check with stand-in figures (tests/tierstore/tiers/test_cuda_paths.py).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import CapacityError
from ..sizes import format_size

__all__ = ["to_device", "StreamFences", "PinnedRegion", "device_view", "check_device_room", "capacity_error",
           "HEADROOM"]

# GPU memory left free at open for what a lookup allocates besides the slabs (staged rows,
# index buffers, the disk reader's staging: a few MiB per worker) and for the CUDA context's
# own growth. Checked against cudaMemGetInfo's free figure before the slabs are allocated.
HEADROOM = 256 << 20

# cudaHostRegister flags (cuda_runtime_api.h)
_REGISTER_PORTABLE, _REGISTER_MAPPED, _REGISTER_READ_ONLY = 1, 2, 8


# ----------------------------------------------------------------------------- index arrays
def to_device(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The int64 ``arrays`` as tensors on ``device``: on the CPU, ``torch.from_numpy`` of each
    (no copy: the CPU path is unchanged); on CUDA all of them in one pinned buffer moved by
    one non-blocking copy on the current stream, split into views."""
    if device.type == "cpu":
        return [torch.from_numpy(a) for a in arrays]
    return _pack(arrays, device, pin=True)  # never run: needs CUDA


def _pack(arrays: Sequence[np.ndarray], device: torch.device, *, pin: bool) -> list[torch.Tensor]:
    """One host buffer holding every array back to back, copied to ``device`` at once.

    The buffer comes from the caching host allocator when ``pin``: a non-blocking copy from
    it records an event there, so the buffer is not handed out again before the copy ran.
    """
    sizes = [len(a) for a in arrays]
    host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=pin)
    if sizes:
        np.concatenate(arrays, out=host.numpy(), casting="same_kind")
    moved = host.to(device, non_blocking=True)
    return list(moved.split(sizes))


# ----------------------------------------------------------------------------- stream order
def _cuda_stream(device: torch.device) -> Any:  # never run: needs CUDA
    return torch.cuda.current_stream(device)


def _cuda_event() -> Any:  # never run: needs CUDA
    return torch.cuda.Event()


class StreamFences:
    """Orders the reads and writes of one slab across CUDA streams (module docstring).

    ``before_read``/``after_read`` go around every gather from the slab, ``before_write``/
    ``after_write`` around every fill of its slots, all on the current stream. A fill is
    the only thing that changes bytes, so:

    - before a fill, its stream waits for the last read and the last fill of every other
      stream: a slot is overwritten only after every gather queued before its eviction ran
      (reads are recorded before the lease is released, evictions decided after), and two
      fills of one slot land in the order the index saw them;
    - before a read, its stream waits for the last fill of every other stream, if any fill
      happened since it last waited: a slot made visible by a fill is read after the fill.

    ``host_slab=True`` is the zero-copy host tier: its slab is written by the CPU, so a
    write first *blocks* until the other streams' GPU reads of it ran (``before_cpu_write``).

    ``stream`` and ``event`` are injectable so the CPU tests can check the ordering with
    stand-ins. Thread-safe (a small lock around the bookkeeping; waits are queued outside it).
    """

    def __init__(self, device: torch.device, *, stream: Callable[[torch.device], Any] | None = None,
                 event: Callable[[], Any] | None = None):
        self.device = device
        self._stream, self._event = stream or _cuda_stream, event or _cuda_event
        self._lock = threading.Lock()
        self._reads: dict[int, Any] = {}  # stream key -> event after its last read
        self._writes: dict[int, Any] = {}  # stream key -> event after its last fill
        self._write_seq = 0  # fills so far
        self._seen: dict[int, int] = {}  # stream key -> _write_seq when it last waited for fills

    @staticmethod
    def _key(stream: Any) -> int:
        return int(getattr(stream, "cuda_stream", id(stream)))

    def before_read(self) -> None:
        s = self._stream(self.device)
        k = self._key(s)
        with self._lock:
            if self._seen.get(k, 0) == self._write_seq:
                return
            self._seen[k] = self._write_seq
            waits = [e for sk, e in self._writes.items() if sk != k]
        for e in waits:
            s.wait_event(e)

    def after_read(self) -> None:
        s = self._stream(self.device)
        e = self._event()
        e.record(s)
        with self._lock:
            self._reads[self._key(s)] = e

    def before_write(self) -> None:
        s = self._stream(self.device)
        k = self._key(s)
        with self._lock:
            waits = [e for sk, e in (*self._reads.items(), *self._writes.items()) if sk != k]
        for e in waits:
            s.wait_event(e)

    def after_write(self) -> None:
        s = self._stream(self.device)
        e = self._event()
        e.record(s)
        with self._lock:
            k = self._key(s)
            self._writes[k] = e
            self._write_seq += 1
            self._seen[k] = self._write_seq  # its own fills are in its stream order

    def before_cpu_write(self) -> None:
        """Block until every GPU read of a host slab queued so far has run (zero-copy host
        tier: the CPU is about to overwrite evicted slots)."""
        with self._lock:
            waits = list(self._reads.values())
        for e in waits:
            e.synchronize()


# ----------------------------------------------------------------------------- pinned host memory
def _cudart() -> Any:  # never run: needs CUDA
    return torch.cuda.cudart()


class PinnedRegion:
    """Pins the bytes of an existing host tensor with ``cudaHostRegister``: exactly
    ``nbytes`` of them, where ``pin_memory=True`` would round up to a power of two.

    ``read_only``: the memory is mapped read-only (the shared host tier's map), which CUDA
    accepts only with ``cudaHostRegisterReadOnly``. The region is also *mapped* (the GPU can
    address it: zero-copy reads through :func:`device_view`) and *portable* (every device).
    Unregistered by ``close`` (idempotent); the tensor must outlive the region.

    Raises ``CapacityError`` when CUDA refuses (e.g. the locked-memory limit, ``ulimit -l``).
    """

    def __init__(self, t: torch.Tensor, *, read_only: bool = False, what: str = "host tier",
                 cudart: Callable[[], Any] | None = None):
        self.ptr = t.data_ptr()
        self.nbytes = t.numel() * t.element_size()
        self.read_only = read_only
        self._cudart = cudart = cudart or _cudart  # looked up now: tests replace the module's _cudart
        self._registered = False
        if self.nbytes == 0:
            return
        flags = _REGISTER_PORTABLE | _REGISTER_MAPPED | (_REGISTER_READ_ONLY if read_only else 0)
        rc = int(cudart().cudaHostRegister(self.ptr, self.nbytes, flags))
        if rc != 0:
            raise CapacityError(
                f"cannot pin the {what}'s {format_size(self.nbytes)} of host memory (cudaHostRegister error {rc}); "
                "lower host_budget, or raise the locked-memory limit (ulimit -l / LimitMEMLOCK)")
        self._registered = True

    def close(self) -> None:
        if self._registered:
            self._registered = False
            rc = int(self._cudart().cudaHostUnregister(self.ptr))
            if rc != 0:  # the memory stays pinned until the process ends: wasteful, not wrong
                raise CapacityError(f"cudaHostUnregister of {format_size(self.nbytes)} at {self.ptr:#x} failed "
                                    f"(error {rc})")


class _CudaArray:
    """A bare ``__cuda_array_interface__`` (v3) over a device-addressable pointer."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str, owner: object):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3,
                                         "strides": None}
        self._owner = owner  # keeps the host memory alive while a device view of it exists


_TYPESTR = {torch.uint8: "|u1", torch.int16: "<i2", torch.int32: "<i4", torch.int64: "<i8"}


def _device_pointer(ptr: int) -> int:  # never run: needs CUDA
    """The device address of registered host memory: ``cudaHostGetDevicePointer`` through
    the CUDA runtime torch loaded, else the host address itself (equal under unified
    addressing wherever cudaDevAttrCanUseHostPointerForRegisteredMem holds: every x86-64
    Linux GPU since Pascal)."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        out = ctypes.c_void_p()
        if lib.cudaHostGetDevicePointer(ctypes.byref(out), ctypes.c_void_p(ptr), ctypes.c_uint(0)) == 0 and out.value:
            return int(out.value)
        break
    return ptr


def device_view(t: torch.Tensor, device: torch.device) -> torch.Tensor:  # never run: needs CUDA
    """A CUDA tensor over the pinned (registered, mapped) host tensor ``t``: kernels on the
    GPU read its rows across PCIe directly (zero-copy: no staging copy, no CPU gather).
    ``t`` must be contiguous and registered (:class:`PinnedRegion`) for as long as the view
    is used."""
    if not t.is_contiguous() or t.dtype not in _TYPESTR:
        raise CapacityError(f"zero-copy needs a contiguous integer host slab, got {t.dtype} {tuple(t.shape)}")
    arr = _CudaArray(_device_pointer(t.data_ptr()), tuple(t.shape), _TYPESTR[t.dtype], t)
    with torch.cuda.device(device):
        return torch.as_tensor(arr, device=device)


# ----------------------------------------------------------------------------- GPU memory budget
def _free_bytes(device: torch.device) -> int:  # never run: needs CUDA
    return int(torch.cuda.mem_get_info(device)[0])


def check_device_room(need: int, device: torch.device, *, what: str,
                      free: Callable[[torch.device], int] = _free_bytes) -> None:
    """Raise ``CapacityError`` unless ``need`` bytes plus :data:`HEADROOM` fit in the free
    memory of CUDA ``device`` now: refused at open, before anything is allocated."""
    avail = free(device)
    if need + HEADROOM > avail:
        raise CapacityError(
            f"{what} needs {format_size(need)} of GPU memory on {device} (+ {format_size(HEADROOM)} headroom) but "
            f"only {format_size(avail)} is free; lower device_budget")


def capacity_error(e: BaseException, device: torch.device, what: str) -> CapacityError:
    """The ``CapacityError`` a CUDA out-of-memory error ``e`` becomes (raise ... from e)."""
    return CapacityError(f"out of GPU memory on {device} while {what} ({str(e).splitlines()[0][:200]}); "
                         "lower device_budget or look rows up in smaller batches")
