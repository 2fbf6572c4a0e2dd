"""Issue 14.5: ``pyvmx run --stat`` breaks the VM exits out per vCPU, as kvm_stat's per-vCPU
view and ``pyvmx demo`` do.  Two vCPUs of one guest take a ticket each (LOCK XADD); the first
writes five bytes to COM1 and ends the run on the debug-exit port, the second writes two and
halts with interrupts off.  With only port 0x3F8 intercepted (SDM 26.1.3, I/O bitmaps) the
IO_INSTRUCTION exits are 5 + 1 on vCPU 0 and 2 on vCPU 1; HLT exits only on vCPU 1
(KVM sets HLT exiting: vmx.c, init_vmcs / CPU_BASED_HLT_EXITING)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.tools.cli_helpers import run_cli

pytestmark = pytest.mark.machine

TWO_VCPUS = r"""
    .code64
_start:
    mov $1, %eax
    lock xadd %eax, ticket(%rip)
    test %eax, %eax
    jnz second
1:  cmpl $2, ticket(%rip)       # wait until the second vCPU has its ticket
    jne 1b
    mov $0x3f8, %dx
    mov $5, %ecx
2:  mov $'a', %al
    out %al, %dx
    loop 2b
    mov $0xf4, %dx
    mov $0, %al
    out %al, %dx
second:
    mov $0x3f8, %dx
    mov $'b', %al
    out %al, %dx
    out %al, %dx
    cli
    hlt
ticket: .long 0
"""


def _row(stderr: str, event: str) -> list[str]:
    """The cells of ``event``'s row in the per-vCPU table (the one with 'vCPU N' columns)."""
    table = stderr[stderr.index("VM exits by reason (kvm_stat)"):]
    line = next(line for line in table.splitlines() if re.search(rf"\b{event}\b", line))
    return [cell.strip() for cell in re.split(r"[│┃|]", line) if cell.strip()]


def test_run_stat_counts_exits_per_vcpu(tmp_path: Path) -> None:
    guest = tmp_path / "two.S"
    guest.write_text(TWO_VCPUS)
    proc = run_cli("run", str(guest), "--vcpus", "2", "--intercept", "io:0x3f8", "--stat")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.strip()) == sorted("aaaaabb")
    header = _row(proc.stderr, "Event")
    assert header == ["Event", "vCPU 0", "vCPU 1"]
    assert _row(proc.stderr, "IO_INSTRUCTION") == ["IO_INSTRUCTION", "6", "2"]
    assert _row(proc.stderr, "HLT") == ["HLT", "0", "1"]
    assert "Total Samples: " in proc.stderr  # the perf-kvm-stat table over all vCPUs is kept


def test_run_stat_one_vcpu_has_one_column(tmp_path: Path) -> None:
    guest = tmp_path / "one.S"
    guest.write_text(".code64\n_start: mov $0x3f8, %dx\n out %al, %dx\n mov $0xf4, %dx\n mov $3, %al\n out %al, %dx\n")
    proc = run_cli("run", str(guest), "--stat")
    assert proc.returncode == 3, proc.stderr
    assert _row(proc.stderr, "Event") == ["Event", "vCPU 0"]
    assert _row(proc.stderr, "IO_INSTRUCTION") == ["IO_INSTRUCTION", "2"]
