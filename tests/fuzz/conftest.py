"""The fuzz suite's summary: after the run, inputs by generator and outcomes by kind (see
ledger.py). ``make fuzz`` runs this directory with PYVMX_FUZZ_SCALE set."""

from __future__ import annotations

import pytest

from tests.fuzz.ledger import LEDGER


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = LEDGER.lines()
    if lines:
        terminalreporter.section("fuzz summary")
        for line in lines:
            terminalreporter.write_line(line)
