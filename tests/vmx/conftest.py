"""tests/vmx: write the rules the per-rule tests saw failing, when asked (rule_coverage.py)."""

from __future__ import annotations

import json
import os

import pytest

from . import rule_coverage


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(rule_coverage.RECORD_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump({rule: sorted(tests) for rule, tests in sorted(rule_coverage.SEEN.items())}, out, indent=1)
