"""Old import paths of modules that moved when the package was split into layers.

``import tierstore.distributed`` (and the other names in :data:`MOVED`) still works for one
minor version: it returns the module at its new path and warns with a ``DeprecationWarning``
that names that path. ``tierstore/__init__`` installs the finder; the new modules load only
when an old name is imported.

``tierstore.format`` is not here: that name is now the format package itself (the old
module's contents live in ``tierstore.format.spec``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

# old module -> new module (removed in 0.2)
MOVED = {
    "tierstore.belady": "tierstore.analysis.belady",
    "tierstore.simulate": "tierstore.analysis.simulate",
    "tierstore.stack_distance": "tierstore.analysis.stack_distance",
    "tierstore.build": "tierstore.format.build",
    "tierstore.checkpoint": "tierstore.format.checkpoint",
    "tierstore.profile": "tierstore.format.profile",
    "tierstore.recovery": "tierstore.format.recovery",
    "tierstore.verify": "tierstore.format.verify",
    "tierstore.cache.jit": "tierstore.jit",
    "tierstore.buffers": "tierstore.serve.buffers",
    "tierstore.distributed": "tierstore.serve.distributed",
    "tierstore.prefetcher": "tierstore.serve.prefetcher",
    "tierstore.store": "tierstore.serve.store",
    "tierstore.table": "tierstore.serve.table",
    "tierstore.rowio": "tierstore.tiers.page_reader",
    "tierstore.tier": "tierstore.tiers.disk",
    "tierstore.shared_host": "tierstore.tiers.shared_host",
}


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import {new} instead (the old path goes in tierstore 0.2)",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:  # the new module is already executed
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Loader())


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
