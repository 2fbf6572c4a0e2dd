"""Exit handlers fed made-up exits on a vCPU whose processor has no CPU engine (nothing runs):
each handler is a plain function of (vCPU, VmExitInfo), as cloud-hypervisor's handlers are
testable. Linux references: arch/x86/kvm/vmx/vmx.c kvm_vmx_exit_handlers[], x86.c."""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import INTR_INFO_DELIVER_CODE_MASK, INTR_INFO_VALID_MASK, GuestInterruptibility, VmEntryControls
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4, Efer, ExceptionVector
from pyvmx.kvm import exit_handlers as h
from pyvmx.kvm.boot import setup_long_mode, setup_protected_mode
from pyvmx.kvm.cpuid import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, CpuidEntry, CpuidTable
from pyvmx.kvm.exits import DebugExit, Halt, InternalError, IoDirection, IoExit, Reschedule, Resume, ShutdownExit
from pyvmx.kvm.hypercalls import KVM_ENOSYS, KVM_HC_VAPIC_POLL_IRQ, PYVMX_HC_EXIT, PYVMX_HC_PUTCHAR
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.vcpu import Vcpu
from pyvmx.vmx.outcomes import VmExitInfo

RIP = 0x10000


@pytest.fixture
def vcpu() -> Vcpu:
    kvm = Kvm(engine=False)
    vm = kvm.create_vm(memory_size=4 << 20)
    v = vm.create_vcpu()
    setup_long_mode(v, RIP)
    return v


def exit_of(reason: ExitReason, length: int = 0, **fields: int) -> VmExitInfo:
    return VmExitInfo(reason=int(reason), instruction_length=length, **fields)


def test_cpuid_uses_the_table_and_skips(vcpu: Vcpu) -> None:
    """kvm_emulate_cpuid(): EAX/ECX in, the table's registers out, RIP += 2."""
    vcpu.set_gpr("rax", 0x40000000)
    outcome = h.handle_exit(vcpu, exit_of(ExitReason.CPUID, 2))
    assert isinstance(outcome, Resume)
    sig = b"".join(vcpu.get_gpr(r).to_bytes(4, "little") for r in ("rbx", "rcx", "rdx"))
    assert sig == b"KVMKVMKVM\0\0\0" and vcpu.rip == RIP + 2
    assert vcpu.stats.exits == {"CPUID": 1}


def test_cpuid_osxsave_follows_cr4(vcpu: Vcpu) -> None:
    """kvm_update_cpuid_runtime(): CPUID.1:ECX.OSXSAVE mirrors CR4.OSXSAVE."""
    vcpu.set_gpr("rax", 1)
    h.handle_exit(vcpu, exit_of(ExitReason.CPUID, 2))
    assert not vcpu.get_gpr("rcx") & (1 << 27)
    vcpu.vmcs_write(F.CR4_READ_SHADOW, vcpu.vmcs_read(F.CR4_READ_SHADOW) | Cr4.OSXSAVE)
    vcpu.set_gpr("rax", 1)
    h.handle_exit(vcpu, exit_of(ExitReason.CPUID, 2))
    assert vcpu.get_gpr("rcx") & (1 << 27)


def test_rdmsr_wrmsr_known_and_unknown(vcpu: Vcpu) -> None:
    """kvm_emulate_rdmsr/wrmsr(): EDX:EAX; an unknown MSR injects #GP(0) and RIP stays."""
    vcpu.set_gpr("rcx", Msr.LSTAR)
    vcpu.set_gpr("rax", 0x81000000)
    vcpu.set_gpr("rdx", 0xFFFFFFFF)
    assert isinstance(h.handle_exit(vcpu, exit_of(ExitReason.MSR_WRITE, 2)), Resume)
    assert vcpu.rip == RIP + 2
    h.handle_exit(vcpu, exit_of(ExitReason.MSR_READ, 2))
    assert (vcpu.get_gpr("rdx"), vcpu.get_gpr("rax")) == (0xFFFFFFFF, 0x81000000)
    vcpu.set_gpr("rcx", 0x12345678)
    before = vcpu.rip
    h.handle_exit(vcpu, exit_of(ExitReason.MSR_READ, 2))
    assert vcpu.rip == before
    assert vcpu.exception is not None and vcpu.exception.vector == ExceptionVector.GP and vcpu.exception.error_code == 0


def test_wrmsr_noncanonical_lstar_and_reserved_efer_fault(vcpu: Vcpu) -> None:
    """kvm_set_msr_common(): non-canonical LSTAR and EFER reserved bits are #GP."""
    assert not vcpu.msrs.set(Msr.LSTAR, 0x0000800000000000)
    assert not vcpu.msrs.set(Msr.EFER, 1 << 20)
    assert vcpu.msrs.set(Msr.EFER, Efer.SCE | Efer.LME | Efer.NX)
    assert vcpu.vmcs_read(F.GUEST_IA32_EFER) & Efer.LMA  # LMA is kept, not writable


def test_mov_to_cr0_pg_with_lme_activates_long_mode(vcpu: Vcpu) -> None:
    """handle_cr() -> kvm_set_cr0() -> vmx_set_cr0() -> enter_lmode(): EFER.LMA and the
    "IA-32e mode guest" entry control follow CR0.PG when EFER.LME is set (SDM 10.8.5)."""
    setup_protected_mode(vcpu, RIP)
    vcpu.vmcs_write(F.CR4_READ_SHADOW, Cr4.PAE)
    vcpu.set_efer(int(Efer.LME))
    vcpu.set_gpr("rax", Cr0.PE | Cr0.ET | Cr0.NE | Cr0.PG)
    outcome = h.handle_exit(vcpu, exit_of(ExitReason.CR_ACCESS, 3, qualification=0))  # MOV CR0 <- EAX
    assert isinstance(outcome, Resume) and vcpu.rip == RIP + 3
    assert vcpu.vmcs_read(F.GUEST_IA32_EFER) & Efer.LMA
    assert vcpu.vmcs_read(F.VM_ENTRY_CONTROLS) & VmEntryControls.IA32E_MODE
    assert vcpu.vmcs_read(F.GUEST_TR_AR_BYTES) & 0xF == 11  # busy 64-bit TSS
    # and back: clearing PG leaves IA-32e mode
    vcpu.set_gpr("rax", Cr0.PE | Cr0.ET | Cr0.NE)
    vcpu.vmcs_write(F.GUEST_CS_AR_BYTES, vcpu.vmcs_read(F.GUEST_CS_AR_BYTES) & ~(1 << 13))
    h.handle_exit(vcpu, exit_of(ExitReason.CR_ACCESS, 3, qualification=0))
    assert not vcpu.vmcs_read(F.VM_ENTRY_CONTROLS) & VmEntryControls.IA32E_MODE


def test_mov_to_cr0_pg_without_pae_is_gp(vcpu: Vcpu) -> None:
    """kvm_set_cr0(): PG with EFER.LME but CR4.PAE clear -> #GP(0), RIP unchanged."""
    setup_protected_mode(vcpu, RIP)
    vcpu.set_efer(int(Efer.LME))
    vcpu.set_gpr("rbx", Cr0.PE | Cr0.PG)
    h.handle_exit(vcpu, exit_of(ExitReason.CR_ACCESS, 3, qualification=3 << 8))  # from RBX
    assert vcpu.rip == RIP and vcpu.exception is not None and vcpu.exception.vector == 13


def test_cr4_vmxe_is_refused_and_read_shadow_kept(vcpu: Vcpu) -> None:
    """kvm_set_cr4(): no nested VMX, CR4.VMXE is reserved for the guest; the guest keeps
    reading CR4 without VMXE."""
    vcpu.set_gpr("rax", Cr4.PAE | Cr4.VMXE)
    h.handle_exit(vcpu, exit_of(ExitReason.CR_ACCESS, 3, qualification=4))
    assert vcpu.exception is not None and vcpu.exception.vector == 13
    assert not vcpu.vmcs_read(F.CR4_READ_SHADOW) & Cr4.VMXE


def test_clts_lmsw_and_cr8(vcpu: Vcpu) -> None:
    """CLTS clears TS; LMSW cannot clear PE; MOV to/from CR8 is the TPR (SDM 28.2.1 Table 28-3)."""
    vcpu.vmcs_write(F.CR0_READ_SHADOW, vcpu.vmcs_read(F.CR0_READ_SHADOW) | Cr0.TS)
    h.handle_exit(vcpu, exit_of(ExitReason.CR_ACCESS, 2, qualification=2 << 4))
    assert not vcpu.get_sregs().cr0 & Cr0.TS
    h.handle_exit(vcpu, exit_of(ExitReason.CR_ACCESS, 3, qualification=(3 << 4) | (0x0 << 16)))
    assert vcpu.get_sregs().cr0 & Cr0.PE
    vcpu.set_gpr("rdx", 7)
    h.handle_exit(vcpu, exit_of(ExitReason.CR_ACCESS, 4, qualification=8 | (2 << 8)))
    h.handle_exit(vcpu, exit_of(ExitReason.CR_ACCESS, 4, qualification=8 | (1 << 4) | (6 << 8)))
    assert vcpu.cr8 == 7 and vcpu.get_gpr("rsi") == 7


def test_hlt_skips_and_halts(vcpu: Vcpu) -> None:
    """kvm_emulate_halt(): RIP past HLT and the STI shadow cleared, then the vCPU is halted."""
    vcpu.vmcs_write(F.GUEST_INTERRUPTIBILITY_INFO, GuestInterruptibility.STI)
    vcpu.vmcs_write(F.GUEST_RFLAGS, 0x202)
    assert isinstance(h.handle_exit(vcpu, exit_of(ExitReason.HLT, 1)), Halt)
    assert vcpu.rip == RIP + 1 and vcpu.vmcs_read(F.GUEST_INTERRUPTIBILITY_INFO) == 0


def test_out_to_serial_and_debug_exit(vcpu: Vcpu) -> None:
    """handle_io() OUT: a device on the bus takes it; the debug-exit port ends the run."""
    vcpu.set_gpr("rax", ord("A"))
    h.handle_exit(vcpu, exit_of(ExitReason.IO_INSTRUCTION, 1, qualification=0x3F8 << 16))
    assert vcpu.vm.serial_output == b"A" and vcpu.rip == RIP + 1
    vcpu.set_gpr("rax", 0x2A)
    outcome = h.handle_exit(vcpu, exit_of(ExitReason.IO_INSTRUCTION, 2, qualification=(0xF4 << 16) | (1 << 6)))
    assert outcome == DebugExit(0x2A)


def test_in_from_unclaimed_port_goes_to_the_user_and_completes(vcpu: Vcpu) -> None:
    """KVM_EXIT_IO for IN: the user's data lands in AX on the next run (complete_fast_pio_in())."""
    vcpu.set_gpr("rax", 0xFFFF_FFFF_1234_5678)
    outcome = h.handle_exit(vcpu, exit_of(ExitReason.IO_INSTRUCTION, 1, qualification=(0x510 << 16) | 8 | 1))
    assert isinstance(outcome, IoExit) and outcome.direction is IoDirection.IN and outcome.port == 0x510
    assert vcpu.rip == RIP  # not before the data is there
    outcome.value = 0xBEEF
    assert vcpu.complete_userspace_io is not None and vcpu.complete_userspace_io() is None
    assert vcpu.get_gpr("rax") == 0xFFFF_FFFF_1234_BEEF and vcpu.rip == RIP + 1


def test_hypercalls(vcpu: Vcpu) -> None:
    """kvm_emulate_hypercall(): number in RAX, result in RAX, -KVM_ENOSYS for unknown ones."""
    for nr, a0, expect in ((PYVMX_HC_PUTCHAR, ord("x"), 0), (KVM_HC_VAPIC_POLL_IRQ, 0, 0), (0x777, 0, -KVM_ENOSYS)):
        vcpu.set_gpr("rax", nr)
        vcpu.set_gpr("rbx", a0)
        h.handle_exit(vcpu, exit_of(ExitReason.VMCALL, 3))
        assert vcpu.get_gpr("rax") == expect & (2**64 - 1)
    assert vcpu.vm.hypercall_output == b"x"
    vcpu.set_gpr("rax", PYVMX_HC_EXIT)
    vcpu.set_gpr("rbx", 3)
    assert h.handle_exit(vcpu, exit_of(ExitReason.VMCALL, 3)) == DebugExit(3, via="hypercall")


def test_xsetbv_checks(vcpu: Vcpu) -> None:
    """__kvm_set_xcr(): XCR0 must keep x87, may not enable AVX (not offered)."""
    vcpu.set_gpr("rcx", 0)
    vcpu.set_gpr("rdx", 0)
    vcpu.set_gpr("rax", 0b11)
    h.handle_exit(vcpu, exit_of(ExitReason.XSETBV, 3))
    assert vcpu.xcr0 == 0b11 and vcpu.exception is None
    vcpu.set_gpr("rax", 0b111)
    h.handle_exit(vcpu, exit_of(ExitReason.XSETBV, 3))
    assert vcpu.exception is not None and vcpu.exception.vector == 13


@pytest.mark.parametrize(
    ("xcr0", "accepted"),
    [(0x1F, True), (0x0F, False), (0x17, False), (0xE7, True), (0x27, False), (0x67, False), (0xE3, False), (0x2F, False)],
)
def test_xsetbv_component_pairs(vcpu: Vcpu, xcr0: int, accepted: bool) -> None:
    """__kvm_set_xcr() with a CPUID leaf 0DH offering MPX and AVX-512 (SDM Vol. 2C XSETBV,
    13.3): BNDREGS and BNDCSR together or not at all; the three AVX-512 components together and
    only with AVX; a rejected value is #GP(0) and leaves XCR0 alone."""
    entries = [e for e in vcpu.cpuid.entries if (e.function, e.index) != (0xD, 0)]
    entries.append(CpuidEntry(0xD, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, eax=0xFF, ebx=0xA80, ecx=0xA80))
    vcpu.set_cpuid(CpuidTable(entries))
    vcpu.set_gpr("rcx", 0)
    vcpu.set_gpr("rdx", 0)
    vcpu.set_gpr("rax", xcr0)
    h.handle_exit(vcpu, exit_of(ExitReason.XSETBV, 3))
    assert (vcpu.exception is None) is accepted
    assert vcpu.xcr0 == (xcr0 if accepted else 1)


@pytest.mark.parametrize("reason", [ExitReason.VMXON, ExitReason.VMPTRLD, ExitReason.INVEPT, ExitReason.VMRESUME])
def test_vmx_instructions_get_ud(vcpu: Vcpu, reason: ExitReason) -> None:
    """handle_vmx_instruction() without nested VMX: #UD."""
    h.handle_exit(vcpu, exit_of(reason, 3))
    assert vcpu.exception is not None and vcpu.exception.vector == ExceptionVector.UD and vcpu.rip == RIP


def test_pause_yields_and_preemption_timer(vcpu: Vcpu) -> None:
    """handle_pause() yields the CPU (kvm_vcpu_on_spin()); handle_preemption_timer() resumes unless the vCPU's own slice expired (SDM 26.5.1)."""
    assert h.handle_exit(vcpu, exit_of(ExitReason.PAUSE_INSTRUCTION, 2)) == Reschedule("pause")
    assert isinstance(h.handle_exit(vcpu, exit_of(ExitReason.PREEMPTION_TIMER)), Resume)
    vcpu.set_preemption_timer(1000)
    assert isinstance(h.handle_exit(vcpu, exit_of(ExitReason.PREEMPTION_TIMER)), Reschedule)


def test_triple_fault_and_interrupt_window(vcpu: Vcpu) -> None:
    """handle_triple_fault() is KVM_EXIT_SHUTDOWN; handle_interrupt_window() clears interrupt-window exiting (SDM 25.6.2, 26.7.5)."""
    assert isinstance(h.handle_exit(vcpu, exit_of(ExitReason.TRIPLE_FAULT)), ShutdownExit)
    vcpu.vmcs_set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.INTR_WINDOW_EXITING)
    h.handle_exit(vcpu, exit_of(ExitReason.INTERRUPT_WINDOW))
    assert not vcpu.vmcs_read(F.CPU_BASED_VM_EXEC_CONTROL) & C.INTR_WINDOW_EXITING


def test_page_fault_reflected_with_cr2(vcpu: Vcpu) -> None:
    """An intercepted #PF (seed 002) goes back to the guest with CR2 = the exit qualification."""
    vcpu.intercept_exception(ExceptionVector.PF)
    info = INTR_INFO_VALID_MASK | INTR_INFO_DELIVER_CODE_MASK | (3 << 8) | 14
    h.handle_exit(vcpu, exit_of(ExitReason.EXCEPTION_NMI, qualification=0xDEAD000, intr_info=info, intr_error_code=2))
    ev = vcpu.exception
    assert ev is not None and (ev.vector, ev.error_code, ev.cr2) == (14, 2, 0xDEAD000)


def test_breakpoint_goes_to_the_user_when_guest_debugging(vcpu: Vcpu) -> None:
    """KVM_GUESTDBG_USE_SW_BP: #BP -> KVM_EXIT_DEBUG; otherwise reflected with its length."""
    info = INTR_INFO_VALID_MASK | (6 << 8) | 3
    h.handle_exit(vcpu, exit_of(ExitReason.EXCEPTION_NMI, 1, intr_info=info))
    assert vcpu.exception is not None and vcpu.exception.instruction_len == 1
    vcpu.exception = None
    vcpu.set_guest_debug(0x1 | 0x10000)
    assert vcpu.vmcs_read(F.EXCEPTION_BITMAP) & (1 << 3)
    outcome = h.handle_exit(vcpu, exit_of(ExitReason.EXCEPTION_NMI, 1, intr_info=info))
    assert type(outcome).__name__ == "GuestDebugExit"


def test_ept_violation_maps_guest_ram(vcpu: Vcpu) -> None:
    """handle_ept_violation() -> kvm_mmu_page_fault(): RAM is mapped (FIXED), the guest resumes."""
    outcome = h.handle_exit(vcpu, exit_of(ExitReason.EPT_VIOLATION, qualification=0x181 | 0x4, guest_physical_address=0x10000))
    assert isinstance(outcome, Resume) and "fixed" in outcome.note
    assert vcpu.vm.mmu.stats["pf_fixed"] == 1


def test_unexpected_exit_dumps_the_vmcs(vcpu: Vcpu) -> None:
    """unexpected_vmexit: KVM_EXIT_INTERNAL_ERROR, suberror 4, with dump_vmcs()."""
    outcome = h.handle_exit(vcpu, exit_of(ExitReason.GETSEC, 3))
    assert isinstance(outcome, InternalError) and outcome.suberror == 4
    assert "*** Guest State ***" in outcome.dump and "GUEST_RIP" in outcome.dump and "*** Host State ***" in outcome.dump


def test_exit_during_event_delivery_is_an_internal_error(vcpu: Vcpu) -> None:
    """__vmx_handle_exit(): only a few exits may come with valid IDT-vectoring information."""
    outcome = h.handle_exit(vcpu, exit_of(ExitReason.CPUID, 2, idt_vectoring_info=INTR_INFO_VALID_MASK | 0x20))
    assert isinstance(outcome, InternalError) and outcome.suberror == 3


def test_tracer_sees_every_exit(vcpu: Vcpu) -> None:
    """The kvm_exit tracepoint's information for each exit, through the vCPU's tracer callback (Linux arch/x86/kvm/trace.h)."""
    seen = []
    vcpu.tracer = seen.append
    h.handle_exit(vcpu, exit_of(ExitReason.CPUID, 2))
    assert seen[0].reason_name == "CPUID" and seen[0].rip == RIP and isinstance(seen[0].outcome, Resume)
