"""What a policy is: compiled hooks plus a small Python description of its state.

Each policy is one module of this package holding

- three kernels over a tier's state tuple ``T`` (tierstore.cache.layout):
  ``hit(T, s)`` (slot s was hit), ``miss(T, r) -> slot`` (row r missed: evict what the
  policy chooses among unleased slots, insert r with ``place`` and return its slot, or
  return -1 to let it bypass the tier) and ``prefill(T, s, r, rank)`` (r was placed in s
  at construction, before any access; ``rank``: r's hotness rank in the policy's ranking
  when the index knows it, else -1);
- a :class:`Policy` subclass saying how big its arrays are and which scalars it keeps.

The walk (tierstore.cache.walk) calls the hooks one access at a time; the policy never
sees the index, only the state arrays (a narrow view, as cachetools' policies are the
cache). Pinned slots [0, LO) never reach a policy. Policies are deterministic: time is the
access counter ``M[M_TICK]`` and hash seeds are fixed or drawn from the given ``rng``.
"""

from __future__ import annotations

import numpy as np

from ..errors import PolicyParamError, TierStoreError
from ..ranking import TopProfile
from .layout import EP_DTYPE, NL, REF_DTYPE

__all__ = ["Policy"]

_EMPTY = np.empty(0, dtype=np.int64)


class Policy:
    """Base description: no per-slot keys, no ghosts, no sketch, no hints, pins nothing."""

    name = "base"
    k_rows = 0  # rows of K (per slot) the policy uses
    k_dtype = np.int64  # K's type: int32 where every key fits (slots, heap positions, ranks)
    uses_hints = False
    ranks = False  # keeps a profile's ranking (RK: a hash table, 10 bytes per ranked row, up to one per slot)
    l_rows = NL - 1  # rows of L the policy uses: NL with a frequency counter (L_FREQ)
    ref_dtype = REF_DTYPE  # leases per slot (layout.py): a narrower type lets fewer lookups hold a slot at once
    ep_dtype = EP_DTYPE  # lease markers per slot: a narrower type restarts them more often (O(cap) each time)
    admits = True  # False: ``miss`` never places a row, so no slot past the pinned ones is
    # ever leased or queued: the index keeps no leases, lease markers or queues (static)

    def __init__(self, capacity: int, *, rng: np.random.Generator | int | None = None, **params):
        if not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise TierStoreError(f"capacity={capacity!r} must be a non-negative integer number of rows")
        self.capacity = int(capacity)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(
            0x7135 if rng is None else rng)
        self.params = self.check_params(params)

    defaults: dict = {}  # the policy's parameters and their default values; others are refused

    def check_params(self, params: dict) -> dict:
        """The parameters with defaults filled in; an unknown name raises
        :class:`~tierstore.errors.PolicyParamError` (subclasses also check values)."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            takes = ", ".join(self.defaults) or "none"
            raise PolicyParamError(f"policy {self.name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                                   f"its parameters: {takes}", param=unknown[0])
        return {**self.defaults, **params}

    # sizes of the state, given the dynamic (unpinned) slots
    def ghost_size(self, n_dyn: int) -> int:
        return 0

    def sketch_bytes(self, n_dyn: int) -> int:
        return 0

    def configure(self, M: np.ndarray, n_dyn: int) -> None:
        """Write the policy's scalars into M[M_PARAM:] (after the common fields are set)."""

    def init(self, T: tuple) -> None:
        """Initialise policy-owned arrays (after queues, ghosts and free slots are set up)."""

    # the profile
    def prepare(self, profile: np.ndarray | TopProfile | None) -> np.ndarray:
        """Read the profile once (keep only O(capacity) of it); return the rows this policy
        would pin forever if the caller gives no explicit pinned set."""
        return _EMPTY

    def prefill(self) -> np.ndarray:
        """Rows to place (evictably) right after the pinned ones, e.g. a profile-ranked core."""
        return _EMPTY

    def prefill_rank(self) -> int:
        """The rank of ``prefill()``'s first row when its rows are consecutive ranks of the
        policy's ranking (``prefill()[i]`` has rank ``prefill_rank() + i``), so the hook is
        told each rank instead of searching ``RK`` for it; -1 (the default): not known."""
        return -1

    def after_prefill(self, T: tuple) -> None:
        """Called once after the prefill hooks ran (a policy may finish its structures here)."""

    def ranking(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows sorted by id, their hotness ranks) to keep in RK; empty by default."""
        return _EMPTY, _EMPTY

    def ranked(self) -> tuple[np.ndarray, np.ndarray | None]:
        """What the index builds RK from: ``ranking()``'s rows and ranks in any order (ranks
        None: a row's rank is its position). The map is the same whatever the order
        (``mapbuild.build_map``), so a policy may skip sorting them."""
        return self.ranking()

    def ranked_duplicates(self, n: int) -> None:
        """Told, once RK is built from ``ranked()``, how many of its rows repeated an earlier one."""
