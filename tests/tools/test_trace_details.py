"""Issue 14.3: every exit record of ``pyvmx run --trace`` carries what its reason needs to be
debugged (SDM 25.9 exit-information fields, and the registers the instruction used), ``trace
show`` prints them in a DETAILS column, each entry event carries the RIP it enters at (the
exit's RIP advanced past an emulated instruction, SDM 28.2.5 / KVM's skip_emulated_instruction),
and the host time of each handler is measured (handler_ns), as ``check --trace`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tools.cli_helpers import run_cli

pytestmark = pytest.mark.machine

GUEST = r"""
    .code64
_start:
    mov $0xc0000080, %ecx
    rdmsr
    wrmsr                        # MSR_WRITE: ECX = IA32_EFER, EDX:EAX = 0xd01 (SCE, LME, LMA, NXE)
    mov %cr0, %rax
    xor $8, %rax
    mov %rax, %cr0               # CR_ACCESS: MOV to CR0 from RAX, TS flipped
    mov $0x3f8, %dx
    mov $'Z', %al
    out %al, %dx                 # IO_INSTRUCTION: port 0x3f8, 1 byte, out, value 0x5a
    ud2                          # EXCEPTION_NMI: #UD, hardware exception, no error code
"""


def _trace(tmp_path: Path) -> tuple[list[dict[str, object]], str]:
    guest = tmp_path / "g.S"
    guest.write_text(GUEST)
    trace = tmp_path / "run.jsonl"
    proc = run_cli("run", str(guest), "--intercept", "msr-write:IA32_EFER", "--intercept", "cr0:TS",
                   "--intercept", "exception:UD", "--trace", str(trace))
    assert proc.returncode == 129, proc.stderr  # the #UD is reinjected: no IDT, so a triple fault
    events = [json.loads(line) for line in trace.read_text().splitlines()[1:]]
    shown = run_cli("trace", "show", str(trace), "--entries")
    assert shown.returncode == 0, shown.stderr
    return events, shown.stdout


def test_exit_records_carry_details_and_trace_show_prints_them(tmp_path: Path) -> None:
    events, table = _trace(tmp_path)
    exits = {e["reason"]: e for e in events if e["kind"] == "exit"}
    assert exits["MSR_WRITE"]["details"] == {"msr": 0xC0000080, "msr_name": "EFER", "value": 0xD01}
    assert exits["CR_ACCESS"]["details"]["value"] & 0x8000_0009 == 0x8000_0009  # PG, TS (flipped on), PE
    assert exits["IO_INSTRUCTION"]["details"] == {"value": 0x5A}
    assert exits["EXCEPTION_NMI"]["details"] == {"vector": 6, "type": 3}
    ept = exits["EPT_VIOLATION"]["details"]
    assert set(ept) == {"gpa", "gla"}  # the first fetch: bit 7 of the qualification is set
    header = table.splitlines()[0].split()
    assert header == ["TSC", "VM", "VCPU", "EVENT", "REASON", "RIP", "INSTRUCTION", "QUALIFICATION", "DETAILS", "OUTCOME"]
    lines = table.splitlines()
    assert any("wrmsr" in line and "msr=EFER(0xc0000080) value=0xd01" in line for line in lines)
    assert any("mov cr0, rax" in line and "cr=0 access=mov-to-cr gpr=rax" in line for line in lines)
    assert any("port=0x3f8 size=1 direction=out operand=dx" in line and "value=0x5a" in line for line in lines)
    assert any("EXCEPTION_NMI" in line and "vector=0x6 type=0x3" in line for line in lines)


def test_entry_events_carry_the_rip_they_enter_at_and_handlers_are_timed(tmp_path: Path) -> None:
    events, _ = _trace(tmp_path)
    for exit, entry in zip(events, events[1:]):
        if exit["kind"] == "exit" and exit["reason"] == "MSR_WRITE":
            assert entry["kind"] == "entry" and entry["rip"] == exit["rip"] + 2  # past the 2-byte WRMSR
        if exit["kind"] == "exit" and exit["reason"] == "CR_ACCESS":
            assert entry["rip"] == exit["rip"] + 3  # past MOV to CR0 (0f 22 c0)
    assert events[0]["kind"] == "entry" and events[0]["rip"] == 0x10000  # the first entry: _start
    exits = [e for e in events if e["kind"] == "exit"]
    assert exits and all(e["handler_ns"] > 0 for e in exits)
