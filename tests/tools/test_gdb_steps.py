"""Single step and continue, in any order, through real gdb attached to ``pyvmx run --gdb``: the
guest must end exactly as it does without gdb (same serial output, same exit status), whatever
VM exits the steps land on -- a first-touch EPT violation, CPUID, RDMSR, an I/O exit to user
space, HLT, timer interrupts through interrupt windows, preemption-timer slices.

The stub steps with the hypervisor's guest-debug path (KVM_GUESTDBG_SINGLESTEP), which must not
leave a #DB for the guest: gdb's single step is invisible to it (Linux
Documentation/virt/kvm/api.rst, KVM_SET_GUEST_DEBUG; QEMU gdbstub.c gdb_continue/gdb_single_step)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvmx.guest.assemble import assemble
from tests.tools.cli_helpers import run_cli
from tests.tools.gdb_session import needs_gdb, registers, run_with_gdb

GUEST = Path(__file__).parent / "guests" / "gdb_steps.S"
SYM = dict(assemble(GUEST.read_text(), 0x10000).symbols)


def _at(label: str, offset: int = 0) -> str:
    return f"*{SYM[label] + offset:#x}"


SEQUENCES = {
    "si": ["si", "info registers rip"],
    "si; c": ["si", "info registers rip", "c"],
    "b label; c; si; si; c": [f"b {_at('first_touch')}", "c", "si", "si", "info registers rip", "c"],
    "stepi 100; c": ["stepi 100", "c"],
    "si x8 across the exits": ["si"] * 8 + ["info registers rip"],
    "finish-like: b func; c; tbreak return; c; si; c": [f"b {_at('greet')}", "c", f"tbreak {_at('after_call')}", "c",
                                                        "info registers rip", "si", "c"],
    "b hlt loop; c; stepi 40; c": [f"b {_at('wait')}", "c", "stepi 40", "delete", "c"],
    "c only": ["c"],
}


@pytest.fixture(scope="module")
def baseline() -> tuple[int, str]:
    r = run_cli("run", str(GUEST), timeout=120)
    assert r.returncode == 0x2A and r.stdout == "ok\n", r.stdout + r.stderr
    return r.returncode, r.stdout


@needs_gdb
@pytest.mark.parametrize("name", list(SEQUENCES))
def test_steps_and_continues_leave_the_guest_as_without_gdb(name: str, baseline: tuple[int, str]) -> None:
    session = run_with_gdb(GUEST, SEQUENCES[name])
    assert (session.status, session.stdout) == baseline, session.gdb_output + session.stderr
    assert "exit status 42" in session.stderr, session.stderr
    assert "triple fault" not in session.gdb_output + session.stderr
    rips = registers(session.gdb.stdout, "rip")
    if name == "si":
        assert rips == [SYM["first_touch"]], session.gdb_output
    if name == "b label; c; si; si; c":
        assert rips == [SYM["first_touch"] + 7 + 2], session.gdb_output  # mov %r8,data(%rip); xor
    if name == "finish-like: b func; c; tbreak return; c; si; c":
        assert rips == [SYM["after_call"]], session.gdb_output
    if name == "si x8 across the exits":
        # mov, mov (EPT violation), xor, cpuid, mov, rdmsr, mov, out (to user space): at "call"
        assert rips == [SYM["after_call"] - 5], session.gdb_output
