"""Random bytes as guest code never crash the host: whatever the guest runs, a VM entry ends in
a VM exit (the SDM's outcomes: an instruction exit, an exception through the exception bitmap,
a triple fault, an EPT violation, the VMX-preemption timer ...) or in a clean, reported stall
(the instruction budget, HLT with nothing to wake the processor) -- never a Python exception
escaping the run loop, never a hang.

SDM references: 26.1-26.2 (what causes VM exits), 26.5.1 (the VMX-preemption timer bounds every
entry), 28.2 (exit information), 28.3 (the guest state a VM exit saves can be entered again).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import Mode, VmxSandbox
from pyvmx.vmx.outcomes import VmxStatus
from tests.fuzz.strategies import GuestMode, MachineControls
from tests.fuzz.targets import is_failure, run_machine_input

pytestmark = pytest.mark.machine

def _run_random_guest(mode: Mode, code: bytes) -> None:
    """The bare-machine fuzz target of tests/fuzz (VMLAUNCH, then VMRESUME after skipping each
    intercepted instruction, under the VMX-preemption timer) on one input."""
    fuzz_mode = {"real": GuestMode.REAL, "protected": GuestMode.PROTECTED32, "long": GuestMode.LONG}[mode]
    result = run_machine_input(fuzz_mode, code, MachineControls(timer=20))
    assert not is_failure(result.kind), result
    assert result.kind.startswith(("VM_EXIT:", "STALL:")), result


# The property itself -- random bytes under random controls in every mode -- is
# tests/fuzz/test_guest_bytes.py; these are its regression cases.
@pytest.mark.parametrize(
    "mode, code",
    [
        ("long", bytes.fromhex("0f01c1")),  # VMCALL
        ("long", bytes.fromhex("0f37")),  # GETSEC with CR4.SMXE = 0
        ("real", bytes.fromhex("f36c")),  # REP INSB with a 16-bit CX
        ("protected", bytes.fromhex("0f22d8")),  # MOV CR3, EAX
        ("long", bytes.fromhex("48cf")),  # IRETQ with garbage on the stack
        ("long", bytes.fromhex("ebfe")),  # jmp $: only the timer or the budget ends it
    ],
)
def test_known_awkward_instructions(mode: Mode, code: bytes) -> None:
    """Regression cases for the property above."""
    _run_random_guest(mode, code)


def test_an_exception_loop_that_retires_nothing_is_a_reported_stall() -> None:
    """A #UD handler that is itself UD2, entered on an IST stack (SDM 6.14.5): every delivery
    lands on the same RIP and RSP and no instruction ever retires.  Hardware would spin there
    forever; the model reports a stall with its reason instead of hanging."""
    sb = VmxSandbox(
        "long",
        """
        lea handler(%rip), %rax
        mov %ax, idt+6*16
        shr $16, %rax
        mov %ax, idt+6*16+6
        movq $0x7000, 0x1800+0x24       # TSS.IST1
        lidt idtr(%rip)
        ud2
    handler: ud2
    .align 8
    idtr: .word 0xfff
        .quad idt
    .align 16
    idt: .fill 6*16, 1, 0
        .word 0, 0x18
        .byte 1, 0x8e                   # IST 1
        .word 0
        .long 0, 0
        """,
    )
    result = sb.enter()
    assert result.status is VmxStatus.STALLED
    assert result.stall is not None and "no progress" in result.stall
    assert sb.rip == sb.symbol("handler") and sb.read(F.GUEST_RSP) == 0x7000 - 5 * 8
