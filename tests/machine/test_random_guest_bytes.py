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
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.assemble import GuestImage
from pyvmx.guest.sandbox import GUEST_CODE, Mode, VmxSandbox
from pyvmx.vmx.outcomes import VmxStatus

pytestmark = pytest.mark.machine

# Exiting controls a hypervisor might set; each example picks some (SDM Table 25-6).
_OPTIONAL_EXITS = [
    C.HLT_EXITING, C.INVLPG_EXITING, C.MWAIT_EXITING, C.RDPMC_EXITING, C.RDTSC_EXITING,
    C.CR3_LOAD_EXITING, C.CR3_STORE_EXITING, C.MOV_DR_EXITING, C.UNCOND_IO_EXITING,
    C.MONITOR_EXITING, C.PAUSE_EXITING, C.INTR_WINDOW_EXITING, C.MONITOR_TRAP_FLAG,
]

guest_code = st.binary(min_size=1, max_size=64)
controls = st.fixed_dictionaries({
    "proc": st.lists(st.sampled_from(_OPTIONAL_EXITS), unique=True, max_size=4),
    "exception_bitmap": st.sampled_from([0, 0xFFFFFFFF, 1 << 14, 1 << 6]) | st.integers(0, 2**32 - 1),
    "cr0_mask": st.sampled_from([0, 0x80000001, 0xFFFFFFFF]),
    "timer": st.integers(0, 40),
})


def _run_random_guest(mode: Mode, code: bytes, ctl: dict) -> None:
    base = 0 if mode == "real" else GUEST_CODE
    sb = VmxSandbox(mode, GuestImage(code, base, {}), memory=8 << 20, instruction_budget=3000)
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    for control in ctl["proc"]:
        sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, control)
    sb.write(F.EXCEPTION_BITMAP, ctl["exception_bitmap"])
    sb.write(F.CR0_GUEST_HOST_MASK, ctl["cr0_mask"])
    for _ in range(4):  # a hypervisor that skips intercepted instructions and resumes
        sb.write(F.VMX_PREEMPTION_TIMER_VALUE, ctl["timer"])
        result = sb.enter()
        assert result.status in (VmxStatus.VM_EXIT, VmxStatus.STALLED), result
        if result.status is VmxStatus.STALLED:
            assert result.stall  # a reason is reported
            return
        exit = result.exit
        assert exit is not None
        if exit.failed_vmentry:
            return  # the saved state did not pass the VM-entry checks: a clean outcome too
        assert isinstance(exit.exit_reason, ExitReason)
        if exit.exit_reason is ExitReason.TRIPLE_FAULT:
            return
        if exit.instruction_length and exit.exit_reason is not ExitReason.EXCEPTION_NMI:
            sb.skip_instruction()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["real", "protected", "long"])
@settings(max_examples=200, deadline=None)
@given(code=guest_code, ctl=controls)
def test_random_bytes_end_in_an_exit_or_a_reported_stall(mode: Mode, code: bytes, ctl: dict) -> None:
    _run_random_guest(mode, code, ctl)


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
    _run_random_guest(mode, code, {"proc": [], "exception_bitmap": 0, "cr0_mask": 0, "timer": 20})


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
