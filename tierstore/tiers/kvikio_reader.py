"""Cold pages straight into GPU memory: the disk tier's page reader on CUDA, through kvikio.

kvikio (the ``gpu`` extra: ``pip install -e '.[gpu]'``; found at run time, never required)
reads a file into device memory with NVIDIA cuFile: GPUDirect Storage (the NVMe DMAs into
GPU memory, no bounce through host memory) where the driver (nvidia-fs) and the filesystem
allow it, else a POSIX "compatibility mode" (reads into a pinned bounce buffer, then a copy
to the device). :func:`kvikio_mode` says which one a read takes; the disk tier reports it
in ``stats()`` (``reader_mode``: "gds", "cufile-compat" or "compat").

How a batch of pages is read (:meth:`KvikioPageReader.read_pages`):

- the sorted unique pages are coalesced into runs of adjacent pages (``page_reader._runs``,
  the POSIX reader's own splitting) and every run is one ``CuFile.pread`` future; all are
  submitted before the first is waited on, so kvikio's thread pool keeps up to its
  ``num_threads`` reads in flight (raised to ``depth`` at open: kvikio's default is 1, a
  queue depth of one). One Python call per run (~10 us): above ~100K random runs/s that,
  not the disk, is the limit; the device check (benchmarks/gpu_check.py) measures it
  against raw ``pread`` calls on the same pages.
- pages land in a per-thread staging tensor on the device, reused across calls. kvikio
  writes it outside CUDA stream order, so before a read overwrites it the reader waits
  for the event the disk tier recorded (``release``) after queueing its last gather from it.
- the disk tier then checksums the pages on the device (``format.spec.page_checksums_torch``)
  and gathers the rows on the device: nothing crosses PCIe but 8 bytes per page of checksums.

Status: the real ``kvikio.CuFile`` on a CUDA device has never run (no GPU where this was
written). Everything else here (coalescing, futures, short-read and error handling, the
staging and its fence, checksums and gathers on torch tensors) runs in the CPU tests with
a stand-in file object on CPU tensors (tests/tierstore/tiers/test_page_source.py).
"""

from __future__ import annotations

import errno as _errno
import importlib
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import torch

from .. import faults
from ..errors import CorruptDataError, ReaderParamError, StoreIOError, TierStoreError
from ..files import os_error
from .page_reader import PAGE_SIZE, _runs

__all__ = ["KvikioPageReader", "load_kvikio", "kvikio_mode", "KVIKIO_MIN"]

KVIKIO_MIN = (25, 4)  # kvikio.defaults.get/set and is_compat_mode_preferred (kvikio PR #644)


class _CuFileLike(Protocol):
    """What the reader uses of ``kvikio.CuFile``."""

    def pread(self, buf: Any, size: int, file_offset: int = 0) -> Any: ...  # a future with get()

    def close(self) -> None: ...


def load_kvikio() -> ModuleType | None:
    """The kvikio module when it is installed and new enough, else None (the POSIX reader
    serves). A too old kvikio is refused with an error naming the fix rather than used with
    the wrong configuration calls."""
    try:
        kvikio = importlib.import_module("kvikio")
        defaults = getattr(kvikio, "defaults", None) or importlib.import_module("kvikio.defaults")
    except ImportError:
        return None
    version = tuple(int(p) for p in str(getattr(kvikio, "__version__", "0.0")).split(".")[:2] if p.isdigit())
    if version < KVIKIO_MIN or not hasattr(defaults, "is_compat_mode_preferred"):
        raise TierStoreError(
            f"kvikio {getattr(kvikio, '__version__', '?')} is too old for the GPU disk reader (needs >= "
            f"{KVIKIO_MIN[0]}.{KVIKIO_MIN[1]:02d}); upgrade it: pip install -e '.[gpu]'")
    return kvikio


def kvikio_mode(kvikio: ModuleType) -> str:
    """How kvikio reads now: "compat" (its POSIX path: pread + copy to the device),
    "gds" (cuFile with the nvidia-fs driver: GPUDirect Storage), or "cufile-compat" (cuFile
    without nvidia-fs, which falls back to its own bounce buffers inside the library).

    ``kvikio.defaults.is_compat_mode_preferred()`` resolves the requested mode ("compat_mode":
    ON, OFF or AUTO, from KVIKIO_COMPAT_MODE) against what the machine offers;
    ``cufile_driver.properties.is_gds_available`` says whether nvidia-fs is loaded.
    """
    if kvikio.defaults.is_compat_mode_preferred():
        return "compat"
    try:
        gds = bool(importlib.import_module("kvikio.cufile_driver").properties.is_gds_available)
    except (ImportError, AttributeError, RuntimeError):
        gds = False
    return "gds" if gds else "cufile-compat"


class KvikioPageReader:
    """Reads sets of 4 KiB pages of one row file into device memory (module docstring).

    Args:
        path: the row file.
        device: where pages land (a CUDA device; the tests pass the CPU with a stand-in file).
        depth: reads in flight: kvikio's process-wide thread pool is raised to at least this
            many threads at open (it never shrinks here: other kvikio users keep theirs).
        kvikio: the kvikio module (default: :func:`load_kvikio`).
        open_file: ``path -> CuFile``-like object (default ``kvikio.CuFile(path, "r")``); the
            tests pass a stand-in that reads with ``os.pread`` into CPU tensors.

    Thread-safe: any number of threads may read at once (each has its own staging tensor).
    """

    kind = "kvikio"

    def __init__(self, path: str | os.PathLike[str], device: torch.device, *, depth: int = 64,
                 kvikio: ModuleType | None = None, open_file: Callable[[str], _CuFileLike] | None = None):
        if depth < 1:
            raise ReaderParamError(f"depth must be >= 1, got {depth}")
        self.path = os.fspath(path)
        self.device = torch.device(device)
        self.depth = depth
        if open_file is None:  # never run: needs CUDA (a real CuFile reads only with libcuda present)
            kvikio = kvikio or load_kvikio()
            if kvikio is None:
                raise TierStoreError("kvikio is not installed: pip install -e '.[gpu]' (or use the POSIX reader)")
            if kvikio.defaults.get("num_threads") < depth:  # one thread per read in flight
                kvikio.defaults.set("num_threads", depth)
            self.mode = kvikio_mode(kvikio)
            open_file = lambda p: kvikio.CuFile(p, "r")  # noqa: E731
        else:
            self.mode = "compat" if kvikio is None else kvikio_mode(kvikio)
        try:
            self.n_pages = os.stat(self.path).st_size // PAGE_SIZE
        except OSError as e:
            raise os_error(e, "cannot open row file", self.path) from e
        self._file = open_file(self.path)
        self._local = threading.local()  # per thread: staging tensor and the fence on it
        self._lock = threading.Lock()
        self._staging: list[torch.Tensor] = []  # every thread's, for staging_bytes()
        self._closed = False

    # -- staging ------------------------------------------------------------------------
    def _staging_for(self, n_pages: int) -> torch.Tensor:
        """This thread's staging tensor, at least ``n_pages`` long. Waits first for the
        event ``release`` recorded: the gathers queued from the previous read must have
        run before kvikio (which ignores stream order) writes over their source."""
        fence = getattr(self._local, "fence", None)
        if fence is not None:
            fence.synchronize()  # never run: needs CUDA (a fence exists only on a CUDA device)
            self._local.fence = None
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape[0] < n_pages:
            buf = torch.empty((max(n_pages, 256), PAGE_SIZE), dtype=torch.uint8, device=self.device)
            with self._lock:
                old = getattr(self._local, "buf", None)
                self._staging = [b for b in self._staging if b is not old] + [buf]
            self._local.buf = buf
        return buf[:n_pages]

    def release(self) -> None:
        """The caller has queued every read of the pages the last ``read_pages`` returned
        (in this thread): record an event after them, so the next read waits for it."""
        if self.device.type == "cuda":  # never run: needs CUDA
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._local.fence = ev

    def staging_bytes(self) -> int:
        """Device memory held by the staging tensors (one per thread that has read)."""
        with self._lock:
            return sum(b.numel() for b in self._staging)

    # -- reads --------------------------------------------------------------------------
    def read_pages(self, pages: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``pages`` (sorted unique int64 page numbers) into a (len(pages), 4096) uint8
        tensor on ``device``: ``out`` when given, else this thread's staging tensor (valid
        until this thread's next read; call ``release`` once its reads are queued).

        Raises ``StoreIOError`` when kvikio fails a read and ``CorruptDataError`` when the
        file ends before a page does (the POSIX reader's contract).
        """
        if self._closed:
            raise StoreIOError(_errno.EBADF, "read from a closed KvikioPageReader", self.path)
        pages = np.asarray(pages, dtype=np.int64)
        n = len(pages)
        if out is None:
            out = self._staging_for(n)
        elif out.dtype != torch.uint8 or tuple(out.shape) != (n, PAGE_SIZE) or not out.is_contiguous():
            raise ReaderParamError(f"out must be a contiguous uint8 tensor of shape ({n}, {PAGE_SIZE}), "
                             f"got {out.dtype} {tuple(out.shape)}")
        if n == 0:
            return out
        starts, lengths = _runs(pages)
        offsets = (pages[starts] * PAGE_SIZE).tolist()
        st, ln = starts.tolist(), lengths.tolist()
        try:  # one fault-injection point per call, as the POSIX reader's AIO path has
            short = faults.point("read", self.path, ln[0] * PAGE_SIZE)
        except OSError as e:
            raise os_error(e, f"read at offset {offsets[0]} failed", self.path) from e
        futures = []
        err: BaseException | None = None
        try:
            for s, k, off in zip(st, ln, offsets):  # one future per run (not per page): all in flight at once
                futures.append(self._file.pread(out[s : s + k], k * PAGE_SIZE, off))
        except (RuntimeError, OSError) as e:  # kvikio raises RuntimeError carrying the OS error's text
            err = e
        got = []
        for f in futures:  # wait for every read, even after an error: none may still write into ``out``
            try:
                got.append(int(f.get()))
            except (RuntimeError, OSError) as e:
                err = err or e
                got.append(-1)
        if err is not None:
            raise StoreIOError(getattr(err, "errno", None) or _errno.EIO,
                               f"kvikio read of {n} pages failed: {err}", self.path) from err
        got[0] = min(got[0], short)
        want = np.asarray(ln, dtype=np.int64) * PAGE_SIZE
        short = np.flatnonzero(np.asarray(got, dtype=np.int64) != want)
        if len(short):
            k = int(short[0])
            raise CorruptDataError(
                f"{self.path}: file ends inside page {(offsets[k] + got[k]) // PAGE_SIZE} (read {got[k]} of "
                f"{int(want[k])} bytes at offset {offsets[k]}; the file has {self.n_pages} whole pages): "
                "truncated row file; rebuild the store")
        return out

    def close(self) -> None:
        """Close the file and drop the staging tensors. Idempotent; reads in progress in
        other threads finish first only if their callers wait (the disk tier does)."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        with self._lock:
            self._staging = []
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"KvikioPageReader({self.path!r}, device={self.device}, mode={self.mode!r}, depth={self.depth})"
