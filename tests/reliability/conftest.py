"""Reliability suite: differential soak, input fuzzing, API error contract.

The soak adds up what it compared in ``SOAK``; the summary line is printed at the end of
the run (``pytest_terminal_summary``) so docs can quote it.
"""

from __future__ import annotations

import threading

import pytest

SOAK = {"lookups": 0, "rows": 0, "wrong_rows": 0, "untyped_errors": 0, "seconds": 0.0}
SOAK_LOCK = threading.Lock()


def soak_add(**counts: float) -> None:
    with SOAK_LOCK:
        for k, v in counts.items():
            SOAK[k] += v


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SOAK["lookups"]:
        terminalreporter.write_line(
            f"soak: {SOAK['lookups']:,} lookups compared ({SOAK['rows']:,} rows), "
            f"{SOAK['wrong_rows']:,} wrong rows, {SOAK['untyped_errors']:,} untyped errors "
            f"in {SOAK['seconds']:.1f} s of soak")
