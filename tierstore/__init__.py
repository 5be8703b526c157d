"""tierstore: a tiered (GPU HBM / host DRAM / NVMe) store for fixed-width embedding rows.

    import tierstore
    tierstore.build_store("model.safetensors", "store/")
    with tierstore.open("store/", device_budget="64MiB", host_budget="256MiB") as store:
        rows = store.lookup("blocks.1.engram.memory.weight", ids)
"""

from .build import DEFAULT_TABLE_PATTERN, build_store
from .errors import (
    BudgetError,
    CapacityError,
    CheckpointError,
    LookupTimeoutError,
    StoreClosedError,
    CorruptDataError,
    FormatVersionError,
    IdTypeError,
    InvalidIdError,
    StoreExistsError,
    StoreIOError,
    TierStoreError,
    UnknownTableError,
)
from .format import FORMAT_VERSION, TableInfo
from .prefetcher import LookupFuture
from .sizes import format_size, parse_size
from .store import Store, open_store
from .verify import verify_store

open = open_store  # noqa: A001 - `tierstore.open(path)` is the public entry point

__all__ = [
    "open", "open_store", "Store", "LookupFuture", "TableInfo", "build_store", "verify_store",
    "DEFAULT_TABLE_PATTERN", "FORMAT_VERSION", "parse_size", "format_size",
    "TierStoreError", "InvalidIdError", "IdTypeError", "UnknownTableError", "CorruptDataError",
    "FormatVersionError", "BudgetError", "StoreIOError", "CapacityError", "StoreExistsError", "CheckpointError",
    "LookupTimeoutError", "StoreClosedError",
]
__version__ = "0.1.0"
