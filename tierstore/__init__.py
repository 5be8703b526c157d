"""tierstore: a tiered (GPU HBM / host DRAM / NVMe) store for fixed-width embedding rows.

    import tierstore
    tierstore.build_store("model.safetensors", "store/")
    with tierstore.open("store/", device_budget="64MiB", host_budget="256MiB") as store:
        rows = store.lookup("blocks.1.engram.memory.weight", ids)
"""

from .errors import (
    BudgetError,
    CapacityError,
    CheckpointError,
    LookupTimeoutError,
    StoreClosedError,
    StoreChangedError,
    CorruptDataError,
    FormatVersionError,
    IdTypeError,
    InvalidIdError,
    MissingExtraError,
    OutputPathError,
    PolicyParamError,
    ReaderParamError,
    ShardDesyncError,
    ShardedLookupError,
    ReplaceRefusedError,
    StoreExistsError,
    StoreIOError,
    TierStoreError,
    UnknownTableError,
)
from .sizes import format_size, parse_size
from . import moved as _moved

_moved.install()  # old module paths (tierstore.distributed, ...) warn and resolve to the new ones

# The store, the builder and the formats import torch (~1 s); they load on first use, so
# tools that need only the cache layer and the simulator (``tierstore profile``) start fast.
_LAZY = {
    "open": ("serve.store", "open_store"),  # `tierstore.open(path)` is the public entry point
    "open_store": ("serve.store", "open_store"),
    "Store": ("serve.store", "Store"),
    "LookupFuture": ("serve.prefetcher", "LookupFuture"),
    "INLINE_BELOW": ("serve.store", "INLINE_BELOW"),
    "TableInfo": ("format.spec", "TableInfo"),
    "FORMAT_VERSION": ("format.spec", "FORMAT_VERSION"),
    "build_store": ("format.build", "build_store"),
    "DEFAULT_TABLE_PATTERN": ("format.build", "DEFAULT_TABLE_PATTERN"),
    "verify_store": ("format.verify", "verify_store"),
    "save_snapshot": ("serve.snapshot", "save_snapshot"),
    "open_sharded": ("serve.distributed", "open_sharded"),
    "distinct": ("ids", "distinct"),
    "ShardedStore": ("serve.distributed", "ShardedStore"),
    "build_shard": ("serve.distributed", "build_shard"),
    "RowStore": ("serve.rowstore", "RowStore"),
    "StoreOptions": ("serve.options", "StoreOptions"),
    "has_profile": ("format.profile", "has_profile"),
    "evict_page_cache": ("tiers.page_reader", "evict_page_cache"),
    "Trace": ("analysis.simulate", "Trace"),
    "TableTrace": ("analysis.simulate", "TableTrace"),
    "save_trace": ("analysis.simulate", "save_trace"),
    "load_trace": ("analysis.simulate", "load_trace"),
    "plot_curves": ("analysis.plots", "plot_curves"),
    "read_json": ("files", "read_json"),
    "check_versioned": ("files", "check_versioned"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tierstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "open", "open_store", "open_sharded", "StoreOptions", "RowStore", "Store", "ShardedStore", "build_shard",
    "LookupFuture", "INLINE_BELOW", "TableInfo", "build_store", "verify_store",
    "save_snapshot", "distinct",
    "DEFAULT_TABLE_PATTERN", "FORMAT_VERSION", "parse_size", "format_size",
    "TierStoreError", "InvalidIdError", "IdTypeError", "UnknownTableError", "CorruptDataError",
    "FormatVersionError", "BudgetError", "PolicyParamError", "StoreIOError", "CapacityError", "StoreExistsError", "CheckpointError",
    "LookupTimeoutError", "StoreClosedError", "MissingExtraError", "ShardedLookupError", "ShardDesyncError",
    "StoreChangedError", "OutputPathError", "ReplaceRefusedError", "ReaderParamError",
    "has_profile", "evict_page_cache", "Trace", "TableTrace", "save_trace", "load_trace", "plot_curves",
    "read_json", "check_versioned",
]
__version__ = "0.1.0"
