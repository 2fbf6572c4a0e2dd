"""Seed 002's questions, answered by configuring a VMCS and running real guest code: each test
shows the exact VM exits (reason, qualification, RIP, instruction length) the SDM prescribes.

SDM references: 25.6 (VM-execution controls), 26.1-26.2 (what causes VM exits), 28.2.1 (exit
qualifications), 26.5.1 (VMX-preemption timer).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0
from pyvmx.guest.sandbox import VmxSandbox

pytestmark = pytest.mark.machine


def test_hlt_exiting_seed_002() -> None:
    """"Intercept guest HLT": primary control HLT exiting (bit 7) -> exit reason 12 at the HLT."""
    sb = VmxSandbox("long", "nop\nnop\nstop: hlt\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.HLT
    assert sb.rip == sb.symbol("stop")
    assert exit.instruction_length == 1


def test_pause_exiting_seed_002() -> None:
    sb = VmxSandbox("long", "nop\nspin: pause\nhlt\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.PAUSE_EXITING | C.HLT_EXITING)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.PAUSE_INSTRUCTION
    assert sb.rip == sb.symbol("spin") and exit.instruction_length == 2


def test_cpuid_exits_unconditionally() -> None:
    sb = VmxSandbox("long", "mov $0, %eax\nhere: cpuid\nhlt\n")
    exit = sb.run()
    assert exit.exit_reason is ExitReason.CPUID
    assert sb.rip == sb.symbol("here") and exit.instruction_length == 2
    assert sb.gpr["rax"] == 0


def test_unconditional_io_exiting_seed_002() -> None:
    """"Intercept all guest I/O": unconditional I/O exiting; qualification per SDM Table 28-5."""
    sb = VmxSandbox("long", "mov $0x80, %dx\nmov $0x41, %al\nport: out %al, %dx\nhlt\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.UNCOND_IO_EXITING)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.IO_INSTRUCTION
    assert exit.qualification == (0x80 << 16) | 0  # 1 byte, OUT, not string, DX operand
    assert sb.rip == sb.symbol("port") and exit.instruction_length == 1


def test_io_bitmap_only_port_3f8_seed_002() -> None:
    """Only port 0x3F8 set in bitmap A: a 1-byte OUT to 0x3F8 exits, a 2-byte OUT to 0x3F7
    exits (it covers 0x3F8), a 2-byte OUT to 0x3F6 does not (SDM 26.1.3)."""
    sb = VmxSandbox(
        "long",
        """
        mov $0x3f6, %dx
        out %ax, %dx          # 0x3F6-0x3F7: no exit
        mov $0x3f7, %dx
    two: out %ax, %dx         # 0x3F7-0x3F8: exit
        mov $0x3f8, %dx
    one: out %al, %dx         # 0x3F8: exit
        hlt
        """,
    )
    sb.use_io_bitmaps(intercept=[0x3F8])
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.IO_INSTRUCTION
    assert sb.rip == sb.symbol("two")
    assert exit.qualification == (0x3F7 << 16) | 1  # size 2 -> bits 2:0 = 1
    assert exit.instruction_length == 2
    sb.skip_instruction()
    exit = sb.run()
    assert exit.exit_reason is ExitReason.IO_INSTRUCTION and sb.rip == sb.symbol("one")
    assert exit.qualification == 0x3F8 << 16
    sb.skip_instruction()
    assert sb.run().exit_reason is ExitReason.HLT


def test_in_immediate_qualification() -> None:
    sb = VmxSandbox("long", "here: in $0x71, %al\nhlt\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.UNCOND_IO_EXITING)
    exit = sb.run()
    assert exit.qualification == (0x71 << 16) | (1 << 6) | (1 << 3)  # immediate, IN
    assert exit.instruction_length == 2


def test_rep_outsb_qualification_and_linear_address() -> None:
    sb = VmxSandbox("long", "lea msg(%rip), %rsi\nmov $3, %rcx\nmov $0x80, %dx\nhere: rep outsb\nhlt\nmsg: .ascii \"abc\"\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.UNCOND_IO_EXITING)
    exit = sb.run()
    assert exit.qualification == (0x80 << 16) | (1 << 5) | (1 << 4)  # REP, string, OUT
    assert exit.guest_linear_address == sb.symbol("msg")


def test_all_msr_accesses_exit_seed_002() -> None:
    """"Intercept all MSR reads and writes": an all-ones MSR bitmap."""
    sb = VmxSandbox("long", "mov $0xc0000080, %ecx\nr: rdmsr\nw: wrmsr\nhlt\n")
    sb.use_msr_bitmap(all_ones=True)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.MSR_READ and sb.rip == sb.symbol("r")
    sb.skip_instruction()
    exit = sb.run()
    assert exit.exit_reason is ExitReason.MSR_WRITE and sb.rip == sb.symbol("w")


def test_only_efer_writes_exit_seed_002() -> None:
    """Only WRMSR of IA32_EFER: bit 0x80 of the write-high bitmap (byte 0xC00 + 0x80/8)."""
    sb = VmxSandbox(
        "long",
        """
        mov $0xc0000080, %ecx
        rdmsr                  # read of EFER: no exit
        mov $0xc0000081, %ecx
        xor %eax, %eax
        xor %edx, %edx
        wrmsr                  # write of STAR: no exit
        mov $0xc0000080, %ecx
        rdmsr
    w:  wrmsr                  # write of EFER: exit
        hlt
        """,
    )
    sb.use_msr_bitmap(write=[Msr.EFER])
    assert sb.memory.read8(0x6000 + 0xC00 + 0x80 // 8) == 1
    exit = sb.run()
    assert exit.exit_reason is ExitReason.MSR_WRITE
    assert sb.rip == sb.symbol("w") and sb.gpr["rcx"] == 0xC0000080


def test_only_cr0_pg_writes_exit_seed_002() -> None:
    """CR0 guest/host mask = PG only: a MOV to CR0 that changes only TS does not exit; one that
    changes PG does; MOV from CR0 returns the read shadow's PG (SDM 26.3)."""
    sb = VmxSandbox(
        "protected",
        """
        mov %cr0, %eax
        or $0x8, %eax          # set TS only
        mov %eax, %cr0
        mov %cr0, %ebx         # reads shadow PG (set) with the real TS
        or $0x80000000, %eax
        and $0x7fffffff, %eax  # PG = 0 ... (already 0 in reality)
    w:  mov %eax, %cr0         # PG differs from the shadow -> exit
        hlt
        """,
    )
    sb.write(F.CR0_GUEST_HOST_MASK, Cr0.PG)
    shadow = sb.read(F.GUEST_CR0) | Cr0.PG  # the guest believes paging is on
    sb.write(F.CR0_READ_SHADOW, shadow)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.CR_ACCESS
    assert sb.rip == sb.symbol("w")
    assert exit.qualification == (0 << 8) | (0 << 4) | 0  # CR0, MOV to CR, from EAX
    assert sb.read(F.GUEST_CR0) & Cr0.TS  # the TS write went through
    assert sb.gpr["rbx"] & Cr0.PG  # MOV from CR0 saw the shadow's PG
    assert not sb.read(F.GUEST_CR0) & Cr0.PG


def test_page_fault_exits_through_exception_bitmap_seed_002() -> None:
    """Exception bitmap bit 14: a guest #PF exits with vector 14, error code and the faulting
    linear address as the exit qualification (CR2 unchanged, SDM 26.2 / 28.2.1)."""
    sb = VmxSandbox("long", "mov $0x7ff000, %rbx\nmov $0x40000000, %rax\nhere: mov (%rax), %rcx\nhlt\n")
    sb.write(F.EXCEPTION_BITMAP, 1 << 14)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI
    assert exit.intr_info == 0x80000000 | (3 << 8) | (1 << 11) | 14
    assert exit.intr_error_code == 0  # not present, read, supervisor
    assert exit.qualification == 0x40000000
    assert sb.rip == sb.symbol("here")


@pytest.mark.parametrize("present_fault, exits", [(True, True), (False, False)])
def test_pfec_mask_match_selects_present_faults(present_fault: bool, exits: bool) -> None:
    """KVM's selective #PF trap (seed 000): mask = match = PFERR_PRESENT with bit 14 set ->
    only present (protection) faults exit; others go to the guest's IDT."""
    body = "movq $1, (%rax)\n" if present_fault else "mov (%rax), %rcx\n"
    sb = VmxSandbox(
        "long",
        f"""
        lea handler(%rip), %rax
        mov %ax, idt_pf
        shr $16, %rax
        mov %ax, idt_pf+6
        lidt idtr(%rip)
        mov $0x40000000, %rax
        {'mov $0x200000, %rax' if present_fault else ''}
    here: {body}
        hlt
    handler: mov $0xbad, %rbx
        hlt
    .align 8
    idtr: .word 0xfff
        .quad idt
    idt: .fill 14*16, 1, 0
    idt_pf: .word 0
        .word 0x18
        .byte 0, 0x8e
        .word 0
        .long 0, 0
        """,
    )
    if present_fault:  # make the 2 MiB page at 2 MiB read-only in the guest's page tables
        sb.write_memory(0x5000 + 8, (0x200000 | 0x85).to_bytes(8, "little"))
    sb.write(F.EXCEPTION_BITMAP, 1 << 14)
    sb.write(F.PAGE_FAULT_ERROR_CODE_MASK, 1)
    sb.write(F.PAGE_FAULT_ERROR_CODE_MATCH, 1)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    exit = sb.run()
    if exits:
        assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.intr_info & 0xFF == 14
        assert exit.intr_error_code & 1 == 1
    else:
        assert exit.exit_reason is ExitReason.HLT
        assert sb.gpr["rbx"] == 0xBAD  # the guest's own #PF handler ran


def test_preemption_timer_seed_002() -> None:
    """A guest spinning with interrupts off still gives control back: the VMX-preemption timer
    counts down at TSC >> IA32_VMX_MISC[4:0] and exits with reason 52 (SDM 26.5.1)."""
    sb = VmxSandbox("long", "cli\nspin: jmp spin\n")
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    sb.set_bits(F.VM_EXIT_CONTROLS, X.SAVE_VMX_PREEMPTION_TIMER)
    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, 100)
    start = sb.cpu.read_tsc()
    exit = sb.run()
    assert exit.exit_reason is ExitReason.PREEMPTION_TIMER
    elapsed = sb.cpu.read_tsc() - start
    # The timer decrements each time TSC bit 5 changes, so the first tick comes 1..32 TSC
    # cycles after entry: 100 ticks take between 99*32+1 and 100*32 cycles (SDM 25.5.1).
    assert (99 << 5) < elapsed <= (100 << 5) + 64  # plus at most one block's overshoot
    assert sb.read(F.VMX_PREEMPTION_TIMER_VALUE) == 0
    assert sb.rip == sb.symbol("spin")


def test_preemption_timer_zero_exits_before_any_instruction() -> None:
    sb = VmxSandbox("long", "first: nop\nhlt\n")
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, 0)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.PREEMPTION_TIMER
    assert sb.rip == sb.symbol("first")


def test_external_interrupt_exiting_seed_002() -> None:
    """External-interrupt exiting: an interrupt raised by the host exits with reason 1 even with
    RFLAGS.IF = 0; "acknowledge interrupt on exit" puts the vector in the exit info."""
    sb = VmxSandbox("long", "cli\nspin: jmp spin\n")
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.EXT_INTR_MASK)
    sb.set_bits(F.VM_EXIT_CONTROLS, X.ACK_INTR_ON_EXIT)
    sb.cpu.raise_interrupt(0x31, at_tsc=sb.cpu.read_tsc() + 1000)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXTERNAL_INTERRUPT
    assert exit.intr_info == 0x80000000 | 0x31
    assert len(sb.cpu.interrupts) == 0  # acknowledged


def test_interrupt_delivered_to_guest_when_if_set_seed_002() -> None:
    """Without external-interrupt exiting, the interrupt goes through the guest's IDT once
    RFLAGS.IF = 1 (the seed: open or close guest interrupts through RFLAGS in the guest state)."""
    sb = VmxSandbox(
        "long",
        """
        lea handler(%rip), %rax
        mov %ax, idt+0x31*16
        shr $16, %rax
        mov %ax, idt+0x31*16+6
        lidt idtr(%rip)
        sti
    spin: jmp spin
    handler: mov $0x31, %rbx
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
        """,
    )
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    sb.cpu.raise_interrupt(0x31, at_tsc=sb.cpu.read_tsc() + 5000)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.HLT
    assert sb.gpr["rbx"] == 0x31


def test_interrupt_window_exiting() -> None:
    """Interrupt-window exiting (SDM 26.7.5): exit 7 at the first boundary where IF=1 and no
    STI blocking -- after the instruction following STI."""
    sb = VmxSandbox("long", "cli\nnop\nsti\nshadow: nop\nopen: nop\nhlt\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.INTR_WINDOW_EXITING)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.INTERRUPT_WINDOW
    assert sb.rip == sb.symbol("open")


def test_hlt_without_exiting_wakes_on_timer_exit() -> None:
    """HLT without HLT exiting: the guest enters the HLT activity state; the preemption timer
    still counts and its exit reports activity state HLT."""
    sb = VmxSandbox("long", "hlt\nafter: nop\n")
    sb.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    sb.write(F.VMX_PREEMPTION_TIMER_VALUE, 50)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.PREEMPTION_TIMER
    assert sb.read(F.GUEST_ACTIVITY_STATE) == 1
    assert sb.rip == sb.symbol("after")
