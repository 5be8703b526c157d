"""Errors of the model package: the store's hierarchy plus one class for bad model config."""

from __future__ import annotations

from tierstore import IdTypeError, InvalidIdError, TierStoreError

__all__ = ["EngramConfigError", "InvalidIdError", "IdTypeError"]


class EngramConfigError(TierStoreError, ValueError):
    """A model, hasher or training setting is invalid (the message names the value and the fix)."""
