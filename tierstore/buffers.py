"""Pooled output buffers: reuse a returned tensor once nothing outside the pool holds it.

On this machine kind a fresh 64 MB output costs more in page faults than the gather that
fills it (BASELINES.md), so ``Store.lookup`` without ``out=`` takes a buffer from here. A
buffer is handed out again only when its storage has no other user: no tensor, view or
slice the caller kept shares it (checked with the storage's use count), so reuse can
never overwrite rows a caller still reads.
"""

from __future__ import annotations

import sys
import threading

import torch

__all__ = ["BufferPool"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _unused(t: torch.Tensor) -> bool:
    if _use_count is None:
        return False
    # getrefcount: the pool's list entry + the argument; use count: the tensor + our temporary.
    return sys.getrefcount(t) <= 3 and _use_count(t.untyped_storage()._cdata) <= 2


class BufferPool:
    """Keeps up to ``per_key`` tensors for each of the ``max_keys`` most recently used
    (shape, dtype, device) keys, so varying batch shapes cannot grow it without bound.
    Thread-safe."""

    def __init__(self, per_key: int = 4, max_keys: int = 16):
        self.per_key = per_key
        self.max_keys = max_keys
        self._free: dict[tuple, list[torch.Tensor]] = {}  # insertion order = recency
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(shape), dtype, str(device))
        with self._lock:
            bucket = self._free.pop(key, [])
            self._free[key] = bucket  # most recent last
            while len(self._free) > self.max_keys:
                del self._free[next(iter(self._free))]
            for i in range(len(bucket)):
                if _unused(bucket[i]):
                    self.reused += 1
                    return bucket[i]
            t = torch.empty(shape, dtype=dtype, device=device)
            self.allocated += 1
            if len(bucket) < self.per_key:
                bucket.append(t)
            return t

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
