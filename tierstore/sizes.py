"""Human-readable byte sizes at the edges ("64MiB", "2GB", 1_000_000); bytes inside."""

from __future__ import annotations

import math
import re

from .errors import BudgetError

__all__ = ["parse_size", "format_size"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str | None, *, what: str = "size") -> int:
    """Return ``value`` in bytes. Accepts ints, and strings such as "64MiB", "1.5GB", "0".

    ``None`` means 0 (the tier is disabled). Raises ``BudgetError`` naming the value.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise BudgetError(f"{what}={value!r} is not a size; pass bytes or a string like '64MiB'")
    if isinstance(value, (int, float)):
        if value != value or value < 0 or value == float("inf"):
            raise BudgetError(f"{what}={value!r} is negative, infinite or NaN; pass bytes (0 disables the tier)")
        return int(value)
    if not isinstance(value, str):
        raise BudgetError(f"{what}={value!r} has type {type(value).__name__}; pass bytes or '64MiB'")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(
            f"{what}={value!r} is not a size; use a number with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '64MiB'"
        )
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(n):
        raise BudgetError(f"{what}={value!r} is too large to be a size")
    return int(n)


def format_size(n: int | float) -> str:
    """Format bytes with a binary unit: 1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
