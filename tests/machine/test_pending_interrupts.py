"""An external interrupt that arrives while the guest runs with RFLAGS.IF = 0 (external-interrupt
exiting off) stays pending; the guest keeps running and takes it at the first instruction
boundary where IF = 1 and there is no blocking by STI or MOV SS (SDM 26.7.5; Vol. 3 6.8.1)."""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import VmxSandbox

# The handler for vector 0x31 records the return RIP it finds on its stack, then halts.
HANDLER_AND_IDT = """
handler: mov (%rsp), %rdi
    mov $0x31, %rbx
    hlt
.align 8
idtr: .word 0xfff
    .quad idt
.align 16
idt: .fill 0x31*16, 1, 0
    .word 0, 0x18
    .byte 0, 0x8e
    .word 0
    .long 0, 0
"""
SET_GATE = """
    lea handler(%rip), %rax
    mov %ax, idt+0x31*16
    shr $16, %rax
    mov %ax, idt+0x31*16+6
    lidt idtr(%rip)
"""


def guest(body: str) -> VmxSandbox:
    sb = VmxSandbox("long", SET_GATE + body + HANDLER_AND_IDT)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    return sb


@pytest.mark.parametrize("raised_at", [10, 0])
def test_interrupt_raised_under_cli_waits_for_sti(raised_at: int) -> None:
    """Raised while ``cli`` holds (10 ticks in) or at entry: the loop runs to its end, and the
    interrupt is taken after the instruction that follows STI, never before -- the executor
    used to stop every block at the overdue interrupt "deadline" and stall."""
    sb = guest("cli\nmov $100000, %ecx\n1: loop 1b\nsti\nshadow: nop\nafter: mov $1, %rdx\nhlt\n")
    sb.cpu.raise_interrupt(0x31, at_tsc=sb.cpu.read_tsc() + raised_at)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.HLT
    assert sb.gpr["rbx"] == 0x31 and sb.gpr["rcx"] == 0 and sb.gpr["rdx"] == 0
    assert sb.gpr["rdi"] == sb.symbol("after")
    assert len(sb.cpu.interrupts) == 0


def test_interrupt_pending_at_entry_with_if_clear() -> None:
    """Guest RFLAGS.IF = 0 in the VMCS, the interrupt already pending at VM entry."""
    sb = guest("mov $1000, %ecx\n1: loop 1b\nsti\nshadow: nop\nafter: mov $1, %rdx\nhlt\n")
    sb.write(F.GUEST_RFLAGS, 0x2)
    sb.cpu.raise_interrupt(0x31, at_tsc=sb.cpu.read_tsc())
    exit = sb.run()
    assert exit.exit_reason is ExitReason.HLT
    assert sb.gpr["rbx"] == 0x31 and sb.gpr["rdi"] == sb.symbol("after")


def test_spinning_with_if_clear_reaches_the_preemption_timer() -> None:
    """``cli; spin: jmp spin`` with an interrupt pending: the guest keeps running (no stall)
    until the VMX-preemption timer ends the run; the interrupt is still pending."""
    sb = guest("cli\nspin: jmp spin\n")
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, 200)
    sb.cpu.raise_interrupt(0x31, at_tsc=sb.cpu.read_tsc() + 10)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.PREEMPTION_TIMER
    assert sb.rip == sb.symbol("spin") and len(sb.cpu.interrupts) == 1


def test_native_sti_hlt_saves_no_sti_blocking_with_hlt_activity() -> None:
    """``sti; hlt`` run natively (no HLT exiting): the STI shadow covered the HLT, which has
    retired, so the exit saves the HLT activity state with no STI blocking (SDM 26.6.2 -- and
    27.3.1.5 refuses blocking by STI with a non-active activity state at the next entry)."""
    sb = VmxSandbox("long", "cli\nnop\nsti\nhlt\nafter: nop\nhlt\n")
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, 50)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.PREEMPTION_TIMER
    assert sb.read(F.GUEST_ACTIVITY_STATE) == 1  # HLT
    assert sb.read(F.GUEST_INTERRUPTIBILITY_INFO) & 0x3 == 0
    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, 50)
    assert sb.run().exit_reason is ExitReason.PREEMPTION_TIMER
