"""Details of instruction-caused VM exits that are easy to get wrong: the exit qualification of
RIP-relative memory operands, exits that win over faults (MOV DR) and faults that win over exits
(GETSEC), the operand size of MOV to CR outside 64-bit mode, and RFLAGS.RF.

SDM references: 28.2.1 (exit qualification: the displacement, or for RIP-relative addressing the
displacement plus the RIP of the next instruction), 26.1.1 (#UD and privilege faults have
priority over VM exits), 26.1.3 "MOV DR" (its VM exit has priority over the CPL #GP and the
CR4.DE #UD), 26.1.2 "GETSEC", Vol. 2B MOV (control registers: 32-bit operands outside 64-bit
mode), 18.3.1.1 (faults push RF = 1), 28.3.3 (the RF a VM exit saves).
"""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4
from pyvmx.guest.sandbox import VmxSandbox

pytestmark = pytest.mark.machine

RF = 1 << 16


def _descriptor_table_exiting(sb: VmxSandbox) -> None:
    sb.set_bits(F.SECONDARY_VM_EXEC_CONTROL, S.DESC)


def test_lgdt_rip_relative_qualification_is_the_operand_address() -> None:
    """SDM 28.2.1: for RIP-relative addressing the exit qualification is the displacement plus
    the RIP of the next instruction -- the operand's address, not the raw displacement."""
    sb = VmxSandbox("long", "here: lgdt gdtr(%rip)\nhlt\n.align 8\ngdtr: .word 0x2f\n.quad 0x1000\n")
    _descriptor_table_exiting(sb)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.GDTR_IDTR
    assert sb.rip == sb.symbol("here") and exit.instruction_length == 7
    assert exit.qualification == sb.symbol("gdtr")


def test_sidt_base_displacement_qualification_is_the_displacement() -> None:
    """SDM 28.2.1: otherwise the displacement, sign-extended to 64 bits."""
    sb = VmxSandbox("long", "mov $0x9000, %rbx\nsidt -0x10(%rbx)\nhlt\n")
    _descriptor_table_exiting(sb)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.GDTR_IDTR
    assert exit.qualification == 0xFFFFFFFFFFFFFFF0


def test_vmptrld_rip_relative_qualification() -> None:
    """VMX instructions exit unconditionally (SDM 26.1.2) and report their operand the same way."""
    sb = VmxSandbox("long", "here: vmptrld ptr(%rip)\nhlt\n.align 8\nptr: .quad 0x5000\n")
    exit = sb.run()
    assert exit.exit_reason is ExitReason.VMPTRLD
    assert exit.qualification == sb.symbol("ptr")


def _user_mode(sb: VmxSandbox) -> None:
    """CPL 3: CS and SS with DPL 3 (the guest-state checks of SDM 27.3.1.2 accept them)."""
    sb.set_segment("CS", 0x1B, 0, 0xFFFFFFFF, 0xA0FB)
    sb.set_segment("SS", 0x13, 0, 0xFFFFFFFF, 0xC0F3)


def test_mov_dr_exit_has_priority_over_the_cpl_gp() -> None:
    """SDM 26.1.3 MOV DR: with MOV-DR exiting, MOV DR at CPL 3 exits (reason 29) instead of
    raising #GP(0) -- an exception to the rule of SDM 26.1.1."""
    sb = VmxSandbox("long", "here: mov %dr7, %rax\nhlt\n")
    _user_mode(sb)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MOV_DR_EXITING)
    sb.write(F.EXCEPTION_BITMAP, 1 << 13)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.DR_ACCESS
    assert exit.qualification == 7 | (1 << 4)  # DR7, MOV from DR, RAX (SDM Table 28-4)
    assert sb.rip == sb.symbol("here")


def test_mov_dr_at_cpl3_without_exiting_is_gp() -> None:
    sb = VmxSandbox("long", "here: mov %dr7, %rax\nhlt\n")
    _user_mode(sb)
    sb.write(F.EXCEPTION_BITMAP, 1 << 13)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI
    assert exit.intr_info & 0xFF == 13 and exit.intr_error_code == 0
    assert sb.rip == sb.symbol("here")


def test_privileged_instruction_at_cpl3_faults_before_its_exit() -> None:
    """SDM 26.1.1: a privilege-based #GP has priority over the HLT-exiting VM exit."""
    sb = VmxSandbox("long", "here: hlt\n")
    _user_mode(sb)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    sb.write(F.EXCEPTION_BITMAP, 1 << 13)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.intr_info & 0xFF == 13


def test_mov_dr4_exit_has_priority_over_the_cr4_de_ud() -> None:
    """SDM 26.1.3 MOV DR: the exit also beats the #UD for DR4/DR5 when CR4.DE = 1."""
    sb = VmxSandbox("long", "here: .byte 0x0f, 0x21, 0xe0\nhlt\n")  # mov %dr4, %rax
    sb.write(F.GUEST_CR4, sb.read(F.GUEST_CR4) | Cr4.DE)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MOV_DR_EXITING)
    sb.write(F.EXCEPTION_BITMAP, 1 << 6)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.DR_ACCESS
    assert exit.qualification & 7 == 4


def test_getsec_with_cr4_smxe_clear_is_ud_not_an_exit() -> None:
    """SDM 26.1.2 lists GETSEC as an unconditional exit, but with CR4.SMXE = 0 GETSEC raises
    #UD, which has priority over the VM exit (SDM 26.1.1)."""
    sb = VmxSandbox("long", "here: getsec\nhlt\n")
    sb.write(F.EXCEPTION_BITMAP, 1 << 6)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI
    assert exit.intr_info & 0xFF == 6
    assert sb.rip == sb.symbol("here")


def test_mov_to_cr0_uses_32_bits_of_the_register_outside_64_bit_mode() -> None:
    """MOV to CR0 in 32-bit code takes EBX: bits 63:32 of RBX (left there by the hypervisor,
    the VMCS does not hold GPRs) neither cause a VM exit under the CR0 guest/host mask nor make
    the write fault (SDM Vol. 2B MOV, 26.1.3 "MOV to CR0")."""
    sb = VmxSandbox("protected", "mov %cr0, %eax\nmov %eax, %ebx\nwrite: mov %ebx, %cr0\ndone: hlt\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    cr0 = sb.read(F.GUEST_CR0)
    sb.write(F.CR0_GUEST_HOST_MASK, 0xFFFFFFFF_00000000 | Cr0.PG)
    sb.write(F.CR0_READ_SHADOW, cr0)
    sb.write(F.EXCEPTION_BITMAP, 1 << 13)
    sb.gpr["rbx"] = 0xDEAD_BEEF_0000_0000
    sb.gpr["rax"] = 0xDEAD_BEEF_0000_0000
    exit = sb.run()
    assert exit.exit_reason is ExitReason.HLT
    assert sb.rip == sb.symbol("done")
    assert sb.read(F.GUEST_CR0) == cr0


def test_mov_to_cr0_qualification_reports_the_gpr() -> None:
    """A MOV to CR0 that changes a host-owned bit exits with the GPR number (SDM Table 28-3)."""
    sb = VmxSandbox("protected", "mov %cr0, %ebx\nor $0x80000000, %ebx\nw: mov %ebx, %cr0\nhlt\n")
    sb.write(F.CR0_GUEST_HOST_MASK, Cr0.PG)
    sb.write(F.CR0_READ_SHADOW, sb.read(F.GUEST_CR0))
    exit = sb.run()
    assert exit.exit_reason is ExitReason.CR_ACCESS
    assert exit.qualification == (3 << 8)  # CR0, MOV to CR, RBX
    assert sb.rip == sb.symbol("w")


# --- RFLAGS.RF --------------------------------------------------------------------------------------
IDT_UD = """
    lea handler(%rip), %rax
    mov %ax, idt+6*16
    shr $16, %rax
    mov %ax, idt+6*16+6
    lidt idtr(%rip)
fault: ud2
handler: mov 16(%rsp), %rbx     # the RFLAGS image the #UD pushed
    pushfq
    pop %rcx                    # RFLAGS in the handler
    hlt
.align 8
idtr: .word 0xfff
    .quad idt
.align 16
idt: .fill 6*16, 1, 0
    .word 0, 0x18
    .byte 0, 0x8e
    .word 0
    .long 0, 0
"""


def test_a_fault_delivered_to_the_guest_pushes_rf_1() -> None:
    """SDM 18.3.1.1: for a fault-class exception the RFLAGS image pushed has RF = 1; the
    handler itself runs with RF = 0 (SDM 6.12.1)."""
    sb = VmxSandbox("long", IDT_UD)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    assert sb.run().exit_reason is ExitReason.HLT
    assert sb.gpr["rbx"] & RF
    assert not sb.gpr["rcx"] & RF


def test_exception_bitmap_exit_for_a_fault_saves_rf_1() -> None:
    """SDM 28.3.3: a VM exit caused directly by a fault saves the RF it would have pushed: 1."""
    sb = VmxSandbox("long", "here: ud2\n")
    sb.write(F.EXCEPTION_BITMAP, 1 << 6)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.intr_info & 0xFF == 6
    assert sb.read(F.GUEST_RFLAGS) & RF


def test_int3_exit_saves_rf_0() -> None:
    """INT3 is a software exception (a trap): RF pushed -- and saved by its exit -- is 0."""
    sb = VmxSandbox("long", "here: int3\n")
    sb.write(F.EXCEPTION_BITMAP, 1 << 3)
    sb.write(F.GUEST_RFLAGS, 0x2 | RF)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EXCEPTION_NMI and exit.intr_info & 0xFF == 3
    assert exit.instruction_length == 1
    assert not sb.read(F.GUEST_RFLAGS) & RF


def test_instruction_exit_saves_rf_0() -> None:
    """SDM 28.3.3: a VM exit caused by an instruction saves RF = 0, even when the guest entered
    with RF = 1 right at that instruction."""
    sb = VmxSandbox("long", "here: cpuid\nhlt\n")
    sb.write(F.GUEST_RFLAGS, 0x2 | RF)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.CPUID and sb.rip == sb.symbol("here")
    assert not sb.read(F.GUEST_RFLAGS) & RF


def test_ept_violation_outside_event_delivery_saves_rf_1() -> None:
    """SDM 28.3.3: an EPT violation that did not occur during event delivery saves RF = 1 (the
    access is restarted)."""
    sb = VmxSandbox("long", "mov $0x300000, %rax\nhere: mov (%rax), %rbx\nhlt\n")
    sb.ept_unmap(0x300000, 0x1000)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.EPT_VIOLATION and sb.rip == sb.symbol("here")
    assert exit.idt_vectoring_info == 0
    assert sb.read(F.GUEST_RFLAGS) & RF


def test_mov_dr_exit_wins_at_cpl3_for_code_first_run_at_cpl0() -> None:
    """The same MOV DR first runs at CPL 0 (no exiting: it executes), then at CPL 3 with
    MOV-DR exiting: the exit still has priority over the #GP (SDM 26.1.3), however the code
    was seen before."""
    sb = VmxSandbox("long", "here: mov %dr7, %rax\nnext: hlt\n")
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.HLT_EXITING)
    assert sb.run().exit_reason is ExitReason.HLT and sb.rip == sb.symbol("next")
    sb.write(F.GUEST_RIP, sb.symbol("here"))
    _user_mode(sb)
    sb.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MOV_DR_EXITING)
    sb.write(F.EXCEPTION_BITMAP, 1 << 13)
    exit = sb.run()
    assert exit.exit_reason is ExitReason.DR_ACCESS
    assert sb.rip == sb.symbol("here")
