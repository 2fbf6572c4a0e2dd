"""Which test saw which VM-entry rule fail: the source of docs/conformance.md's entry-check table.

The per-rule tests report each failure they assert through :func:`record`; with
``PYVMX_CONFORMANCE_RECORD=<file>`` set, the session writes {rule: [test, ...]} there as JSON
(tests/vmx/conftest.py), and ``python -m tests.vmx.conformance <file>`` rewrites the table.
"""

from __future__ import annotations

import os

from pyvmx.vmx.entry_checks import EntryCheckFailure

RECORD_ENV = "PYVMX_CONFORMANCE_RECORD"
SEEN: dict[str, set[str]] = {}


def record(failure: EntryCheckFailure) -> None:
    """The running test asserted that ``failure.check`` failed."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    if not current:
        return
    path, _, test = current.split(" ")[0].partition("::")  # "tests/vmx/x.py::test_y[param] (call)"
    SEEN.setdefault(failure.check, set()).add(f"{path}::{test.split('[')[0]}")
