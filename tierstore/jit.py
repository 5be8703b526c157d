"""How kernels are compiled: numba ``njit(nogil=True)``, cached on disk per source version.

The one way the package compiles anything (tests/tierstore/test_kernels.py checks it): the
cache layer's kernels, the id checks, the quantizer's, the profiler's (LRU stack distances,
Belady's optimum), the cold path's completion booking (``tiers.page_reader._record``) and the
CPU lookup's placement (``tiers.placement``), so ``tierstore warmup`` fills one cache for all
of them.

Why numba (measured, docs/architecture.md): a call with a dozen array arguments costs
~0.8 us here, the kernels are plain Python syntax that tests can read, numba is already a
core dependency (no compiler step in the README's set-up), and ``nogil`` lets a prefetch
worker run its bookkeeping while the model thread holds the GIL.

Why not plain ``cache=True``:

- numba keys a cached function on *its own* file's timestamp, so a kernel calling a kernel
  of another file keeps stale machine code after that other file changes. Every kernel
  (the cache layer's, ``tierstore.ids``') is therefore cached in a directory named after a
  hash of all of their sources and the numba version: any edit, any upgrade, a fresh
  compile; an unchanged install (a warm ``tierstore.open``) loads the machine code. The
  directory is ``$TIERSTORE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/tierstore/kernels``
  (``~/.cache/...``), then that hash.
- Where its directory cannot be written, numba falls back to the package's own
  ``__pycache__`` (then ``~/.cache/numba``). Ours never does: if the directory cannot be
  created or written, kernels are cached in a private directory (mode 0700, ours alone: a
  shared temp dir must not hand us another user's machine code) under
  ``tempfile.gettempdir()``, ``tierstore-kernels-<uid>/<hash>``; if that fails too, they
  compile in memory in every process. Either is logged once.
- numba raises whatever unpickling a damaged file raises (``UnpicklingError``,
  ``EOFError``, ``MemoryError``) in every later process until someone deletes the cache by
  hand, and a flipped bit in the machine code may even load. Here every index and data
  file ends with a SHA-256 of its bytes, and an entry that fails to load or to verify is a
  miss: the function's index is deleted, the kernel compiled again and its entry
  rewritten, and one warning per process names the directory.

Warnings go to the ``tierstore`` logger (``logging``), not ``warnings.warn``: a damaged or
unwritable cache is recovered from and is not the caller's mistake, and under ``-W error``
(our tests, some services) a warning would turn the recovery back into a crash.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import stat
import tempfile
from pathlib import Path

import numba
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.core.caching import (CompileResultCacheImpl, FunctionCache, IndexDataCacheFile, _CacheLocator,
                                _SourceFileBackedLocatorMixin)

from .errors import CorruptDataError

__all__ = ["kernel", "prefetch", "specialized", "KERNEL_CACHE_DIR"]

log = logging.getLogger("tierstore")
_DIGEST = hashlib.sha256().digest_size
_warned: set[str] = set()  # what this process has already logged (once each)


def _warn_once(kind: str, msg: str, *args: object) -> None:
    if kind not in _warned:  # numba compiles under one global lock: no race here
        _warned.add(kind)
        log.warning(msg, *args)


def _source_hash() -> str:
    h = hashlib.sha256(numba.__version__.encode())
    here = Path(__file__).parent
    for p in [here / "jit.py", here / "ids.py", *sorted((here / "cache").glob("*.py"))]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _private_temp_dir(name: str) -> str | None:
    """``<temp dir>/tierstore-kernels-<uid>/<name>`` if it is ours alone and writable, else None."""
    root = os.path.join(tempfile.gettempdir(), f"tierstore-kernels-{os.getuid()}")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        st = os.lstat(root)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    path = os.path.join(root, name)
    return path if _writable(path) else None


def _cache_dir() -> str | None:
    """Where compiled kernels are cached (the module doc), or None: compile in memory."""
    name = _source_hash()
    base = os.environ.get("TIERSTORE_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tierstore", "kernels")
    configured = os.path.join(base, name)
    if _writable(configured):
        return configured
    fallback = _private_temp_dir(name)
    _warn_once("unwritable", "tierstore: the compiled-kernel cache %s cannot be written; %s", configured,
               f"caching kernels in {fallback} instead" if fallback else
               "compiling kernels in memory in every process (set TIERSTORE_KERNEL_CACHE to a writable directory)")
    return fallback


KERNEL_CACHE_DIR: str | None = _cache_dir()


# -- the cache: numba's, in our directory only, with checksummed files ---------------------------
# (numba.core.caching's classes; their private methods have kept these names since 0.3x, and the
# directory's hash covers the numba version, so another numba never reads these files.)
class _Locator(_SourceFileBackedLocatorMixin, _CacheLocator):
    """Every kernel's entries under KERNEL_CACHE_DIR (a subdirectory per source file, as numba's
    own user-provided locator) and nowhere else: no fallback to the package's ``__pycache__``."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(KERNEL_CACHE_DIR, self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self) -> str:
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        return cls(py_func, py_file)


class _Impl(CompileResultCacheImpl):
    _locator_classes = [_Locator]


def _verified(raw: bytes, path: str) -> bytes:
    body, digest = raw[:-_DIGEST], raw[-_DIGEST:]
    if len(raw) < _DIGEST or hashlib.sha256(body).digest() != digest:
        raise CorruptDataError(f"{path}: checksum mismatch ({len(raw)} bytes)")
    return body


class _CheckedFile(IndexDataCacheFile):
    """numba's index and data files, each followed by the SHA-256 of its bytes."""

    def _save_index(self, overloads):
        body = pickle.dumps(self._version, protocol=-1) + self._dump((self._source_stamp, overloads))
        with self._open_for_write(self._index_path) as f:
            f.write(body)
            f.write(hashlib.sha256(body).digest())

    def _load_index(self):
        try:
            with open(self._index_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        f = io.BytesIO(_verified(raw, self._index_path))
        if pickle.load(f) != self._version:
            return {}
        stamp, overloads = pickle.loads(f.read())
        return overloads if stamp == self._source_stamp else {}  # stale: overwritten by the next save

    def _save_data(self, name, data):
        body = self._dump(data)
        with self._open_for_write(self._data_path(name)) as f:
            f.write(body)
            f.write(hashlib.sha256(body).digest())

    def _load_data(self, name):
        path = self._data_path(name)
        with open(path, "rb") as f:
            raw = f.read()
        return pickle.loads(_verified(raw, path))

    def drop(self) -> None:
        """Forget every entry of this function (the next saves overwrite its data files)."""
        try:
            os.unlink(self._index_path)
        except OSError:
            pass


class _KernelCache(FunctionCache):
    """numba's per-function cache, where an entry that cannot be read is a miss (module doc)."""

    _impl_class = _Impl

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _CheckedFile(self._cache_path, self._impl.filename_base,
                                        self._impl.locator.get_source_stamp())

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        # whatever a damaged file raises: UnpicklingError, EOFError, MemoryError, CorruptDataError,
        # a TypeError or ValueError from a wrong-shaped object, ...
        except Exception as e:
            _warn_once("unreadable", "tierstore: unreadable compiled-kernel cache entry in %s (%s: %s); "
                       "compiling it again and rewriting it (further ones in this process are not reported)",
                       KERNEL_CACHE_DIR, type(e).__name__, str(e)[:200])
            self._cache_file.drop()
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception:  # e.g. another process damaged the index since we read it
            self._cache_file.drop()
            try:
                super().save_overload(sig, data)
            except Exception as e:  # e.g. the disk is full: the kernel runs from memory
                _warn_once("unsaved", "tierstore: cannot save a compiled kernel in %s (%s: %s); it runs from "
                           "memory and is compiled again by the next process", KERNEL_CACHE_DIR,
                           type(e).__name__, str(e)[:200])


def kernel(fn=None, *, inline: bool = False):
    """Compile ``fn`` as a GIL-free, disk-cached numba function (see the module doc).
    ``inline``: merge it into its compiled callers (no call, no reference counting of the
    state tuple per call): for the walk's per-batch steps, which a replay calls per access."""
    if fn is None:
        return lambda f: kernel(f, inline=inline)
    disp = njit(nogil=True, inline="always" if inline else "never")(fn)
    if KERNEL_CACHE_DIR is not None:
        disp._cache = _KernelCache(fn)  # what cache=True does (Dispatcher.enable_caching), with our cache
    # A stable identity: the walk's cached specializations are keyed by the policy kernels
    # they take as arguments, and numba pickles those as "the dispatcher with this uuid".
    # With its default random uuid, another process unpickling the cache index builds an
    # orphan dispatcher that is garbage collected at once, and the next save of the index
    # fails ("underlying object has vanished"). Named after the function, the uuid resolves
    # to the live module-level kernel in every process.
    disp._set_uuid(f"tierstore-kernel:{fn.__module__}.{fn.__qualname__}")
    return disp


@intrinsic
def prefetch(typingctx, arr, i):
    """``prefetch(a, i)`` in a kernel: ask the CPU to bring ``a[i]``'s cache line in (LLVM's
    ``llvm.prefetch``: read, high locality) and go on; no bounds check, nothing read, no
    fault on a bad address, so it cannot change a result. For loads whose address is known
    well ahead (the replay's row-map buckets of the next lookups: walk.replay)."""
    if not isinstance(arr, types.Array) or not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        from llvmlite import ir

        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [context.cast(builder, args[1], sig.args[1], types.intp)])
        i8p = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, i), codegen


def specialized(dispatcher, *args):
    """The compiled entry point of ``dispatcher`` for the types of ``args`` (compiled or loaded
    from the cache now). Calling it skips numba's per-call type dispatch, which costs ~11 us
    for a call with function arguments (the policy hooks) against ~0.8 us direct. The caller
    must pass arguments of exactly these types (C-contiguous arrays of the same dtypes)."""
    from numba import typeof

    key = tuple(typeof(a) for a in args)
    if key not in dispatcher.overloads:
        dispatcher.compile(key)
    return dispatcher.overloads[key].entry_point
