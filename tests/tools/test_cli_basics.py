"""`pyvmx --version`, `pyvmx caps`, `pyvmx vmcs fields`, and one-line errors for bad arguments."""

from __future__ import annotations

import pytest

import pyvmx
from tests.tools.cli_helpers import run_cli


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0
    assert pyvmx.__version__ in r.stdout


def test_caps_prints_decoded_capabilities() -> None:
    r = run_cli("caps")
    assert r.returncode == 0, r.stderr
    assert "IA32_VMX_BASIC" in r.stdout
    assert "HLT_EXITING" in r.stdout and "UNRESTRICTED_GUEST" in r.stdout
    assert "preemption timer rate" in r.stdout


def test_caps_without_a_feature() -> None:
    r = run_cli("caps", "--without", "unrestricted-guest")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if "UNRESTRICTED_GUEST" in line)
    assert "not supported" in line


def test_caps_raw_lists_msr_values() -> None:
    r = run_cli("caps", "--raw")
    assert r.returncode == 0
    assert "IA32_VMX_BASIC" in r.stdout and "0x00d8" in r.stdout


def test_vmcs_fields_table() -> None:
    r = run_cli("vmcs", "fields")
    assert r.returncode == 0
    row = next(line for line in r.stdout.splitlines() if "PAGE_FAULT_ERROR_CODE_MASK" in line)
    assert "0x4006" in row and "32" in row and "control" in row


def test_vmcs_fields_filtered() -> None:
    r = run_cli("vmcs", "fields", "--type", "host", "--width", "natural")
    assert r.returncode == 0
    assert "HOST_RIP" in r.stdout and "GUEST_RIP" not in r.stdout


@pytest.mark.parametrize(
    "args",
    [("caps", "--without", "NO_SUCH_CONTROL"), ("vmcs", "fields", "--width", "12"), ("frobnicate",), ("caps", "--bogus")],
)
def test_bad_arguments_are_one_line_and_nonzero(args: tuple[str, ...]) -> None:
    r = run_cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pyvmx: error:")
