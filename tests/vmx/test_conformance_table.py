"""docs/conformance.md lists every VM-entry rule of the registry (SDM 27.2-27.4), in order, each
with at least one test that exists."""

from __future__ import annotations

import ast
from pathlib import Path

from .conformance import DOC, rules, table_rows

ROOT = Path(__file__).resolve().parents[2]


def _test_functions(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_conformance_table_lists_every_registered_entry_rule_in_order() -> None:
    rows = table_rows(DOC.read_text(encoding="utf-8"))
    assert [(section, rule) for section, rule, _ in rows] == rules()


def test_conformance_table_names_an_existing_test_for_every_rule() -> None:
    for section, rule, tests in table_rows(DOC.read_text(encoding="utf-8")):
        assert tests, f"SDM {section} {rule}: no test listed"
        for test in tests:
            path, name = test.split("::")
            assert path.startswith("tests/") and name in _test_functions(path), f"SDM {section} {rule}: {test} does not exist"
