"""The VM-exit handlers: one table indexed by basic exit reason, like Linux's
``kvm_vmx_exit_handlers[]`` (arch/x86/kvm/vmx/vmx.c), with ``__vmx_handle_exit()``'s checks
before dispatch and its "unexpected exit" path.

A handler is a plain function ``handler(vcpu, exit) -> outcome``: ``exit`` is the
:class:`~pyvmx.vmx.outcomes.VmExitInfo` the processor returned, the vCPU gives access to the
VMCS and registers. Tests call handlers with made-up exits on a vCPU whose processor has no CPU
engine. The outcome is :class:`Resume` (handled; re-enter), :class:`Halt`,
:class:`Reschedule`, or a :class:`VcpuExit` for the user -- never a 1/0/-errno.

Completed instructions advance RIP by the VM-exit instruction length
(``Vcpu.skip_instruction``); faults go back to the guest as queued exceptions
(``Vcpu.queue_exception``), injected at the next VM entry.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING

from pyvmx.arch.controls import (
    INTR_INFO_DELIVER_CODE_MASK,
    INTR_INFO_VALID_MASK,
    GuestInterruptibility,
    InterruptionType,
)
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.qualifications import (
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
    EPT_VIOLATION_NMI_UNBLOCKING,
)
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import DR6_BS, Cr4, ExceptionVector, PageFaultErrorCode, Rflags
from pyvmx.kvm import cr_emulate, host_time
from pyvmx.kvm.cpuid import (
    CPUID_1_ECX_OSXSAVE,
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_BNDCSR,
    XFEATURE_MASK_BNDREGS,
    XFEATURE_MASK_FP,
    XFEATURE_MASK_SSE,
    XFEATURE_MASK_YMM,
)
from pyvmx.kvm.events import software_exception
from pyvmx.kvm.exits import (
    KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
    DebugExit,
    GuestDebugExit,
    Halt,
    HandlerOutcome,
    InternalError,
    IoDirection,
    IoExit,
    PageTrackExit,
    Reschedule,
    Resume,
    ShutdownExit,
    VcpuExit,
)
from pyvmx.kvm.guest_memory import GuestMemory, GuestMemoryError, PagingState, translate
from pyvmx.kvm.host_mm import HostMemoryError
from pyvmx.kvm.hypercalls import kvm_emulate_hypercall
from pyvmx.kvm.kvm import LOCAL_TIMER_VECTOR
from pyvmx.kvm.mmio import emulate_mmio
from pyvmx.kvm.phys_access import read_phys, write_phys
from pyvmx.kvm.mmu import RetPf, ept_violation_error_code
from pyvmx.kvm.vmcs_setup import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP
from pyvmx.vmx.delivery import shutdown_chain_text
from pyvmx.vmx.faults import X86Fault
from pyvmx.vmx.outcomes import VmExitInfo
from pyvmx.vmx.paging import Access

if TYPE_CHECKING:
    from pyvmx.kvm.vcpu import Vcpu
    from pyvmx.kvm.vm import Vm

ExitHandler = Callable[["Vcpu", VmExitInfo], HandlerOutcome]
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
PAGE_SIZE = 4096
MAX_STRING_IO_ELEMENTS = 4096


# =================================================================================================
# Exceptions and NMIs (handle_exception_nmi)
# =================================================================================================
def _exception_error_code(exit: VmExitInfo) -> int | None:
    return exit.intr_error_code if exit.intr_info & INTR_INFO_DELIVER_CODE_MASK else None


def kvm_fixup_and_inject_pf_error(vcpu: Vcpu, gva: int, error_code: int) -> Resume:
    """``kvm_fixup_and_inject_pf_error()``: an intercepted present #PF with EPT (guest MAXPHYADDR
    smaller than the host's). Walk the guest page tables with the guest's MAXPHYADDR: a fault
    found there (e.g. PFERR_RSVD for a bit above it) is injected; else the processor's #PF."""
    access = Access.WRITE if error_code & PageFaultErrorCode.WRITE else Access.FETCH if error_code & PageFaultErrorCode.FETCH else Access.READ
    fault_code = error_code
    if error_code & PageFaultErrorCode.PRESENT:
        try:
            translate(vcpu.vm.memory, gva, access, vcpu.paging_state())
        except X86Fault as fault:
            fault_code = fault.error_code or 0
        except GuestMemoryError:
            pass
    vcpu.queue_exception(int(ExceptionVector.PF), fault_code, cr2=gva)
    vcpu.vm.mmu.account_guest_page_fault()
    return Resume(f"#PF({fault_code:#x}) at {gva:#x} injected")


def handle_exception_nmi(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_exception_nmi()``: NMIs and #MC are the host's; #UD, #AC and the exceptions a
    user asked to intercept go back to the guest; #PF with EPT is KVM's MAXPHYADDR fix-up or a
    reflection; #DB/#BP go to the user when guest debugging wants them."""
    info = exit.intr_info
    kind = InterruptionType((info >> 8) & 7)
    vector = info & 0xFF
    if kind is InterruptionType.NMI_INTR:
        return Resume("host NMI")
    if vector == ExceptionVector.MC:
        return Resume("machine check (host)")
    error_code = _exception_error_code(exit)
    vectoring = exit.idt_vectoring_info & INTR_INFO_VALID_MASK
    if vectoring and not (vector == ExceptionVector.PF and not (error_code or 0) & PageFaultErrorCode.RSVD):
        return InternalError(KVM_INTERNAL_ERROR_SIMUL_EX, f"exception {vector} during delivery of another event",
                             exit.reason, vcpu.dump_vmcs())
    if vector == ExceptionVector.UD:
        vcpu.queue_exception(int(ExceptionVector.UD))
        return Resume("#UD reflected")
    if vector == ExceptionVector.PF:
        cr2 = exit.qualification
        if vcpu.extra_exceptions & (1 << ExceptionVector.PF):
            vcpu.queue_exception(int(ExceptionVector.PF), error_code or 0, cr2=cr2)
            vcpu.vm.mmu.account_guest_page_fault()
            return Resume(f"#PF({error_code or 0:#x}) at {cr2:#x} reflected")
        return kvm_fixup_and_inject_pf_error(vcpu, cr2, error_code or 0)
    debug = vcpu.guest_debug
    if vector == ExceptionVector.DB:
        # The user's single step is the monitor trap flag (Vcpu.set_guest_debug): a #DB is the
        # guest's own unless the user's debugger uses the debug registers.
        if debug & KVM_GUESTDBG_ENABLE and debug & KVM_GUESTDBG_USE_HW_BP:
            return GuestDebugExit(vector, vcpu.vmcs_read(F.GUEST_RIP), exit.qualification)
        intr = vcpu.vmcs_read(F.GUEST_INTERRUPTIBILITY_INFO)
        if kind is InterruptionType.PRIV_SW_EXCEPTION:
            vcpu.skip_instruction()  # INT1 (ICEBP): a trap after the instruction
        elif vcpu.vmcs_read(F.GUEST_RFLAGS) & Rflags.TF and intr & (GuestInterruptibility.STI | GuestInterruptibility.MOV_SS):
            vcpu.vmcs_set_bits(F.GUEST_PENDING_DBG_EXCEPTIONS, 1 << 14)
        vcpu.queue_exception(int(ExceptionVector.DB))
        return Resume("#DB reflected")
    if vector == ExceptionVector.BP:
        if debug & KVM_GUESTDBG_ENABLE and debug & KVM_GUESTDBG_USE_SW_BP:
            return GuestDebugExit(vector, vcpu.vmcs_read(F.GUEST_RIP))
        vcpu.queue_event(software_exception(vector, exit.instruction_length))
        return Resume("#BP reflected")
    if kind in (InterruptionType.SOFT_EXCEPTION, InterruptionType.PRIV_SW_EXCEPTION):
        vcpu.queue_event(software_exception(vector, exit.instruction_length))
    else:
        vcpu.queue_exception(vector, error_code)
    return Resume(f"exception {vector} reflected")


def handle_external_interrupt(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_external_interrupt()``: the host took its interrupt (acknowledged on exit, SDM
    25.7.1); the host's timer ends a time slice or a deadline."""
    vector = exit.intr_info & 0xFF if exit.intr_info & INTR_INFO_VALID_MASK else -1
    if vector < 0:
        acked = vcpu.pcpu.processor.acknowledge_interrupt()
        vector = -1 if acked is None else acked
    vcpu.host_irqs[vector] = vcpu.host_irqs.get(vector, 0) + 1
    if vector == LOCAL_TIMER_VECTOR:
        vcpu.pcpu.host_timer_at = None
        return Resume("host timer")
    return Resume(f"host interrupt {vector:#x}")


def handle_monitor_trap(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_monitor_trap()``: the MTF VM exit after one instruction (SDM 26.5.2) ends the
    user's single step (KVM_EXIT_DEBUG with DR6.BS)."""
    if vcpu.desc_step is not None:  # the descriptor-table instruction handle_desc() let run
        vcpu.vmcs_set_bits(F.SECONDARY_VM_EXEC_CONTROL, S.DESC)
        set_mtf, vcpu.desc_step = vcpu.desc_step, None
        if set_mtf:
            vcpu.vmcs_clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MONITOR_TRAP_FLAG)
            return Resume("descriptor-table instruction executed")
    if vcpu.guest_singlestep:
        vcpu.singlestep_exit_pending = False
        return GuestDebugExit(int(ExceptionVector.DB), vcpu.vmcs_read(F.GUEST_RIP), DR6_BS)
    return Resume("monitor trap flag")


def handle_desc(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_desc()`` (GDTR_IDTR / LDTR_TR exits of "descriptor-table exiting", SDM 26.1.3):
    KVM emulates the instruction.  Here the guest executes it itself: descriptor-table exiting
    is lifted for one instruction and the monitor trap flag brings control back after it (or
    after the delivery of the fault it raised, SDM 26.5.2), where handle_monitor_trap() restores
    both -- the instruction's architectural effect is the processor's own."""
    proc = vcpu.vmcs_read(F.CPU_BASED_VM_EXEC_CONTROL)
    vcpu.desc_step = not proc & C.MONITOR_TRAP_FLAG  # whether the MTF is ours to clear again
    vcpu.vmcs_clear_bits(F.SECONDARY_VM_EXEC_CONTROL, S.DESC)
    vcpu.vmcs_set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MONITOR_TRAP_FLAG)
    return Resume("descriptor-table instruction: single-stepped")


def handle_triple_fault(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_triple_fault()``: KVM_EXIT_SHUTDOWN, naming the chain of events whose delivery
    ended in the shutdown when the engine saw it (e.g. ``#UD -> #GP -> #DF -> shutdown``)."""
    chain = getattr(vcpu.pcpu.processor.executor, "last_triple_fault", ())
    if not chain:
        return ShutdownExit(vcpu.vmcs_read(F.GUEST_RIP))
    return ShutdownExit(vcpu.vmcs_read(F.GUEST_RIP), f"triple fault: {shutdown_chain_text(chain)}")


def handle_interrupt_window(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_interrupt_window()``: stop asking; the next entry injects the interrupt."""
    vcpu.vmcs_clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.INTR_WINDOW_EXITING)
    vcpu.request_interrupt_window = False
    return Resume("interrupt window open")


def handle_nmi_window(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    vcpu.vmcs_clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.NMI_WINDOW_EXITING)
    vcpu.request_nmi_window = False
    return Resume("NMI window open")


def handle_preemption_timer(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_preemption_timer()``: a deadline passed -- the next PIT tick (delivered at the next
    entry), a time slice or ``run()``'s limit (the run loop checks those), or the vCPU's own
    preemption-timer slice (seed 002), which gives the CPU up."""
    if vcpu.preemption_slice is not None:
        return Reschedule("preemption timer")
    return Resume("timer")


# =================================================================================================
# Instructions
# =================================================================================================
def kvm_emulate_cpuid(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``kvm_emulate_cpuid()`` with the vCPU's table; OSXSAVE follows CR4.OSXSAVE
    (kvm_update_cpuid_runtime())."""
    leaf = vcpu.get_gpr(0) & _U32
    index = vcpu.get_gpr(1) & _U32
    (eax, ebx, ecx, edx), _ = vcpu.cpuid.lookup(leaf, index)
    if leaf == 1:
        ecx &= ~CPUID_1_ECX_OSXSAVE
        if cr_emulate.read_cr4(vcpu) & Cr4.OSXSAVE:
            ecx |= CPUID_1_ECX_OSXSAVE
    for reg, value in ((0, eax), (3, ebx), (1, ecx), (2, edx)):
        vcpu.set_gpr(reg, value & _U32)
    vcpu.skip_instruction()
    return Resume(f"cpuid {leaf:#x}.{index:#x}")


def kvm_emulate_halt(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``kvm_emulate_halt()``: skip the HLT, then the vCPU is halted until an event."""
    vcpu.skip_instruction()
    return Halt()


def kvm_emulate_rdmsr(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    msr = vcpu.get_gpr(1) & _U32
    value = vcpu.msrs.get(msr)
    if value is not None:
        vcpu.set_gpr(0, value & _U32)
        vcpu.set_gpr(2, (value >> 32) & _U32)
    return vcpu.complete_insn_gp(value is not None, f"rdmsr {_msr_name(msr)}")


def kvm_emulate_wrmsr(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    msr = vcpu.get_gpr(1) & _U32
    value = (vcpu.get_gpr(2) & _U32) << 32 | (vcpu.get_gpr(0) & _U32)
    ok = vcpu.msrs.set(msr, value)
    return vcpu.complete_insn_gp(ok, f"wrmsr {_msr_name(msr)} <- {value:#x}")


def _msr_name(msr: int) -> str:
    try:
        return Msr(msr).name
    except ValueError:
        return f"{msr:#x}"


def handle_cr(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_cr()``: MOV to/from CR, CLTS, LMSW (SDM 28.2.1 Table 28-3)."""
    access = cr_emulate.CrAccess.decode(exit.qualification)
    wide = vcpu.is_64_bit_mode()
    if access.access_type == 0:
        value = vcpu.get_gpr(access.gpr)
        if not wide:
            value &= _U32
        setter = {0: cr_emulate.kvm_set_cr0, 3: cr_emulate.kvm_set_cr3, 4: cr_emulate.kvm_set_cr4, 8: cr_emulate.kvm_set_cr8}.get(access.cr)
        if setter is None:
            return unexpected_exit(vcpu, exit)
        return vcpu.complete_insn_gp(setter(vcpu, value), f"mov cr{access.cr} <- {value:#x}")
    if access.access_type == 1:
        read = cr_emulate.mov_from_cr(vcpu, access.cr)
        if read is None:
            return unexpected_exit(vcpu, exit)
        vcpu.set_gpr(access.gpr, read if wide else read & _U32)
        vcpu.skip_instruction()
        return Resume(f"mov {read:#x} <- cr{access.cr}")
    if access.access_type == 2:
        cr_emulate.clts(vcpu)
        vcpu.skip_instruction()
        return Resume("clts")
    ok = cr_emulate.kvm_lmsw(vcpu, access.lmsw_source & 0xF)
    return vcpu.complete_insn_gp(ok, f"lmsw {access.lmsw_source:#x}")


def handle_dr(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_dr()`` without guest debugging: stop intercepting MOV DR and let the instruction
    run again natively (KVM_DEBUGREG_WONT_EXIT) -- RIP is not advanced."""
    vcpu.vmcs_clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.MOV_DR_EXITING)
    return Resume("MOV DR exiting off")


def kvm_emulate_xsetbv(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``kvm_emulate_xsetbv()`` / ``__kvm_set_xcr()``: #GP(0) unless CPL 0 and ECX (bits 63:32 of
    RCX ignored) = 0, x87 on, AVX only with SSE, both MPX components or neither, all of AVX-512
    with AVX or none, nothing the guest's CPUID leaf 0DH does not offer (SDM Vol. 2C XSETBV).
    (#UD for CR4.OSXSAVE = 0 has priority over the VM exit: the processor raises it.)  The new
    XCR0 is loaded into the CPU, where XGETBV and XSAVE read it."""
    index = vcpu.get_gpr(1) & _U32
    value = (vcpu.get_gpr(2) & _U32) << 32 | (vcpu.get_gpr(0) & _U32)
    leaf = vcpu.cpuid.find(0xD, 0)
    supported = (leaf.eax | leaf.edx << 32) if leaf is not None else XFEATURE_MASK_FP
    avx512 = value & XFEATURE_MASK_AVX512
    ok = (
        vcpu.cpl() == 0
        and index == 0
        and bool(value & XFEATURE_MASK_FP)
        and not (value & XFEATURE_MASK_YMM and not value & XFEATURE_MASK_SSE)
        and not value & ~(supported | XFEATURE_MASK_FP)
        and bool(value & XFEATURE_MASK_BNDREGS) == bool(value & XFEATURE_MASK_BNDCSR)
        and not (avx512 and (not value & XFEATURE_MASK_YMM or avx512 != XFEATURE_MASK_AVX512))
    )
    if ok:
        vcpu.xcr0 = value
    return vcpu.complete_insn_gp(ok, f"xsetbv {value:#x}")


def handle_invlpg(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_invlpg()`` -> kvm_mmu_invlpg(): flush the linear address (INVVPID type 0)."""
    processor = vcpu.pcpu.processor
    if vcpu.vpid:
        processor.invvpid(0, vcpu.vpid, exit.qualification)
    vcpu.skip_instruction()
    return Resume(f"invlpg {exit.qualification:#x}")


def handle_rdtsc(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """RDTSC/RDTSCP with "RDTSC exiting": the guest's TSC (SDM 25.6.5), TSC_AUX in ECX."""
    tsc = vcpu.guest_tsc() & _U64
    vcpu.set_gpr(0, tsc & _U32)
    vcpu.set_gpr(2, tsc >> 32)
    if exit.basic_reason == ExitReason.RDTSCP:
        vcpu.set_gpr(1, (vcpu.msrs.get(Msr.TSC_AUX, host_initiated=True) or 0) & _U32)
    vcpu.skip_instruction()
    return Resume(f"rdtsc -> {tsc}")


def handle_pause(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_pause()``: the guest spins -- give the CPU to someone else (kvm_vcpu_on_spin)."""
    vcpu.skip_instruction()
    return Reschedule("pause")


def kvm_emulate_as_nop(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """INVD, WBINVD, MONITOR, MWAIT (KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS): done as NOPs."""
    vcpu.skip_instruction()
    return Resume("nop")


def kvm_emulate_rdpmc(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """No virtual PMU: every counter is out of range, #GP (kvm_emulate_rdpmc())."""
    return vcpu.complete_insn_gp(False, "rdpmc")


def kvm_handle_invalid_op(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_vmx_instruction()`` without nested VMX, RDRAND/RDSEED the CPUID hides: #UD."""
    vcpu.queue_exception(int(ExceptionVector.UD))
    return Resume("#UD injected")


def handle_vmcall(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    return kvm_emulate_hypercall(vcpu)


def handle_machine_check(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    return Resume("machine check during VM entry (host)")


# =================================================================================================
# I/O instructions (handle_io: kvm_fast_pio for IN/OUT, the emulator for INS/OUTS)
# =================================================================================================
def _set_rax_in(vcpu: Vcpu, size: int, value: int) -> None:
    """``complete_fast_pio_in()``: AL/AX merged into RAX, EAX zero-extended."""
    if size == 4:
        vcpu.set_gpr(0, value & _U32)
    else:
        mask = (1 << (8 * size)) - 1
        vcpu.set_gpr(0, (vcpu.get_gpr(0) & ~mask) | (value & mask))


def handle_io(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_io()``: qualification bits 2:0 size - 1, 3 IN, 4 string, 5 REP, 31:16 port
    (SDM 28.2.1 Table 28-5)."""
    q = exit.qualification
    size = (q & 7) + 1
    is_in = bool(q & 8)
    port = (q >> 16) & 0xFFFF
    if q & 16:
        return _handle_string_io(vcpu, exit, port, size, is_in, bool(q & 32))
    bus = vcpu.vm.io_bus
    if is_in:
        value = bus.read(port, size)
        if value is None:
            io = IoExit(port, size, IoDirection.IN, bytearray(b"\xff" * size))

            def complete_in() -> VcpuExit | None:
                _set_rax_in(vcpu, size, io.value)
                vcpu.skip_instruction()
                return None

            vcpu.complete_userspace_io = complete_in
            return io
        _set_rax_in(vcpu, size, value)
        vcpu.skip_instruction()
        return Resume(f"in {port:#x} -> {value:#x}")
    value = vcpu.get_gpr(0) & ((1 << (8 * size)) - 1)
    if bus.write(port, size, value):
        vcpu.skip_instruction()
        platform = vcpu.vm.platform
        code = platform.take_exit_code() if platform is not None else None
        if code is not None:
            return DebugExit(code)
        return Resume(f"out {port:#x} <- {value:#x}")
    io = IoExit(port, size, IoDirection.OUT, bytearray(value.to_bytes(size, "little")))

    def complete_out() -> VcpuExit | None:
        vcpu.skip_instruction()
        return None

    vcpu.complete_userspace_io = complete_out
    return io


def _segment_base(vcpu: Vcpu, segment: int) -> int:
    if vcpu.is_64_bit_mode() and segment not in (4, 5):
        return 0
    name = ("ES", "CS", "SS", "DS", "FS", "GS")[segment]
    return vcpu.vmcs_read(F[f"GUEST_{name}_BASE"])


def _handle_string_io(vcpu: Vcpu, exit: VmExitInfo, port: int, size: int, is_in: bool, rep: bool) -> HandlerOutcome:
    """INS/OUTS (REP or not): element by element through the guest's paging, as KVM's emulator
    does; a fault injects #PF with the registers showing the elements done, so the instruction
    restarts where it stopped (SDM Vol. 2 "REP" -- interruptible string instructions)."""
    info = exit.instruction_info
    address_size = (16, 32, 64)[min((info >> 7) & 7, 2)]
    amask = (1 << address_size) - 1
    segment = 0 if is_in else (info >> 15) & 7
    index_reg = 7 if is_in else 6
    rflags = vcpu.vmcs_read(F.GUEST_RFLAGS)
    step = -size if rflags & Rflags.DF else size
    rcx = vcpu.get_gpr(1)
    count = (rcx & amask) if rep else 1
    if count == 0:
        vcpu.skip_instruction()
        return Resume("rep string I/O with count 0")
    todo = min(count, MAX_STRING_IO_ELEMENTS)
    base = _segment_base(vcpu, segment)
    state = vcpu.paging_state()
    memory = vcpu.vm.memory
    pointer = vcpu.get_gpr(index_reg)
    access = Access.WRITE if is_in else Access.READ
    # Each element's guest-physical pieces: one, or two for an element that crosses a page.
    gpas: list[list[tuple[int, int]]] = []
    fault: tuple[int, int] | None = None
    for i in range(todo):
        linear = (base + ((pointer + i * step) & amask)) & _U64
        try:
            gpas.append(_element_gpas(memory, linear, size, access, state))
        except X86Fault as error:
            fault = (error.cr2 if error.cr2 is not None else linear, error.error_code or 0)
            break
        except GuestMemoryError:
            fault = (linear, -1)
            break
    # Each element takes time, as the REP iterations the CPU engine runs itself do: what bounds
    # a REP with RCX = 2^64-1 in guest time.
    host_time.charge(vcpu.pcpu, host_time.STRING_IO_ELEMENT_TSC * max(1, len(gpas)))

    def retire(done: int) -> None:
        vcpu.set_gpr(index_reg, (pointer & ~amask) | ((pointer + done * step) & amask))
        if rep:
            vcpu.set_gpr(1, (rcx & ~amask) | ((rcx - done) & amask))
        if done == count or not rep:
            vcpu.skip_instruction()

    def fail(done: int) -> Resume:
        assert fault is not None
        retire(done)
        linear, code = fault
        if code < 0:
            vcpu.queue_exception(int(ExceptionVector.GP), 0)
            return Resume(f"string I/O: no memory at {linear:#x}, #GP")
        vcpu.queue_exception(int(ExceptionVector.PF), code, cr2=linear)
        return Resume(f"string I/O: #PF at {linear:#x}")

    vm = vcpu.vm
    bus = vm.io_bus
    if bus.find(port) is not None:
        for pieces in gpas:
            if is_in:
                value = bus.read(port, size)
                _write_element(vm, pieces, (value or 0).to_bytes(size, "little"))
            else:
                bus.write(port, size, int.from_bytes(_read_element(vm, pieces), "little"))
        if fault is not None:
            return fail(len(gpas))
        retire(len(gpas))
        return Resume(f"{'ins' if is_in else 'outs'} {port:#x} x{len(gpas)}")
    if not gpas:
        return fail(0)
    n = len(gpas)
    if is_in:
        io = IoExit(port, size, IoDirection.IN, bytearray(b"\xff" * (size * n)), n)
    else:
        io = IoExit(port, size, IoDirection.OUT, bytearray(b"".join(_read_element(vm, pieces) for pieces in gpas)), n)
    pending_fault = fault

    def complete() -> VcpuExit | None:
        if is_in:
            for i, pieces in enumerate(gpas):
                _write_element(vm, pieces, bytes(io.data[i * size : (i + 1) * size]))
        if pending_fault is not None:
            fail(n)
        else:
            retire(n)
        return None

    vcpu.complete_userspace_io = complete
    return io


def _element_gpas(memory: GuestMemory, linear: int, size: int, access: Access, state: PagingState) -> list[tuple[int, int]]:
    """The guest-physical (address, length) pieces of one string-I/O element: two when it
    crosses a page, each translated on its own (SDM 4.1: paging maps pages independently)."""
    first = min(size, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
    pieces = [(translate(memory, linear, access, state).gpa, first)]
    if first < size:
        pieces.append((translate(memory, (linear + first) & _U64, access, state).gpa, size - first))
    return pieces


def _read_element(vm: Vm, pieces: list[tuple[int, int]]) -> bytes:
    """An OUTS element from memory: RAM, an MMIO device, or all ones from nothing."""
    return b"".join(read_phys(vm, gpa, length) for gpa, length in pieces)


def _write_element(vm: Vm, pieces: list[tuple[int, int]], data: bytes) -> None:
    """An INS element to memory: RAM, an MMIO device, or dropped where nothing is."""
    offset = 0
    for gpa, length in pieces:
        write_phys(vm, gpa, data[offset : offset + length])
        offset += length


# =================================================================================================
# EPT
# =================================================================================================
def handle_ept_violation(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_ept_violation()``: the error code from the qualification
    (:func:`ept_violation_error_code`), then ``kvm_mmu_page_fault()``; EMULATE is MMIO (or a
    write to a read-only slot): the instruction is emulated against the MMIO bus."""
    q = exit.qualification
    gpa = exit.guest_physical_address
    if not exit.idt_vectoring_info & INTR_INFO_VALID_MASK and q & EPT_VIOLATION_NMI_UNBLOCKING:
        vcpu.vmcs_set_bits(F.GUEST_INTERRUPTIBILITY_INFO, GuestInterruptibility.NMI)
    if vcpu.vm.mmu.is_tracked(gpa >> 12):
        linear = exit.guest_linear_address if q & EPT_VIOLATION_GVA_IS_VALID else None
        return PageTrackExit(gpa, linear, bool(q & EPT_VIOLATION_ACC_READ), bool(q & EPT_VIOLATION_ACC_WRITE),
                             bool(q & EPT_VIOLATION_ACC_INSTR), bool(q & EPT_VIOLATION_GVA_TRANSLATED),
                             vcpu.vmcs_read(F.GUEST_RIP))
    outcome = vcpu.vm.mmu.page_fault(gpa, ept_violation_error_code(q), async_pf=vcpu.async_pf_hook())
    if outcome.not_resident is not None and outcome.async_pf is not None:
        # kvm_arch_setup_async_pf(): the page-in goes on while the guest runs something else
        # ("page not present" #PF, injected at the next entry) or the vCPU halts until it is in.
        if vcpu.async_pf.halted:
            return Halt(f"async page fault at {gpa:#x}: halted until the page is in")
        return Resume(f"async page fault at {gpa:#x}")
    return _page_fault_outcome(vcpu, exit, outcome.result, gpa, outcome.error)


def handle_ept_misconfig(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``handle_ept_misconfig()``: an MMIO SPTE (reserved bits set on purpose) -> emulate."""
    gpa = exit.guest_physical_address
    outcome = vcpu.vm.mmu.handle_ept_misconfig(gpa)
    return _page_fault_outcome(vcpu, exit, outcome.result, gpa, outcome.error)


def _page_fault_outcome(vcpu: Vcpu, exit: VmExitInfo, result: RetPf, gpa: int, error: Exception | None) -> HandlerOutcome:
    if result in (RetPf.FIXED, RetPf.SPURIOUS, RetPf.RETRY):
        return Resume(f"EPT {result.name.lower()} at {gpa:#x}")
    if result is RetPf.EMULATE:
        if exit.idt_vectoring_info & INTR_INFO_VALID_MASK:
            return InternalError(KVM_INTERNAL_ERROR_DELIVERY_EV, f"MMIO at {gpa:#x} during event delivery",
                                 exit.reason, vcpu.dump_vmcs())
        return emulate_mmio(vcpu, gpa)
    return InternalError(KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, f"EPT fault at {gpa:#x} not handled: {error or result.name}",
                         exit.reason, vcpu.dump_vmcs())


# =================================================================================================
# The table and dispatch (__vmx_handle_exit)
# =================================================================================================
EXIT_HANDLERS: dict[ExitReason, ExitHandler] = {
    ExitReason.EXCEPTION_NMI: handle_exception_nmi,
    ExitReason.EXTERNAL_INTERRUPT: handle_external_interrupt,
    ExitReason.TRIPLE_FAULT: handle_triple_fault,
    ExitReason.NMI_WINDOW: handle_nmi_window,
    ExitReason.IO_INSTRUCTION: handle_io,
    ExitReason.CR_ACCESS: handle_cr,
    ExitReason.DR_ACCESS: handle_dr,
    ExitReason.CPUID: kvm_emulate_cpuid,
    ExitReason.MSR_READ: kvm_emulate_rdmsr,
    ExitReason.MSR_WRITE: kvm_emulate_wrmsr,
    ExitReason.INTERRUPT_WINDOW: handle_interrupt_window,
    ExitReason.HLT: kvm_emulate_halt,
    ExitReason.INVD: kvm_emulate_as_nop,
    ExitReason.INVLPG: handle_invlpg,
    ExitReason.RDPMC: kvm_emulate_rdpmc,
    ExitReason.RDTSC: handle_rdtsc,
    ExitReason.RDTSCP: handle_rdtsc,
    ExitReason.VMCALL: handle_vmcall,
    ExitReason.VMCLEAR: kvm_handle_invalid_op,
    ExitReason.VMLAUNCH: kvm_handle_invalid_op,
    ExitReason.VMPTRLD: kvm_handle_invalid_op,
    ExitReason.VMPTRST: kvm_handle_invalid_op,
    ExitReason.VMREAD: kvm_handle_invalid_op,
    ExitReason.VMRESUME: kvm_handle_invalid_op,
    ExitReason.VMWRITE: kvm_handle_invalid_op,
    ExitReason.VMXOFF: kvm_handle_invalid_op,
    ExitReason.VMXON: kvm_handle_invalid_op,
    ExitReason.INVEPT: kvm_handle_invalid_op,
    ExitReason.INVVPID: kvm_handle_invalid_op,
    ExitReason.WBINVD: kvm_emulate_as_nop,
    ExitReason.XSETBV: kvm_emulate_xsetbv,
    ExitReason.MCE_DURING_VMENTRY: handle_machine_check,
    ExitReason.EPT_VIOLATION: handle_ept_violation,
    ExitReason.EPT_MISCONFIG: handle_ept_misconfig,
    ExitReason.PAUSE_INSTRUCTION: handle_pause,
    ExitReason.MWAIT_INSTRUCTION: kvm_emulate_as_nop,
    ExitReason.MONITOR_INSTRUCTION: kvm_emulate_as_nop,
    ExitReason.RDRAND: kvm_handle_invalid_op,
    ExitReason.RDSEED: kvm_handle_invalid_op,
    ExitReason.PREEMPTION_TIMER: handle_preemption_timer,
    ExitReason.MONITOR_TRAP_FLAG: handle_monitor_trap,
    ExitReason.GDTR_IDTR: handle_desc,
    ExitReason.LDTR_TR: handle_desc,
}
"""``kvm_vmx_exit_handlers[]``: basic exit reason -> handler."""

# Exits that may legitimately happen during event delivery (__vmx_handle_exit()).
_VECTORING_OK = frozenset({
    ExitReason.EXCEPTION_NMI, ExitReason.EPT_VIOLATION, ExitReason.PML_FULL, ExitReason.APIC_ACCESS,
    ExitReason.TASK_SWITCH, ExitReason.NOTIFY,
})


def unexpected_exit(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``unexpected_vmexit``: KVM_EXIT_INTERNAL_ERROR with the VMCS dump."""
    reason = exit.exit_reason
    name = reason.name if isinstance(reason, ExitReason) else str(exit.basic_reason)
    return InternalError(
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
        f"vmx: unexpected exit reason {exit.reason:#x} ({name})",
        exit.reason,
        vcpu.dump_vmcs(),
    )


def dispatch(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """``__vmx_handle_exit()`` after the failed-entry checks (the vCPU makes those)."""
    vcpu.last_exit = exit
    basic = exit.basic_reason
    if exit.idt_vectoring_info & INTR_INFO_VALID_MASK and basic not in _VECTORING_OK:
        return InternalError(
            KVM_INTERNAL_ERROR_DELIVERY_EV,
            f"exit reason {basic} during event delivery (vectoring info {exit.idt_vectoring_info:#x})",
            exit.reason,
            vcpu.dump_vmcs(),
        )
    try:
        handler = EXIT_HANDLERS.get(ExitReason(basic))
    except ValueError:
        handler = None
    if handler is None:
        return unexpected_exit(vcpu, exit)
    try:
        return handler(vcpu, exit)
    except (GuestMemoryError, HostMemoryError) as error:
        # A memslot over memory the VMM unmapped, a guest table outside RAM...: Linux's KVM_RUN
        # fails with -EFAULT here; the guest's input never becomes a Python exception.
        return InternalError(KVM_INTERNAL_ERROR_EMULATION, f"guest memory access failed: {error}", exit.reason,
                             vcpu.dump_vmcs())


def handle_exit(vcpu: Vcpu, exit: VmExitInfo) -> HandlerOutcome:
    """Dispatch, then count and trace (the statistics wrap the handler, hvpp-style)."""
    rip = vcpu.vmcs_read(F.GUEST_RIP)
    start = perf_counter_ns() if vcpu.tracer is not None else 0  # no clock read without a tracer
    outcome = dispatch(vcpu, exit)
    if getattr(vcpu, "singlestep_exit_pending", False) and isinstance(outcome, Resume):
        # An emulated instruction completed a single step of the user's debugger
        # (KVM_GUESTDBG_SINGLESTEP): KVM_EXIT_DEBUG with DR6.BS, as kvm_vcpu_do_singlestep().
        # (After a HLT the vCPU halts first: Vcpu.run() ends the step then.)
        vcpu.singlestep_exit_pending = False
        outcome = GuestDebugExit(int(ExceptionVector.DB), vcpu.vmcs_read(F.GUEST_RIP), DR6_BS)
    vcpu.record(exit, outcome, rip, perf_counter_ns() - start if vcpu.tracer is not None else 0)
    return outcome
