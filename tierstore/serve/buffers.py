"""Pooled output buffers: reuse a returned tensor once nothing outside the pool holds it.

On the development VM (docs/baselines.md) a fresh 64 MB output costs more in page faults than the gather that
fills it, so ``Store.lookup`` without ``out=`` takes a buffer from here. A
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
    (shape, dtype, device) keys, and at most ``max_bytes`` in all (a buffer larger than
    half of that is never kept), so neither varying shapes nor a few huge lookups grow it
    without bound. The store's default, 64 MiB, is part of its fixed memory beside the
    budgets (``<= 1.1 x budgets + 128 MiB``); a half keeps a 65,536-id lookup of 264-byte
    rows (17 MB, one V4.1 prefill's table). Thread-safe."""

    def __init__(self, per_key: int = 4, max_keys: int = 16, max_bytes: int = 64 << 20):
        self.per_key = per_key
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self._free: dict[tuple, list[torch.Tensor]] = {}  # insertion order = recency
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0
        self.bytes = 0  # bytes of the tensors held

    def _drop_key(self, key: tuple) -> None:
        for t in self._free.pop(key):
            self.bytes -= _nbytes(t)

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(shape), dtype, str(device))
        with self._lock:
            bucket = self._free.pop(key, [])
            self._free[key] = bucket  # most recent last
            while len(self._free) > self.max_keys:
                self._drop_key(next(iter(self._free)))
            for i in range(len(bucket)):
                if _unused(bucket[i]):
                    self.reused += 1
                    return bucket[i]
            t = torch.empty(shape, dtype=dtype, device=device)
            self.allocated += 1
            size = _nbytes(t)
            if len(bucket) < self.per_key and 2 * size <= self.max_bytes:
                while self.bytes + size > self.max_bytes:  # evict least recently used keys
                    oldest = next(k for k in self._free if self._free[k] or k == key)
                    if oldest == key:
                        break
                    self._drop_key(oldest)
                if self.bytes + size <= self.max_bytes:
                    bucket.append(t)
                    self.bytes += size
            return t

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"bytes": self.bytes, "buffers": sum(len(b) for b in self._free.values()),
                    "max_bytes": self.max_bytes, "reused": self.reused, "allocated": self.allocated}

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.bytes = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
