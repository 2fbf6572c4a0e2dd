"""The monitor trap flag: an MTF VM exit (reason 37) on the instruction boundary after each
instruction -- the single-step a debugger stub builds on.

SDM references: 25.5.2 (when MTF VM exits are pending, and their priority: above the
VMX-preemption timer and every event below it), 27.6.2 (VM entry injecting a pending MTF VM
exit: interruption type 7, vector 0), 28.2.1 (no exit qualification for MTF), 26.1 (an
instruction that causes a VM exit causes that exit instead).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import INTR_INFO_VALID_MASK, InterruptionType
from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.guest.sandbox import VmxSandbox

pytestmark = pytest.mark.machine

MTF = ExitReason.MONITOR_TRAP_FLAG

# A long-mode IDT whose gates for vectors 6 (#UD) and 0x20 point at `handler` (RSP 0x8000).
IDT_GUEST = """
    lea handler(%rip), %rax
    lea idt(%rip), %rdi
    mov %ax, 6*16(%rdi)
    mov %ax, 0x20*16(%rdi)
    shr $16, %rax
    mov %ax, 6*16+6(%rdi)
    mov %ax, 0x20*16+6(%rdi)
    lidt idtr(%rip)
ready: nop
    ud2
after: hlt
handler: mov $0x77, %ebx
    hlt
.align 8
idtr: .word 0x20*16+15
    .quad idt
.align 16
idt: .rept 0x21
    .word 0, 0x18
    .byte 0, 0x8e
    .word 0
    .long 0, 0
    .endr
"""


def _mtf(sb: VmxSandbox) -> None:
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MONITOR_TRAP_FLAG)


def _run_to(sb: VmxSandbox, label: str) -> None:
    """Single-step (MTF on) until RIP is at ``label``."""
    while sb.rip != sb.symbol(label):
        assert sb.run().exit_reason is MTF


def test_mtf_single_steps_straight_line_code() -> None:
    """SDM 25.5.2: an instruction that completes makes an MTF VM exit pending at the next
    boundary -- so each VM entry runs exactly one instruction.  The exit reports the guest
    state after it (RIP of the next instruction, its results) and no qualification."""
    sb = VmxSandbox("long", "a: mov $5, %eax\nb: add %eax, %eax\nc: push %rax\nd: nop\ne: hlt\n")
    _mtf(sb)
    trace = []
    for _ in range(4):
        exit = sb.run()
        assert exit.exit_reason is MTF
        assert exit.qualification == 0 and exit.instruction_length == 0
        trace.append((sb.rip, sb.gpr["rax"]))
    assert trace == [(sb.symbol("b"), 5), (sb.symbol("c"), 10), (sb.symbol("d"), 10), (sb.symbol("e"), 10)]
    assert sb.read(F.GUEST_RSP) == 0x8000 - 8  # the push completed


def test_mtf_steps_through_a_loop_like_a_debugger() -> None:
    """Stepping follows control flow: the RIP trace is the executed instruction sequence."""
    sb = VmxSandbox("long", "mov $3, %ecx\ntop: dec %ecx\njnz top\nend: hlt\n")
    _mtf(sb)
    trace = []
    while sb.rip != sb.symbol("end"):
        assert sb.run().exit_reason is MTF
        trace.append(sb.rip)
    top, jnz, end = sb.symbol("top"), sb.symbol("top") + 2, sb.symbol("end")
    assert trace == [top, jnz, top, jnz, top, jnz, end]


def test_an_instruction_that_exits_causes_its_own_exit_not_mtf() -> None:
    """SDM 25.5.2/26.1: CPUID causes a CPUID VM exit; no MTF VM exit is pending for it.  After
    the hypervisor skips it, the next entry steps one more instruction."""
    sb = VmxSandbox("long", "nop\nid: cpuid\nnext: nop\nlast: hlt\n")
    _mtf(sb)
    assert sb.run().exit_reason is MTF and sb.rip == sb.symbol("id")
    exit = sb.run()
    assert exit.exit_reason is ExitReason.CPUID and sb.rip == sb.symbol("id")
    sb.skip_instruction()
    assert sb.run().exit_reason is MTF and sb.rip == sb.symbol("last")


def test_mtf_after_a_fault_comes_after_its_delivery() -> None:
    """SDM 25.5.2: an instruction that faults (UD2 -> #UD, delivered through the guest IDT)
    makes the MTF VM exit pending after the delivery: RIP is the handler's first instruction,
    and the #UD frame is on the stack."""
    sb = VmxSandbox("long", IDT_GUEST)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    _mtf(sb)
    _run_to(sb, "ready")
    assert sb.run().exit_reason is MTF and sb.rip == sb.symbol("ready") + 1  # the NOP
    assert sb.run().exit_reason is MTF
    assert sb.rip == sb.symbol("handler")
    assert sb.read_memory(sb.read(F.GUEST_RSP), 8) == (sb.symbol("ready") + 1).to_bytes(8, "little")
    assert sb.run().exit_reason is MTF and sb.gpr["rbx"] == 0x77


def test_mtf_after_injected_event_before_the_first_instruction() -> None:
    """SDM 25.5.2: MTF = 1 and VM entry injecting a vectored event -> the MTF VM exit is pending
    before the first instruction after the entry, i.e. right after the delivery."""
    sb = VmxSandbox("long", IDT_GUEST)
    _mtf(sb)
    _run_to(sb, "ready")
    sb.write(F.GUEST_RFLAGS, sb.read(F.GUEST_RFLAGS) | (1 << 9))  # IF = 1 (SDM 27.3.1.4)
    sb.write(F.VM_ENTRY_INTR_INFO_FIELD, INTR_INFO_VALID_MASK | (int(InterruptionType.EXT_INTR) << 8) | 0x20)
    exit = sb.run()
    assert exit.exit_reason is MTF
    assert sb.rip == sb.symbol("handler")
    assert sb.read_memory(sb.read(F.GUEST_RSP), 8) == sb.symbol("ready").to_bytes(8, "little")


def test_pending_mtf_injection_exits_before_any_instruction_even_with_mtf_off() -> None:
    """SDM 27.6.2: VM entry injecting interruption type 7 (other event), vector 0 makes an MTF
    VM exit pending, even with the "monitor trap flag" control 0."""
    sb = VmxSandbox("long", "first: nop\nhlt\n")
    sb.write(F.VM_ENTRY_INTR_INFO_FIELD, INTR_INFO_VALID_MASK | (int(InterruptionType.OTHER_EVENT) << 8) | 0)
    exit = sb.run()
    assert exit.exit_reason is MTF
    assert sb.rip == sb.symbol("first")
    assert not sb.read(F.VM_ENTRY_INTR_INFO_FIELD) & INTR_INFO_VALID_MASK  # cleared by the exit


def test_mtf_after_hlt_reports_the_hlt_activity_state() -> None:
    """HLT without HLT exiting completes (the processor enters the HLT state); the pending MTF
    VM exit wakes it: RIP after the HLT, activity state HLT saved (SDM 25.5.2, 28.3.4)."""
    sb = VmxSandbox("long", "hlt\nafter: nop\n")
    _mtf(sb)
    exit = sb.run()
    assert exit.exit_reason is MTF
    assert sb.rip == sb.symbol("after")
    assert sb.read(F.GUEST_ACTIVITY_STATE) == 1


def test_mtf_after_emulated_non_exiting_instruction() -> None:
    """An instruction VMX changes but does not exit on (OUT to a port not in the I/O bitmaps)
    still completes: MTF VM exit after it."""
    sb = VmxSandbox("long", "mov $0x80, %dx\nport: out %al, %dx\nnext: hlt\n")
    sb.use_io_bitmaps(intercept=[])
    _mtf(sb)
    assert sb.run().exit_reason is MTF and sb.rip == sb.symbol("port")
    assert sb.run().exit_reason is MTF and sb.rip == sb.symbol("next")


def test_mtf_has_priority_over_the_preemption_timer() -> None:
    """When the timer expires on the same boundary as a pending MTF VM exit, the MTF VM exit
    comes first (SDM 25.5.2: MTF VM exits have priority over debug-trap exceptions and lower
    priority events; the timer is one of them, SDM 25.5.1); the timer stays expired, so the next
    entry exits on it before any instruction."""
    sb = VmxSandbox("long", "spin: jmp spin\n")
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    sb.set_bits(F.VM_EXIT_CONTROLS, X.SAVE_VMX_PREEMPTION_TIMER)
    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, 1)  # expires 32 instructions after an aligned entry
    _mtf(sb)
    assert sb.cpu.read_tsc() % 32 == 0
    for step in range(32):
        assert sb.run().exit_reason is MTF
    assert sb.read(F.VMX_PREEMPTION_TIMER_VALUE) == 0  # expired at the 32nd boundary
    assert sb.run().exit_reason is ExitReason.PREEMPTION_TIMER
    assert sb.rip == sb.symbol("spin")


def test_interrupt_delivered_at_entry_then_mtf() -> None:
    """SDM 25.5.2: MTF = 1, no injection, and a pending interrupt delivered before an
    instruction can execute -> the MTF VM exit follows the delivery (RIP = handler)."""
    sb = VmxSandbox("long", IDT_GUEST)
    _mtf(sb)
    _run_to(sb, "ready")
    sb.write(F.GUEST_RFLAGS, sb.read(F.GUEST_RFLAGS) | (1 << 9))
    sb.cpu.raise_interrupt(0x20)
    exit = sb.run()
    assert exit.exit_reason is MTF
    assert sb.rip == sb.symbol("handler")
    assert len(sb.cpu.interrupts) == 0  # acknowledged by the delivery
