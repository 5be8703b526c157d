"""One way to compile kernels: every numba function of the package is made by
``tierstore.jit.kernel`` (GIL-free, cached in the kernel cache with checksums, filled by
``tierstore warmup``), none by a bare ``numba.njit`` (numba's own cache sits next to the
source, which a read-only install cannot write, and ``warmup`` never fills it)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import numba
import pytest

import tierstore
from tierstore import jit


def _package_modules() -> list:
    mods = []
    for info in pkgutil.walk_packages(tierstore.__path__, "tierstore."):
        if info.name == "tierstore.moved":  # the old paths: aliases that warn
            continue
        mods.append(importlib.import_module(info.name))
    return mods


def test_every_kernel_is_compiled_through_tierstore_jit():
    if jit.KERNEL_CACHE_DIR is None:
        pytest.skip("no writable kernel cache on this machine: kernels compile in memory, nothing to check")
    found = {}
    for mod in _package_modules():
        for name, v in vars(mod).items():
            if isinstance(v, numba.core.registry.CPUDispatcher) and v.py_func.__module__ == mod.__name__:
                found[f"{mod.__name__}.{name}"] = v
    assert "tierstore.analysis.belady._replay" in found and "tierstore.analysis.stack_distance._distances" in found
    bare = [k for k, v in found.items() if not isinstance(v._cache, jit._KernelCache)]
    assert not bare, f"compiled with a bare numba.njit, not tierstore.jit.kernel: {bare}"
    assert all(v.targetoptions.get("nogil") for v in found.values())


def test_no_module_imports_numba_njit():
    root = Path(tierstore.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "jit.py" and "njit" in p.read_text()]
    assert not offenders, f"use tierstore.jit.kernel instead of numba.njit in {offenders}"
