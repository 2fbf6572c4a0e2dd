"""Issue 14.16: what a user reads names each experiment by what it shows, never by the project's
internal "seed" numbering: the README, every command's --help, the scenario files (their
comments, names and descriptions) and the demo's story."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.tools.cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
INTERNAL_WORD = re.compile(r"\bseeds?\b|seed[- ]00\d", re.IGNORECASE)
COMMANDS = [
    (), ("run",), ("check",), ("replay",), ("demo",), ("caps",), ("gdbserver",),
    ("trace",), ("trace", "show"), ("trace", "stats"), ("vmcs",), ("vmcs", "dump"), ("vmcs", "fields"),
]


def test_readme_examples_and_demo_do_not_say_seed() -> None:
    files = [ROOT / "README.md", ROOT / "src/pyvmx/tools/guests/demo.S", *sorted((ROOT / "examples").rglob("*.*"))]
    offending = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1) if INTERNAL_WORD.search(line)]
    assert offending == []


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pyvmx")
def test_help_does_not_say_seed(command: tuple[str, ...]) -> None:
    r = run_cli(*command, "--help")
    assert r.returncode == 0, r.stderr
    assert not INTERNAL_WORD.search(r.stdout), r.stdout

