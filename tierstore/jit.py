"""How cache kernels are compiled: numba ``njit(nogil=True, cache=True)``, one cache per source version.

Why numba (measured, docs/architecture.md): a call with a dozen array arguments costs
~0.8 us here, the kernels are plain Python syntax that tests can read, numba is already a
core dependency (no compiler step in the README's set-up), and ``nogil`` lets a prefetch
worker run its bookkeeping while the model thread holds the GIL.

Why not plain ``cache=True``: numba keys a cached function on *its own* file's timestamp,
so a kernel calling a kernel of another file keeps stale machine code after that other
file changes. Every kernel (the cache layer's, ``tierstore.ids``') is therefore cached in a
directory named after a hash of all of their sources and the numba version: any edit, any upgrade, a
fresh compile; an unchanged install (a warm ``tierstore.open``) loads the machine code.
The directory is ``$TIERSTORE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/tierstore/kernels``
(``~/.cache/...``); if it is not writable numba warns and compiles in memory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from numba import njit

__all__ = ["kernel", "specialized", "KERNEL_CACHE_DIR"]


def _cache_dir() -> str:
    h = hashlib.sha256(numba.__version__.encode())
    here = Path(__file__).parent
    for p in [here / "jit.py", here / "ids.py", *sorted((here / "cache").glob("*.py"))]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    base = os.environ.get("TIERSTORE_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tierstore", "kernels")
    return os.path.join(base, h.hexdigest()[:16])


KERNEL_CACHE_DIR = _cache_dir()


def kernel(fn=None, *, inline: bool = False):
    """Compile ``fn`` as a GIL-free, disk-cached numba function (see the module doc).
    ``inline``: merge it into its compiled callers (no call, no reference counting of the
    state tuple per call): for the walk's per-batch steps, which a replay calls per access."""
    if fn is None:
        return lambda f: kernel(f, inline=inline)
    old = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = KERNEL_CACHE_DIR  # read once, when the dispatcher's cache is made
    try:
        disp = njit(nogil=True, cache=True, inline="always" if inline else "never")(fn)
    finally:
        numba.config.CACHE_DIR = old
    # A stable identity: the walk's cached specializations are keyed by the policy kernels
    # they take as arguments, and numba pickles those as "the dispatcher with this uuid".
    # With its default random uuid, another process unpickling the cache index builds an
    # orphan dispatcher that is garbage collected at once, and the next save of the index
    # fails ("underlying object has vanished"). Named after the function, the uuid resolves
    # to the live module-level kernel in every process.
    disp._set_uuid(f"tierstore-kernel:{fn.__module__}.{fn.__qualname__}")
    return disp


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
