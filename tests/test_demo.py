"""The built-in demo (``pyvmx demo``) answers seed 002's questions: exactly the intercepted guest
actions exit (SDM 26.1.3 I/O bitmaps, 26.1.3 MSR bitmaps, 26.1.3 CR0 guest/host mask)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyvmx.tools.demo import GUEST, run_demo

pytestmark = pytest.mark.machine


def test_demo_exits_only_for_the_intercepted_actions() -> None:
    result = run_demo()
    message = "Hello from VMX non-root operation!\n"
    assert result.output == message
    # One I/O exit per character on port 0x3F8, none for port 0x80; one EFER write (the RDMSR
    # does not exit); one CR0 write (the TS-only write does not exit); CPUID; HLT.
    assert result.exits == {
        "IO_INSTRUCTION": len(message),
        "MSR_WRITE": 1,
        "CR_ACCESS": 1,
        "CPUID": 1,
        "HLT": 1,
    }
    assert "rdmsr" in GUEST and "out %al, %dx            # no exit" in GUEST


def test_pyvmx_demo_command_prints_output_and_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "pyvmx", "demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Hello from VMX non-root operation!" in proc.stdout
    assert "MSR_WRITE" in proc.stdout and "IO_INSTRUCTION" in proc.stdout
