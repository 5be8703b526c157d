"""How a store is opened: every option of ``tierstore.open`` in one frozen dataclass.

``tierstore.open(path, options=StoreOptions(device="cpu", host_budget="2GiB"))`` and the
keyword form ``tierstore.open(path, device="cpu", host_budget="2GiB")`` are the same call
(keywords given with ``options=`` replace those fields). ``tierstore.open_sharded`` takes the
same options, checked by the same code; its budgets are per rank. Every value is checked
in ``__post_init__``, before any file is opened, with the typed errors of the rest of the
API (``BudgetError``, ``PolicyParamError``, ``TierStoreError`` naming the option), and sizes
given as strings ("64MiB") are bytes inside.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..cache.registry import PolicySpec
from ..errors import TierStoreError
from ..sizes import parse_size
from ..tiers.disk import READERS

__all__ = ["StoreOptions", "resolve_options", "resolve_device", "WARM_MODES"]

WARM_MODES = ("open", "background")


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The store's device, checked: CPU, or CUDA when it is present; None: CUDA if present."""
    if device is None:
        return _default_device()
    if not isinstance(device, (str, torch.device)):
        raise TierStoreError(f"device={device!r} must be a string like 'cpu' or 'cuda:0', or a torch.device")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise TierStoreError(f"device={device!r} is not a device ({e}); use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TierStoreError(f"device={device!r} requested but CUDA is not available; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TierStoreError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise TierStoreError(f"device={device!r} is not supported: rows are served on 'cpu' or 'cuda' "
                             "('meta' tensors would hold no rows)")
    return dev


def _count(value: object, what: str, *, allow_none: bool = False) -> int | None:
    """A positive integer option (threads), refusing strings, bools and floats."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise TierStoreError(f"{what}={value!r} must be an integer >= 1")
    return int(value)


@dataclass(frozen=True)
class StoreOptions:
    """The options of ``tierstore.open`` / ``tierstore.open_sharded``, checked at construction.

    For ``open_sharded`` every budget is **per rank**: each rank's shard gets its own tiers
    of these sizes (a group of W ranks holds up to W times the budget in all).
    """

    # where lookups return rows and the device tier lives; None: CUDA if present, else CPU (a
    # sharded store: its process group's device). Kept as given (None stays None), else a torch.device
    device: str | torch.device | None = None
    # bytes of rows each tier may hold ("64MiB", "2GB", int; 0 disables the tier), split over
    # the tables by size; a table whose share covers it is loaded whole at open (resident)
    device_budget: int | str | None = 0
    host_budget: int | str | None = 0
    # cache policy for rows that do not fit ("default", "lru", "lfu", "s3fifo", "wtinylfu", "arc", "static")
    policy: str = "default"
    # the policy's parameters, e.g. {"pin_fraction": 0.2} (tierstore.cache.POLICIES[name].defaults)
    policy_params: Mapping[str, Any] | None = None
    threads: int = 4  # background lookup workers
    io_threads: int | None = None  # disk reader threads (None: the reader's default)
    direct: bool | None = None  # O_DIRECT on/off (None: on where the filesystem allows it)
    # the host tier in POSIX shared memory: one copy for every process of the machine
    host_shared: bool = False
    # bytes of finished output buffers kept for reuse by lookups without out= (0 disables);
    # part of the store's fixed 128 MiB beside its budgets (tests/tierstore/serve/test_memory_bound.py)
    pool_bytes: int | str = "64MiB"
    use_profile: bool = True  # place the hottest rows of the saved profile in the tiers at open
    zero_copy: bool = False  # CUDA only: the GPU reads host-tier hits from pinned memory directly
    disk_reader: str = "auto"  # cold pages on CUDA: "auto", "posix" or "kvikio"
    # seconds to wait for another process's stalled fill of a shared host tier; for a sharded
    # store also the collectives' timeout (a dead peer fails the call after it)
    timeout: float = 60.0
    # when the cache tiers' placed rows (the saved profile's hot set) are loaded: "open" before
    # open returns; "background": open returns once the indexes are built and one loader
    # thread fills the tiers while lookups are served (rows not loaded yet come from below,
    # exact; stats()["open"] says how warm each tier is). Resident tiers load at open either way
    warm: str = "open"
    # True: the host tier places the profile's ranks after the device tier's (each hot row in
    # memory once) instead of from rank 0 (the device tier's rows again); only where the device
    # tier is plain memory too (device="cpu", host_shared=False, warm="open"). A CUDA device tier
    # (and warm="background"'s loader) fills the device tier from the host slab. Off by default
    # (docs/benchmarks.md: 22% fewer rows from disk, the decode step not measurably faster, a
    # third more snapshot read at open)
    exclusive: bool = False
    _policy_spec: PolicySpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.device is not None:
            set_("device", resolve_device(self.device))
        set_("threads", _count(self.threads, "threads"))
        set_("io_threads", _count(self.io_threads, "io_threads", allow_none=True))
        if self.direct not in (None, True, False) or self.host_shared not in (True, False) \
                or self.use_profile not in (True, False) or self.exclusive not in (True, False):
            raise TierStoreError(f"direct={self.direct!r} must be None/True/False, host_shared={self.host_shared!r} "
                                 f"use_profile={self.use_profile!r} and exclusive={self.exclusive!r} bools")
        if self.zero_copy not in (True, False) or (self.zero_copy and resolve_device(self.device).type != "cuda"):
            raise TierStoreError(f"zero_copy={self.zero_copy!r}: the GPU reading host rows directly needs "
                                 f"device='cuda' (this store's device is {resolve_device(self.device)}); "
                                 "leave zero_copy=False")
        t = self.timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise TierStoreError(f"timeout={t!r} must be a positive number of seconds")
        set_("timeout", float(t))
        if self.exclusive and (self.warm == "background" or self.host_shared
                               or resolve_device(self.device).type != "cpu"):
            raise TierStoreError(f"exclusive=True places both tiers from one ranking at open in this process's "
                                 f"memory: it needs device='cpu', host_shared=False and warm='open' (got "
                                 f"device={self.device!r}, host_shared={self.host_shared!r}, warm={self.warm!r}: a "
                                 f"CUDA device tier and the background loader fill the device tier from the host slab)")
        if self.warm not in WARM_MODES:
            raise TierStoreError(f"warm={self.warm!r} must be one of {WARM_MODES}: 'open' loads the hot set before "
                                 "open returns, 'background' while lookups are served")
        if self.disk_reader not in READERS:
            raise TierStoreError(f"disk_reader={self.disk_reader!r} must be one of {READERS}")
        set_("device_budget", parse_size(self.device_budget, what="device_budget"))
        set_("host_budget", parse_size(self.host_budget, what="host_budget"))
        set_("pool_bytes", parse_size(self.pool_bytes, what="pool_bytes"))
        # the name and parameters are checked here, before any tier is built (and even when
        # every table is resident and no tier builds a policy)
        spec = PolicySpec(self.policy, {} if self.policy_params is None else self.policy_params)
        set_("_policy_spec", spec)
        set_("policy_params", types.MappingProxyType(dict(spec.params)))  # read-only, like the rest

    @property
    def policy_spec(self) -> PolicySpec:
        """The policy's name and checked parameters (what the tiers build their policies from)."""
        return self._policy_spec


FIELDS = tuple(f.name for f in dataclasses.fields(StoreOptions) if f.init)


def resolve_options(options: StoreOptions | None, overrides: Mapping[str, Any]) -> StoreOptions:
    """``options`` (default: ``StoreOptions()``) with the keyword arguments ``overrides``
    in place of those fields: the one path by which ``open`` and ``open_sharded`` take options."""
    if options is not None and not isinstance(options, StoreOptions):
        raise TierStoreError(f"options={options!r} must be a tierstore.StoreOptions (or pass the options as keywords)")
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise TierStoreError(f"unknown option(s) {', '.join(map(repr, unknown))}; the options are: {', '.join(FIELDS)}")
    if options is None:
        return StoreOptions(**overrides)
    return dataclasses.replace(options, **overrides) if overrides else options
