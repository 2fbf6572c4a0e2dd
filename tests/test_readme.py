"""The README's ten-line example runs as printed and reports what its comments say: VMXON,
VMCLEAR and VMPTRLD succeed; VMLAUNCH with only the pin-based controls written fails with
VM-instruction error 7 (SDM 27.2.1.1: reserved bits of the primary processor-based controls)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_top_shows_exactly_the_two_setup_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(), flags=re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_vmx_example_runs_and_fails_entry_with_error_7() -> None:
    example = _python_blocks()[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0] == "VMsucceed VMsucceed VMsucceed"
    assert lines[1].startswith("VMfailValid(7: ENTRY_INVALID_CONTROL_FIELD)")
    assert "27.2.1.1" in lines[1]


def test_readme_hypervisor_example_only_the_serial_port_exits() -> None:
    """The hypervisor example: with intercept_io(0x3F8, only=True) the OUT exits and reaches the
    UART; the HLT (KVM intercepts it) ends the run with nothing to wake the vCPU."""
    example = _python_blocks()[1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, "README.md", "exec"), {})
    text = out.getvalue()
    assert text.startswith("HltExit(") and "b'A'" in text
    assert "'IO_INSTRUCTION': 1" in text and "'HLT': 1" in text


def test_readme_measured_figures_name_their_benchmark_and_path() -> None:
    """Issue 14.15: each measured figure in the README names the benchmark that printed it (a
    script that exists and prints that table's first line) and which path it measures -- the
    bare VT-x machine's exit round trip or one exit through the hypervisor (vcpu.run)."""
    text = README.read_text()
    measured = text[text.index("## Measured"):]
    root = README.parent
    for script, first_line_source in (
        ("benchmarks/engine.py", "VM exit round trip (CPUID exit -> RIP += length -> VMRESUME)"),
        ("benchmarks/hypervisor.py", "one VM exit through the hypervisor (vcpu.run)"),
    ):
        assert f"`python {script}" in measured
        assert first_line_source in (root / script).read_text()
        assert first_line_source in measured
    words = " ".join(measured.split())
    assert "**bare VT-x machine's**" in words and "**through the hypervisor**" in words
    assert "**reduced sizes**" in words
