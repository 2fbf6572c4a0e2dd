"""VM-exit decisions of VMX non-root operation and the exit-information encoders.

Pure functions of the VM-execution controls (and, for the bitmaps, of physical memory): no CPU
engine, no side effects.  The executor asks them whether an instruction or an exception causes
a VM exit (SDM 26.1, 26.2), what a non-exiting instruction sees or changes instead (SDM 26.3),
and how to encode the exit qualification and VM-exit instruction information (SDM 28.2.1,
28.2.5).

What is *not* decided here: the faults that have priority over instruction VM exits (SDM
26.1.1: #UD, privilege-based #GP -- CPL > 0, CR4.UMIP, CR4.TSD --, the TSS I/O-permission
bitmap); the caller checks those first.  Note the exception: MOV DR exits take priority over
the #GP for CPL > 0 and the #UD for DR4/DR5 with CR4.DE = 1 (SDM 26.1.3, "MOV DR").
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Container
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Final

from pyvmx.arch import qualifications as q
from pyvmx.arch.controls import (
    PinBasedControls,
    ProcBasedControls,
    SecondaryProcBasedControls,
    VmExitControls,
)
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.vmcs_fields import VmcsField
from pyvmx.arch.x86 import Cr0, ExceptionVector
from pyvmx.vmx.decode import DecodedInsn, InsnKind, MemOperand
from pyvmx.vmx.memory import PhysicalMemory, PhysicalMemoryError
from pyvmx.vmx.vmcs import VmcsRegion

__all__ = [
    "CrAccessQualification",
    "CrAccessType",
    "ExecControls",
    "InjectUD",
    "InstructionFault",
    "InstructionInfo",
    "IoQualification",
    "MovDrQualification",
    "OPERAND_DEPENDENT_KINDS",
    "PauseLoopState",
    "clts_exits",
    "clts_result",
    "cr_access_qualification",
    "cr_read_value",
    "cr_write_result",
    "descriptor_table_instruction_info",
    "encls_exits",
    "enclv_exits",
    "exception_exits",
    "exit_qualification_for_memory_operand",
    "guest_tsc",
    "ins_outs_instruction_info",
    "instruction_exits",
    "io_exits",
    "io_qualification",
    "lmsw_exits",
    "lmsw_result",
    "mov_dr_qualification",
    "mov_to_cr0_exits",
    "mov_to_cr3_exits",
    "mov_to_cr4_exits",
    "msr_exits",
    "mwait_qualification",
    "pause_exits",
    "rdrand_instruction_info",
    "vmcs_shadowing_exits",
    "vmfunc_exits",
    "vmx_instruction_info",
    "xsaves_exits",
]

def _int_masks(flags: type[enum.IntFlag]) -> SimpleNamespace:
    """A control-bits IntFlag's members as plain ints: ``value & IntFlag`` makes a new flag
    object on every test, which the run loop of the CPU engine cannot afford."""
    return SimpleNamespace(**{member.name: int(member) for member in flags if member.name})


P = _int_masks(PinBasedControls)
C = _int_masks(ProcBasedControls)
S = _int_masks(SecondaryProcBasedControls)

_MASK64 = (1 << 64) - 1
_MASK32 = 0xFFFFFFFF

# I/O bitmaps (SDM 25.6.4): A covers ports 0000H-7FFFH, B covers 8000H-FFFFH.
IO_BITMAP_PORTS = 0x8000
IO_PORT_LIMIT = 0x10000

# MSR bitmap (SDM 25.6.9): four 1-KiB bitmaps in one 4-KiB page.
MSR_BITMAP_READ_LOW = 0x000
MSR_BITMAP_READ_HIGH = 0x400
MSR_BITMAP_WRITE_LOW = 0x800
MSR_BITMAP_WRITE_HIGH = 0xC00
MSR_LOW_RANGE = range(0x00000000, 0x00002000)
MSR_HIGH_RANGE = range(0xC0000000, 0xC0002000)

# CR0 bits as plain ints: ``~`` of an IntFlag member stays within the flag's 32 bits.
CR0_PE, CR0_MP, CR0_EM, CR0_TS = int(Cr0.PE), int(Cr0.MP), int(Cr0.EM), int(Cr0.TS)
LMSW_BITS = CR0_PE | CR0_MP | CR0_EM | CR0_TS  # LMSW loads CR0[3:0] only

CR3_TARGET_FIELDS = (
    VmcsField.CR3_TARGET_VALUE0,
    VmcsField.CR3_TARGET_VALUE1,
    VmcsField.CR3_TARGET_VALUE2,
    VmcsField.CR3_TARGET_VALUE3,
)


class InstructionFault(enum.Enum):
    """A fault an instruction raises in VMX non-root operation instead of executing (SDM 26.3),
    returned where a decision could otherwise be an exit reason."""

    UD = "#UD"


InjectUD: Final = InstructionFault.UD
"""The instruction causes #UD because its "enable ..." VM-execution control is 0 (SDM 26.3)."""


# --- the controls non-root operation consults ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExecControls:
    """A snapshot of the VMCS fields VMX non-root operation consults, taken at VM entry
    (SDM 25.6-25.8).  ``proc2`` is 0 when "activate secondary controls" is 0 (SDM 25.6.2: the
    processor then operates as if all secondary controls were 0); ``cr3_targets`` holds only
    the first CR3-target-count values."""

    pin: int = 0
    proc: int = 0
    proc2: int = 0
    exception_bitmap: int = 0
    pfec_mask: int = 0
    pfec_match: int = 0
    io_bitmap_a: int = 0
    io_bitmap_b: int = 0
    msr_bitmap: int = 0
    cr0_mask: int = 0
    cr0_shadow: int = 0
    cr4_mask: int = 0
    cr4_shadow: int = 0
    cr3_targets: tuple[int, ...] = ()
    tsc_offset: int = 0
    tsc_multiplier: int = 0
    ple_gap: int = 0
    ple_window: int = 0
    exit_controls: int = 0
    entry_controls: int = 0
    eptp: int = 0
    vpid: int = 0
    vm_function_controls: int = 0
    vmread_bitmap: int = 0
    vmwrite_bitmap: int = 0
    xss_exit_bitmap: int = 0
    encls_exiting_bitmap: int = 0
    enclv_exiting_bitmap: int = 0
    virtual_apic_page: int = 0
    tpr_threshold: int = 0

    @classmethod
    def from_vmcs(cls, vmcs: VmcsRegion) -> ExecControls:
        F = VmcsField
        proc = vmcs.read(F.CPU_BASED_VM_EXEC_CONTROL)
        proc2 = vmcs.read(F.SECONDARY_VM_EXEC_CONTROL) if proc & C.ACTIVATE_SECONDARY_CONTROLS else 0
        count = min(vmcs.read(F.CR3_TARGET_COUNT), len(CR3_TARGET_FIELDS))
        return cls(
            pin=vmcs.read(F.PIN_BASED_VM_EXEC_CONTROL),
            proc=proc,
            proc2=proc2,
            exception_bitmap=vmcs.read(F.EXCEPTION_BITMAP),
            pfec_mask=vmcs.read(F.PAGE_FAULT_ERROR_CODE_MASK),
            pfec_match=vmcs.read(F.PAGE_FAULT_ERROR_CODE_MATCH),
            io_bitmap_a=vmcs.read(F.IO_BITMAP_A),
            io_bitmap_b=vmcs.read(F.IO_BITMAP_B),
            msr_bitmap=vmcs.read(F.MSR_BITMAP),
            cr0_mask=vmcs.read(F.CR0_GUEST_HOST_MASK),
            cr0_shadow=vmcs.read(F.CR0_READ_SHADOW),
            cr4_mask=vmcs.read(F.CR4_GUEST_HOST_MASK),
            cr4_shadow=vmcs.read(F.CR4_READ_SHADOW),
            cr3_targets=tuple(vmcs.read(f) for f in CR3_TARGET_FIELDS[:count]),
            tsc_offset=vmcs.read(F.TSC_OFFSET),
            tsc_multiplier=vmcs.read(F.TSC_MULTIPLIER),
            ple_gap=vmcs.read(F.PLE_GAP),
            ple_window=vmcs.read(F.PLE_WINDOW),
            exit_controls=vmcs.read(F.VM_EXIT_CONTROLS),
            entry_controls=vmcs.read(F.VM_ENTRY_CONTROLS),
            eptp=vmcs.read(F.EPT_POINTER),
            vpid=vmcs.read(F.VIRTUAL_PROCESSOR_ID),
            vm_function_controls=vmcs.read(F.VM_FUNCTION_CONTROL),
            vmread_bitmap=vmcs.read(F.VMREAD_BITMAP),
            vmwrite_bitmap=vmcs.read(F.VMWRITE_BITMAP),
            xss_exit_bitmap=vmcs.read(F.XSS_EXIT_BITMAP),
            encls_exiting_bitmap=vmcs.read(F.ENCLS_EXITING_BITMAP),
            enclv_exiting_bitmap=vmcs.read(F.ENCLV_EXITING_BITMAP),
            virtual_apic_page=vmcs.read(F.VIRTUAL_APIC_PAGE_ADDR),
            tpr_threshold=vmcs.read(F.TPR_THRESHOLD),
        )

    # pin-based (SDM Table 25-5)
    @property
    def external_interrupt_exiting(self) -> bool:
        return bool(self.pin & P.EXT_INTR_MASK)

    @property
    def nmi_exiting(self) -> bool:
        return bool(self.pin & P.NMI_EXITING)

    @property
    def virtual_nmis(self) -> bool:
        return bool(self.pin & P.VIRTUAL_NMIS)

    @property
    def preemption_timer(self) -> bool:
        return bool(self.pin & P.VMX_PREEMPTION_TIMER)

    @property
    def posted_interrupts(self) -> bool:
        return bool(self.pin & P.POSTED_INTR)

    # primary processor-based (SDM Table 25-6)
    @property
    def interrupt_window_exiting(self) -> bool:
        return bool(self.proc & C.INTR_WINDOW_EXITING)

    @property
    def use_tsc_offsetting(self) -> bool:
        return bool(self.proc & C.USE_TSC_OFFSETTING)

    @property
    def hlt_exiting(self) -> bool:
        return bool(self.proc & C.HLT_EXITING)

    @property
    def invlpg_exiting(self) -> bool:
        return bool(self.proc & C.INVLPG_EXITING)

    @property
    def mwait_exiting(self) -> bool:
        return bool(self.proc & C.MWAIT_EXITING)

    @property
    def rdpmc_exiting(self) -> bool:
        return bool(self.proc & C.RDPMC_EXITING)

    @property
    def rdtsc_exiting(self) -> bool:
        return bool(self.proc & C.RDTSC_EXITING)

    @property
    def cr3_load_exiting(self) -> bool:
        return bool(self.proc & C.CR3_LOAD_EXITING)

    @property
    def cr3_store_exiting(self) -> bool:
        return bool(self.proc & C.CR3_STORE_EXITING)

    @property
    def cr8_load_exiting(self) -> bool:
        return bool(self.proc & C.CR8_LOAD_EXITING)

    @property
    def cr8_store_exiting(self) -> bool:
        return bool(self.proc & C.CR8_STORE_EXITING)

    @property
    def use_tpr_shadow(self) -> bool:
        return bool(self.proc & C.TPR_SHADOW)

    @property
    def nmi_window_exiting(self) -> bool:
        return bool(self.proc & C.NMI_WINDOW_EXITING)

    @property
    def mov_dr_exiting(self) -> bool:
        return bool(self.proc & C.MOV_DR_EXITING)

    @property
    def unconditional_io_exiting(self) -> bool:
        return bool(self.proc & C.UNCOND_IO_EXITING)

    @property
    def use_io_bitmaps(self) -> bool:
        return bool(self.proc & C.USE_IO_BITMAPS)

    @property
    def monitor_trap_flag(self) -> bool:
        return bool(self.proc & C.MONITOR_TRAP_FLAG)

    @property
    def use_msr_bitmaps(self) -> bool:
        return bool(self.proc & C.USE_MSR_BITMAPS)

    @property
    def monitor_exiting(self) -> bool:
        return bool(self.proc & C.MONITOR_EXITING)

    @property
    def pause_exiting(self) -> bool:
        return bool(self.proc & C.PAUSE_EXITING)

    @property
    def activate_secondary_controls(self) -> bool:
        return bool(self.proc & C.ACTIVATE_SECONDARY_CONTROLS)

    # secondary processor-based (SDM Table 25-7)
    @property
    def virtualize_apic_accesses(self) -> bool:
        return bool(self.proc2 & S.VIRTUALIZE_APIC_ACCESSES)

    @property
    def ept_enabled(self) -> bool:
        return bool(self.proc2 & S.ENABLE_EPT)

    @property
    def descriptor_table_exiting(self) -> bool:
        return bool(self.proc2 & S.DESC)

    @property
    def rdtscp_enabled(self) -> bool:
        return bool(self.proc2 & S.ENABLE_RDTSCP)

    @property
    def virtualize_x2apic_mode(self) -> bool:
        return bool(self.proc2 & S.VIRTUALIZE_X2APIC_MODE)

    @property
    def vpid_enabled(self) -> bool:
        return bool(self.proc2 & S.ENABLE_VPID)

    @property
    def wbinvd_exiting(self) -> bool:
        return bool(self.proc2 & S.WBINVD_EXITING)

    @property
    def unrestricted_guest(self) -> bool:
        return bool(self.proc2 & S.UNRESTRICTED_GUEST)

    @property
    def pause_loop_exiting(self) -> bool:
        return bool(self.proc2 & S.PAUSE_LOOP_EXITING)

    @property
    def rdrand_exiting(self) -> bool:
        return bool(self.proc2 & S.RDRAND_EXITING)

    @property
    def invpcid_enabled(self) -> bool:
        return bool(self.proc2 & S.ENABLE_INVPCID)

    @property
    def vmfunc_enabled(self) -> bool:
        return bool(self.proc2 & S.ENABLE_VMFUNC)

    @property
    def vmcs_shadowing(self) -> bool:
        return bool(self.proc2 & S.SHADOW_VMCS)

    @property
    def encls_exiting(self) -> bool:
        return bool(self.proc2 & S.ENCLS_EXITING)

    @property
    def rdseed_exiting(self) -> bool:
        return bool(self.proc2 & S.RDSEED_EXITING)

    @property
    def xsaves_enabled(self) -> bool:
        return bool(self.proc2 & S.ENABLE_XSAVES)

    @property
    def use_tsc_scaling(self) -> bool:
        return bool(self.proc2 & S.TSC_SCALING)

    @property
    def user_wait_pause_enabled(self) -> bool:
        return bool(self.proc2 & S.ENABLE_USR_WAIT_PAUSE)

    @property
    def enclv_exiting(self) -> bool:
        return bool(self.proc2 & S.ENABLE_ENCLV)

    # VM-exit controls (SDM Table 25-13)
    @property
    def ack_interrupt_on_exit(self) -> bool:
        return bool(self.exit_controls & _ACK_INTR_ON_EXIT)

    @property
    def save_preemption_timer(self) -> bool:
        return bool(self.exit_controls & _SAVE_VMX_PREEMPTION_TIMER)


_ACK_INTR_ON_EXIT = int(VmExitControls.ACK_INTR_ON_EXIT)
_SAVE_VMX_PREEMPTION_TIMER = int(VmExitControls.SAVE_VMX_PREEMPTION_TIMER)


# --- bitmaps in physical memory ---------------------------------------------------------------------
def _bitmap_bit(memory: PhysicalMemory, base: int, bit: int) -> bool:
    """A bit of a VMX bitmap.  A bitmap outside physical memory reads as all ones -- what a read
    of unbacked physical addresses returns -- so every access it covers causes a VM exit."""
    try:
        return memory.test_bit(base, bit)
    except PhysicalMemoryError:
        return True


def io_exits(ctl: ExecControls, memory: PhysicalMemory, port: int, size: int) -> bool:
    """Whether an I/O instruction (IN, INS, OUT, OUTS) accessing ``size`` bytes from ``port``
    causes a VM exit (SDM 26.1.3 "I/O instructions", 25.6.4).

    Without I/O bitmaps, "unconditional I/O exiting" decides.  With them ("unconditional I/O
    exiting" is then ignored), the access exits if the bit of any port it touches is set --
    bitmap A for 0000H-7FFFH, B for 8000H-FFFFH, so an access at 7FFFH consults both -- and
    always if it wraps around the 16-bit port space (touches FFFFH and 0000H).
    """
    if not 0 <= port < IO_PORT_LIMIT or size not in (1, 2, 4):
        raise ValueError(f"invalid I/O access: port {port:#x}, size {size}")
    if not ctl.use_io_bitmaps:
        return ctl.unconditional_io_exiting
    if port + size > IO_PORT_LIMIT:
        return True
    for p in range(port, port + size):
        bitmap = ctl.io_bitmap_a if p < IO_BITMAP_PORTS else ctl.io_bitmap_b
        if _bitmap_bit(memory, bitmap, p & (IO_BITMAP_PORTS - 1)):
            return True
    return False


def msr_exits(ctl: ExecControls, memory: PhysicalMemory, msr: int, write: bool) -> bool:
    """Whether RDMSR (``write`` False) or WRMSR of MSR ``msr`` (ECX; RCX[63:32] is ignored)
    causes a VM exit (SDM 26.1.3 "RDMSR"/"WRMSR", 25.6.9).

    Without MSR bitmaps, always.  With them: MSRs outside 00000000H-00001FFFH and
    C0000000H-C0001FFFH always exit; the others exit if their bit is set in the read or write
    bitmap for low or high MSRs (bytes 0, 1024, 2048, 3072 of the bitmap page; bit = ECX & 1FFFH).
    """
    if not ctl.use_msr_bitmaps:
        return True
    msr &= _MASK32
    if msr in MSR_LOW_RANGE:
        offset = MSR_BITMAP_WRITE_LOW if write else MSR_BITMAP_READ_LOW
    elif msr in MSR_HIGH_RANGE:
        offset = MSR_BITMAP_WRITE_HIGH if write else MSR_BITMAP_READ_HIGH
    else:
        return True
    return _bitmap_bit(memory, ctl.msr_bitmap + offset, msr & 0x1FFF)


def vmcs_shadowing_exits(ctl: ExecControls, memory: PhysicalMemory, encoding: int, write: bool) -> bool:
    """Whether VMREAD (``write`` False) or VMWRITE of the field ``encoding`` -- the register
    operand, 64 bits in 64-bit mode, else 32 -- causes a VM exit (SDM 26.1.3 "VMREAD"/"VMWRITE",
    25.6.15): always unless "VMCS shadowing" is 1; then if any bit above 14 of the operand is
    set, or bit ``encoding[14:0]`` of the VMREAD/VMWRITE bitmap is set."""
    if not ctl.vmcs_shadowing:
        return True
    if encoding >> 15:
        return True
    bitmap = ctl.vmwrite_bitmap if write else ctl.vmread_bitmap
    return _bitmap_bit(memory, bitmap, encoding)


# --- control registers ------------------------------------------------------------------------------
def _masked_write_exits(mask: int, shadow: int, value: int) -> bool:
    return bool((value ^ shadow) & mask)


def mov_to_cr0_exits(ctl: ExecControls, value: int) -> bool:
    """MOV to CR0 exits unless, for every bit set in the CR0 guest/host mask, the source
    operand equals the CR0 read shadow (SDM 26.1.3 "MOV to CR0").  ``value`` is the source
    operand (zero-extended from 32 bits outside 64-bit mode)."""
    return _masked_write_exits(ctl.cr0_mask, ctl.cr0_shadow, value)


def mov_to_cr4_exits(ctl: ExecControls, value: int) -> bool:
    """MOV to CR4 exits unless, for every bit set in the CR4 guest/host mask, the source
    operand equals the CR4 read shadow (SDM 26.1.3 "MOV to CR4")."""
    return _masked_write_exits(ctl.cr4_mask, ctl.cr4_shadow, value)


def mov_to_cr3_exits(ctl: ExecControls, value: int) -> bool:
    """MOV to CR3 exits if "CR3-load exiting" is 1 and the source operand is none of the first
    CR3-target-count CR3-target values (SDM 26.1.3 "MOV to CR3")."""
    return ctl.cr3_load_exiting and value not in ctl.cr3_targets


def clts_exits(ctl: ExecControls) -> bool:
    """CLTS exits if CR0.TS (bit 3) is set in both the CR0 guest/host mask and the CR0 read
    shadow (SDM 26.1.3 "CLTS")."""
    return bool(ctl.cr0_mask & ctl.cr0_shadow & CR0_TS)


def lmsw_exits(ctl: ExecControls, source: int) -> bool:
    """LMSW exits if it would make CR0[3:0] differ from the read shadow in a bit the guest/host
    mask owns (SDM 26.1.3 "LMSW"): PE is set in the mask and the source and clear in the shadow
    (LMSW cannot clear PE), or one of MP, EM, TS is set in the mask and differs between the
    source and the shadow."""
    mask, shadow = ctl.cr0_mask, ctl.cr0_shadow
    if mask & source & CR0_PE and not shadow & CR0_PE:
        return True
    return bool(mask & (CR0_MP | CR0_EM | CR0_TS) & (source ^ shadow))


def cr_read_value(real: int, mask: int, shadow: int) -> int:
    """What MOV from CR0/CR4 and SMSW return (SDM 26.3): the read shadow's bits where the
    guest/host mask is set, the register's own bits elsewhere."""
    return (real & ~mask) | (shadow & mask)


def cr_write_result(old_real: int, value: int, mask: int) -> int:
    """CR0/CR4 after a MOV to CR that did not exit (SDM 26.3): bits set in the guest/host mask
    keep their value, the others come from the source operand.  (The #GP checks on the result
    are the caller's.)"""
    return ((old_real & mask) | (value & ~mask)) & _MASK64


def clts_result(old_cr0: int, mask: int) -> int:
    """CR0 after a CLTS that did not exit (SDM 26.3): TS is cleared unless the mask owns it."""
    return old_cr0 if mask & CR0_TS else old_cr0 & ~CR0_TS


def lmsw_result(old_cr0: int, source: int, mask: int) -> int:
    """CR0 after an LMSW that did not exit (SDM 26.3): only bits 3:0 can change, bits set in
    the guest/host mask keep their value, and PE can be set but not cleared."""
    guest = LMSW_BITS & ~mask
    new = (old_cr0 & ~guest) | (source & guest)
    if guest & CR0_PE:
        new |= old_cr0 & CR0_PE
    return new & _MASK64


# --- exceptions ------------------------------------------------------------------------------------
def exception_exits(ctl: ExecControls, vector: int, error_code: int = 0) -> bool:
    """Whether an exception (hardware exception, INT3, INTO, INT1, BOUND...) causes a VM exit
    (SDM 26.2): the bit ``vector`` of the exception bitmap -- except for #PF, where the bit
    applies if (error code AND PFEC_MASK) = PFEC_MATCH and its opposite applies otherwise.
    Vectors of 32 and above are never exceptions (INT n does not consult the bitmap)."""
    if not 0 <= vector < 32:
        return False
    bit = bool(ctl.exception_bitmap >> vector & 1)
    if vector == _PF_VECTOR:
        match = (error_code & _MASK32 & ctl.pfec_mask) == ctl.pfec_match
        return bit == match
    return bit


_PF_VECTOR = int(ExceptionVector.PF)


# --- instructions whose decision needs only the controls --------------------------------------------
_UNCONDITIONAL: dict[InsnKind, ExitReason] = {
    InsnKind.CPUID: ExitReason.CPUID,
    InsnKind.GETSEC: ExitReason.GETSEC,
    InsnKind.INVD: ExitReason.INVD,
    InsnKind.XSETBV: ExitReason.XSETBV,
    InsnKind.VMCALL: ExitReason.VMCALL,
    InsnKind.VMCLEAR: ExitReason.VMCLEAR,
    InsnKind.VMLAUNCH: ExitReason.VMLAUNCH,
    InsnKind.VMPTRLD: ExitReason.VMPTRLD,
    InsnKind.VMPTRST: ExitReason.VMPTRST,
    InsnKind.VMRESUME: ExitReason.VMRESUME,
    InsnKind.VMXOFF: ExitReason.VMXOFF,
    InsnKind.VMXON: ExitReason.VMXON,
    InsnKind.INVEPT: ExitReason.INVEPT,
    InsnKind.INVVPID: ExitReason.INVVPID,
}

# Instructions that cause a VM exit when one control is 1 (SDM 26.1.3).
_Control = Callable[[ExecControls], bool]
_ONE_CONTROL: dict[InsnKind, tuple[_Control, ExitReason]] = {
    InsnKind.HLT: (lambda c: c.hlt_exiting, ExitReason.HLT),
    InsnKind.INVLPG: (lambda c: c.invlpg_exiting, ExitReason.INVLPG),
    InsnKind.MWAIT: (lambda c: c.mwait_exiting, ExitReason.MWAIT_INSTRUCTION),
    InsnKind.MONITOR: (lambda c: c.monitor_exiting, ExitReason.MONITOR_INSTRUCTION),
    InsnKind.RDPMC: (lambda c: c.rdpmc_exiting, ExitReason.RDPMC),
    InsnKind.RDTSC: (lambda c: c.rdtsc_exiting, ExitReason.RDTSC),
    InsnKind.WBINVD: (lambda c: c.wbinvd_exiting, ExitReason.WBINVD),
    InsnKind.WBNOINVD: (lambda c: c.wbinvd_exiting, ExitReason.WBINVD),
    InsnKind.RDRAND: (lambda c: c.rdrand_exiting, ExitReason.RDRAND),
    InsnKind.RDSEED: (lambda c: c.rdseed_exiting, ExitReason.RDSEED),
    InsnKind.LGDT: (lambda c: c.descriptor_table_exiting, ExitReason.GDTR_IDTR),
    InsnKind.LIDT: (lambda c: c.descriptor_table_exiting, ExitReason.GDTR_IDTR),
    InsnKind.SGDT: (lambda c: c.descriptor_table_exiting, ExitReason.GDTR_IDTR),
    InsnKind.SIDT: (lambda c: c.descriptor_table_exiting, ExitReason.GDTR_IDTR),
    InsnKind.LLDT: (lambda c: c.descriptor_table_exiting, ExitReason.LDTR_TR),
    InsnKind.LTR: (lambda c: c.descriptor_table_exiting, ExitReason.LDTR_TR),
    InsnKind.SLDT: (lambda c: c.descriptor_table_exiting, ExitReason.LDTR_TR),
    InsnKind.STR: (lambda c: c.descriptor_table_exiting, ExitReason.LDTR_TR),
    InsnKind.MOV_TO_DR: (lambda c: c.mov_dr_exiting, ExitReason.DR_ACCESS),
    InsnKind.MOV_FROM_DR: (lambda c: c.mov_dr_exiting, ExitReason.DR_ACCESS),
}

# Instructions that #UD when their "enable" control is 0, then exit on a second control.
_ENABLED_BY: dict[InsnKind, tuple[_Control, _Control | None, ExitReason | None]] = {
    InsnKind.RDTSCP: (lambda c: c.rdtscp_enabled, lambda c: c.rdtsc_exiting, ExitReason.RDTSCP),
    InsnKind.RDPID: (lambda c: c.rdtscp_enabled, None, None),
    InsnKind.INVPCID: (lambda c: c.invpcid_enabled, lambda c: c.invlpg_exiting, ExitReason.INVPCID),
    InsnKind.UMWAIT: (lambda c: c.user_wait_pause_enabled, lambda c: c.rdtsc_exiting, ExitReason.UMWAIT),
    InsnKind.TPAUSE: (lambda c: c.user_wait_pause_enabled, lambda c: c.rdtsc_exiting, ExitReason.TPAUSE),
    InsnKind.UMONITOR: (lambda c: c.user_wait_pause_enabled, None, None),
    InsnKind.XSAVES: (lambda c: c.xsaves_enabled, None, None),  # then xsaves_exits()
    InsnKind.XRSTORS: (lambda c: c.xsaves_enabled, None, None),  # then xsaves_exits()
    InsnKind.VMFUNC: (lambda c: c.vmfunc_enabled, None, None),  # then vmfunc_exits()
}

OPERAND_DEPENDENT_KINDS: frozenset[InsnKind] = frozenset({
    InsnKind.IN, InsnKind.OUT, InsnKind.INS, InsnKind.OUTS,  # io_exits
    InsnKind.RDMSR, InsnKind.WRMSR,  # msr_exits
    InsnKind.CLTS, InsnKind.LMSW,  # clts_exits, lmsw_exits
    InsnKind.PAUSE,  # pause_exits
    InsnKind.VMREAD, InsnKind.VMWRITE,  # vmcs_shadowing_exits (when shadowing is on)
    InsnKind.VMFUNC,  # vmfunc_exits
    InsnKind.ENCLS, InsnKind.ENCLV,  # encls_exits, enclv_exits
    InsnKind.XSAVES, InsnKind.XRSTORS,  # xsaves_exits
})
"""Kinds for which :func:`instruction_exits` may return None although the instruction can
exit: the decision also needs operand values (MOV to CR0/CR3/CR4 belong here too, by CR)."""


def instruction_exits(ctl: ExecControls, insn: DecodedInsn) -> ExitReason | InstructionFault | None:
    """The VM exit an instruction causes when the controls alone decide it (SDM 26.1.2,
    26.1.3), :data:`InjectUD` when the instruction's "enable" control is 0 (SDM 26.3: RDTSCP,
    RDPID, INVPCID, UMONITOR/UMWAIT/TPAUSE, XSAVES/XRSTORS; 26.5 for VMFUNC), else None.

    None does not always mean "no exit": for :data:`OPERAND_DEPENDENT_KINDS` and MOV to
    CR0/CR3/CR4 the specific functions decide with the operand values.  MOV to/from CR8 (64-bit
    mode only) exits on "CR8-load/store exiting"; MOV from CR3 on "CR3-store exiting".  With
    "use TPR shadow", a CR8 access that does not exit is virtualized (SDM 29.3): the caller's.
    """
    kind = insn.kind
    if kind is None:
        return None
    reason = _UNCONDITIONAL.get(kind)
    if reason is not None:
        return reason
    one = _ONE_CONTROL.get(kind)
    if one is not None:
        control, reason = one
        return reason if control(ctl) else None
    enabled = _ENABLED_BY.get(kind)
    if enabled is not None:
        enable, exiting, reason = enabled
        if not enable(ctl):
            return InjectUD
        if exiting is not None and exiting(ctl):
            return reason
        return None
    if kind is InsnKind.VMREAD or kind is InsnKind.VMWRITE:
        # Without VMCS shadowing both exit unconditionally (SDM 26.1.2 footnote, 26.1.3).
        if ctl.vmcs_shadowing:
            return None
        return ExitReason.VMREAD if kind is InsnKind.VMREAD else ExitReason.VMWRITE
    if kind is InsnKind.MOV_TO_CR and insn.cr == 8:
        return ExitReason.CR_ACCESS if ctl.cr8_load_exiting else None
    if kind is InsnKind.MOV_FROM_CR:
        if insn.cr == 3 and ctl.cr3_store_exiting:
            return ExitReason.CR_ACCESS
        if insn.cr == 8 and ctl.cr8_store_exiting:
            return ExitReason.CR_ACCESS
    return None


# --- instructions whose decision needs operand values -------------------------------------------------
def xsaves_exits(ctl: ExecControls, edx_eax: int, ia32_xss: int) -> bool:
    """XSAVES/XRSTORS ("enable XSAVES/XRSTORS" = 1) exit if EDX:EAX AND IA32_XSS AND the
    XSS-exiting bitmap is not zero (SDM 26.1.3 "XRSTORS"/"XSAVES")."""
    return ctl.xsaves_enabled and bool(edx_eax & ia32_xss & ctl.xss_exit_bitmap)


def vmfunc_exits(ctl: ExecControls, function: int) -> bool:
    """VMFUNC ("enable VM functions" = 1) exits if the function in EAX is 64 or above or its bit
    in the VM-function controls is 0 (SDM 26.5, "VM Functions").  A failure of the function itself (EPTP
    switching with ECX >= 512 or an invalid EPTP-list entry) also exits: the caller's."""
    function &= _MASK32
    return function >= 64 or not ctl.vm_function_controls >> function & 1


def _leaf_bitmap_exits(bitmap: int, eax: int) -> bool:
    return bool(bitmap >> min(eax & _MASK32, 63) & 1)


def encls_exits(ctl: ExecControls, eax: int) -> bool:
    """ENCLS exits if "enable ENCLS exiting" is 1 and bit EAX of the ENCLS-exiting bitmap is 1,
    bit 63 standing for all leaves from 63 up (SDM 26.1.3 "ENCLS")."""
    return ctl.encls_exiting and _leaf_bitmap_exits(ctl.encls_exiting_bitmap, eax)


def enclv_exits(ctl: ExecControls, eax: int) -> bool:
    """ENCLV exits if "enable ENCLV exiting" is 1 and bit EAX (63 for EAX >= 63) of the
    ENCLV-exiting bitmap is 1 (SDM 26.1.3 "ENCLV")."""
    return ctl.enclv_exiting and _leaf_bitmap_exits(ctl.enclv_exiting_bitmap, eax)


@dataclass(frozen=True, slots=True)
class PauseLoopState:
    """PAUSE-loop exiting bookkeeping (SDM 26.1.3 "PAUSE"): the TSC-rate time of the last PAUSE
    at CPL 0 and of the PAUSE considered the first of the current loop.  A new VM entry starts
    from ``PauseLoopState()``."""

    last: int | None = None
    loop_start: int | None = None


def pause_exits(ctl: ExecControls, cpl: int, now: int, state: PauseLoopState) -> tuple[bool, PauseLoopState]:
    """Whether PAUSE exits, and the PAUSE-loop state afterwards (SDM 26.1.3 "PAUSE").

    "PAUSE exiting" = 1: always.  Otherwise, with "PAUSE-loop exiting" = 1 and CPL 0: a PAUSE
    more than PLE_Gap after the previous one at CPL 0 (or the first after VM entry) starts a
    loop; the PAUSE exits if more than PLE_Window has passed since the start of the loop.
    """
    if ctl.pause_exiting:
        return True, state
    if not ctl.pause_loop_exiting or cpl != 0:
        return False, state
    loop_start = state.loop_start
    if state.last is None or loop_start is None or now - state.last > ctl.ple_gap:
        loop_start = now
    if now - loop_start > ctl.ple_window:
        return True, PauseLoopState()
    return False, PauseLoopState(last=now, loop_start=loop_start)


def guest_tsc(ctl: ExecControls, tsc: int) -> int:
    """What RDTSC, RDTSCP and RDMSR of IA32_TIME_STAMP_COUNTER return when they do not exit
    (SDM 26.3): with "use TSC offsetting", the TSC -- first multiplied by the TSC multiplier
    and shifted right 48 bits if "use TSC scaling" -- plus the (signed) TSC offset."""
    if not ctl.use_tsc_offsetting:
        return tsc & _MASK64
    if ctl.use_tsc_scaling:
        tsc = (tsc * ctl.tsc_multiplier) >> 48
    return (tsc + ctl.tsc_offset) & _MASK64


# --- exit qualifications (SDM 28.2.1) ---------------------------------------------------------------
class CrAccessType(enum.IntEnum):
    """Bits 5:4 of the control-register-access exit qualification (SDM Table 28-3)."""

    MOV_TO_CR = q.CR_ACCESS_TYPE_MOV_TO_CR
    MOV_FROM_CR = q.CR_ACCESS_TYPE_MOV_FROM_CR
    CLTS = q.CR_ACCESS_TYPE_CLTS
    LMSW = q.CR_ACCESS_TYPE_LMSW


def _check_range(name: str, value: int, limit: int) -> None:
    if not 0 <= value < limit:
        raise ValueError(f"{name} must be in 0..{limit - 1}, not {value!r}")


@dataclass(frozen=True, slots=True)
class CrAccessQualification:
    """Exit qualification for control-register accesses (SDM 28.2.1, Table 28-3).  The CR
    number and GPR are 0 for CLTS and LMSW; the LMSW fields are 0 for the others."""

    cr: int
    access_type: CrAccessType
    gpr: int = 0
    lmsw_memory: bool = False
    lmsw_source: int = 0

    def encode(self) -> int:
        _check_range("CR number", self.cr, 16)
        _check_range("GPR", self.gpr, 16)
        access = CrAccessType(self.access_type)
        value = access << q.CR_ACCESS_TYPE_SHIFT
        if access in (CrAccessType.MOV_TO_CR, CrAccessType.MOV_FROM_CR):
            value |= self.cr | self.gpr << q.CR_ACCESS_REG_SHIFT
        elif access is CrAccessType.LMSW:
            value |= (self.lmsw_source & 0xFFFF) << q.LMSW_SOURCE_DATA_SHIFT
            if self.lmsw_memory:
                value |= q.CR_ACCESS_LMSW_MEMORY
        return value

    @classmethod
    def decode(cls, value: int) -> CrAccessQualification:
        return cls(
            cr=value & q.CR_ACCESS_NUM_MASK,
            access_type=CrAccessType(value >> q.CR_ACCESS_TYPE_SHIFT & 3),
            gpr=value >> q.CR_ACCESS_REG_SHIFT & 0xF,
            lmsw_memory=bool(value & q.CR_ACCESS_LMSW_MEMORY),
            lmsw_source=value >> q.LMSW_SOURCE_DATA_SHIFT & 0xFFFF,
        )


def cr_access_qualification(
    cr: int, access_type: int, gpr: int, lmsw_source: int = 0, lmsw_memory: bool = False
) -> int:
    """Exit qualification for MOV to/from CR, CLTS and LMSW (SDM Table 28-3)."""
    return CrAccessQualification(cr, CrAccessType(access_type), gpr, lmsw_memory, lmsw_source).encode()


@dataclass(frozen=True, slots=True)
class MovDrQualification:
    """Exit qualification for MOV DR (SDM 28.2.1, Table 28-4)."""

    dr: int
    to_dr: bool
    gpr: int

    def encode(self) -> int:
        _check_range("DR number", self.dr, 8)
        _check_range("GPR", self.gpr, 16)
        direction = 0 if self.to_dr else q.DR_ACCESS_FROM_DR
        return self.dr | direction | self.gpr << q.DR_ACCESS_REG_SHIFT

    @classmethod
    def decode(cls, value: int) -> MovDrQualification:
        return cls(
            dr=value & q.DR_ACCESS_NUM_MASK,
            to_dr=not value & q.DR_ACCESS_FROM_DR,
            gpr=value >> q.DR_ACCESS_REG_SHIFT & 0xF,
        )


def mov_dr_qualification(dr: int, to_dr: bool, gpr: int) -> int:
    """Exit qualification for MOV DR (SDM Table 28-4): bit 4 is 0 for MOV to DR."""
    return MovDrQualification(dr, to_dr, gpr).encode()


@dataclass(frozen=True, slots=True)
class IoQualification:
    """Exit qualification for I/O instructions (SDM 28.2.1, Table 28-5)."""

    size: int
    is_in: bool
    string: bool
    rep: bool
    immediate: bool
    port: int

    def encode(self) -> int:
        if self.size not in (1, 2, 4):
            raise ValueError(f"I/O size must be 1, 2 or 4, not {self.size!r}")
        _check_range("port", self.port, IO_PORT_LIMIT)
        return (
            (self.size - 1)
            | (q.IO_QUAL_IN if self.is_in else 0)
            | (q.IO_QUAL_STRING if self.string else 0)
            | (q.IO_QUAL_REP if self.rep else 0)
            | (q.IO_QUAL_IMMEDIATE if self.immediate else 0)
            | self.port << q.IO_QUAL_PORT_SHIFT
        )

    @classmethod
    def decode(cls, value: int) -> IoQualification:
        return cls(
            size=(value & q.IO_QUAL_SIZE_MASK) + 1,
            is_in=bool(value & q.IO_QUAL_IN),
            string=bool(value & q.IO_QUAL_STRING),
            rep=bool(value & q.IO_QUAL_REP),
            immediate=bool(value & q.IO_QUAL_IMMEDIATE),
            port=value >> q.IO_QUAL_PORT_SHIFT & 0xFFFF,
        )


def io_qualification(size: int, is_in: bool, string: bool, rep: bool, immediate: bool, port: int) -> int:
    """Exit qualification for IN, INS, OUT, OUTS (SDM Table 28-5)."""
    return IoQualification(size, is_in, string, rep, immediate, port).encode()


def mwait_qualification(monitor_armed: bool) -> int:
    """Exit qualification for MWAIT (SDM 28.2.1): bit 0 is 1 if the monitoring hardware was
    armed when MWAIT executed."""
    return int(monitor_armed)


def exit_qualification_for_memory_operand(memory: MemOperand | None, rip_next: int) -> int:
    """Exit qualification of the instructions that report their displacement -- INVEPT,
    INVPCID, INVVPID, LGDT, LIDT, LLDT, LTR, SGDT, SIDT, SLDT, STR, VMCLEAR, VMPTRLD, VMPTRST,
    VMREAD, VMWRITE, VMXON (SDM 28.2.1): the displacement sign-extended to 64 bits; for
    RIP-relative operands, the displacement plus the RIP of the next instruction; 0 for a
    register operand.  (INVLPG reports the linear address instead: the caller computes it.)"""
    if memory is None:
        return 0
    if memory.rip_relative:
        return (rip_next + memory.displacement) & _MASK64
    return memory.displacement & _MASK64


# --- VM-exit instruction information (SDM 28.2.5) ----------------------------------------------------
_ADDRESS_SIZE_CODE = {16: 0, 32: 1, 64: 2}
_ADDRESS_SIZE_BITS = {code: bits for bits, code in _ADDRESS_SIZE_CODE.items()}
_SCALING_CODE = {1: 0, 2: 1, 4: 2, 8: 3}
_OPERAND_SIZE_CODE = {16: 0, 32: 1, 64: 2}


@dataclass(frozen=True, slots=True)
class InstructionInfo:
    """The VM-exit instruction-information field (SDM 28.2.5, Tables 28-9 to 28-15) as raw
    bit fields; each layout defines a subset and leaves the rest undefined (encoded as 0).

    ``address_size`` and ``operand_size`` are the 3-bit and 2-bit codes (0 = 16-bit, 1 = 32,
    2 = 64); ``reg2`` also carries the descriptor-table "instruction identity" (bits 29:28).
    """

    scaling: int = 0  # 1:0
    reg1: int = 0  # 6:3
    address_size: int = 0  # 9:7
    register_operand: bool = False  # 10
    operand_size: int = 0  # 12:11 (bit 11 alone for LGDT/LIDT/SGDT/SIDT)
    segment: int = 0  # 17:15
    index: int = 0  # 21:18
    index_invalid: bool = False  # 22
    base: int = 0  # 26:23
    base_invalid: bool = False  # 27
    reg2: int = 0  # 31:28

    def encode(self) -> int:
        return (
            (self.scaling & 3)
            | (self.reg1 & 0xF) << q.INSN_INFO_REG1_SHIFT
            | (self.address_size & 7) << q.INSN_INFO_ADDRESS_SIZE_SHIFT
            | (q.INSN_INFO_MEM_REG_BIT if self.register_operand else 0)
            | (self.operand_size & 3) << q.INSN_INFO_RDRAND_OPERAND_SIZE_SHIFT
            | (self.segment & 7) << q.INSN_INFO_SEGMENT_SHIFT
            | (self.index & 0xF) << q.INSN_INFO_INDEX_SHIFT
            | (q.INSN_INFO_INDEX_INVALID if self.index_invalid else 0)
            | (self.base & 0xF) << q.INSN_INFO_BASE_SHIFT
            | (q.INSN_INFO_BASE_INVALID if self.base_invalid else 0)
            | (self.reg2 & 0xF) << q.INSN_INFO_REG2_SHIFT
        )

    @classmethod
    def decode(cls, value: int) -> InstructionInfo:
        return cls(
            scaling=value & q.INSN_INFO_SCALING_MASK,
            reg1=value >> q.INSN_INFO_REG1_SHIFT & 0xF,
            address_size=value >> q.INSN_INFO_ADDRESS_SIZE_SHIFT & 7,
            register_operand=bool(value & q.INSN_INFO_MEM_REG_BIT),
            operand_size=value >> q.INSN_INFO_RDRAND_OPERAND_SIZE_SHIFT & 3,
            segment=value >> q.INSN_INFO_SEGMENT_SHIFT & 7,
            index=value >> q.INSN_INFO_INDEX_SHIFT & 0xF,
            index_invalid=bool(value & q.INSN_INFO_INDEX_INVALID),
            base=value >> q.INSN_INFO_BASE_SHIFT & 0xF,
            base_invalid=bool(value & q.INSN_INFO_BASE_INVALID),
            reg2=value >> q.INSN_INFO_REG2_SHIFT & 0xF,
        )

    @property
    def address_size_bits(self) -> int | None:
        return _ADDRESS_SIZE_BITS.get(self.address_size)

    @property
    def index_register(self) -> int | None:
        return None if self.index_invalid else self.index

    @property
    def base_register(self) -> int | None:
        return None if self.base_invalid else self.base

    @property
    def scale(self) -> int:
        return 1 << self.scaling


def _memory_info(memory: MemOperand, reg2: int = 0) -> InstructionInfo:
    """Scaling, address size, segment, index and base of a memory operand (SDM 28.2.5), with
    the invalid bits for an absent index or base (a RIP-relative operand has neither)."""
    return InstructionInfo(
        scaling=_SCALING_CODE[memory.scale] if memory.index is not None else 0,
        address_size=_ADDRESS_SIZE_CODE[memory.address_size],
        segment=memory.segment,
        index=memory.index or 0,
        index_invalid=memory.index is None,
        base=memory.base or 0,
        base_invalid=memory.base is None,
        reg2=reg2,
    )


def ins_outs_instruction_info(address_size: int, segment: int) -> int:
    """VM-exit instruction information for INS and OUTS (SDM Table 28-9): the address size and,
    for OUTS, the segment register (undefined for INS)."""
    _check_range("segment", segment, 6)
    return InstructionInfo(address_size=_ADDRESS_SIZE_CODE[address_size], segment=segment).encode()


_DESCRIPTOR_IDENTITY = {
    InsnKind.SGDT: q.GDTR_IDTR_SGDT,
    InsnKind.SIDT: q.GDTR_IDTR_SIDT,
    InsnKind.LGDT: q.GDTR_IDTR_LGDT,
    InsnKind.LIDT: q.GDTR_IDTR_LIDT,
    InsnKind.SLDT: q.LDTR_TR_SLDT,
    InsnKind.STR: q.LDTR_TR_STR,
    InsnKind.LLDT: q.LDTR_TR_LLDT,
    InsnKind.LTR: q.LDTR_TR_LTR,
}
_GDTR_IDTR_KINDS = frozenset({InsnKind.SGDT, InsnKind.SIDT, InsnKind.LGDT, InsnKind.LIDT})


def _require(insn: DecodedInsn, kinds: Container[InsnKind]) -> InsnKind:
    kind = insn.kind
    if kind is None or kind not in kinds:
        raise ValueError(f"no such VM-exit instruction information for {insn.text!r}")
    return kind


def descriptor_table_instruction_info(insn: DecodedInsn, identity: int | None = None) -> int:
    """VM-exit instruction information for LGDT, LIDT, SGDT, SIDT (SDM Table 28-10) and LLDT,
    LTR, SLDT, STR (Table 28-11); ``identity`` (bits 29:28) defaults to the instruction's own.

    GDTR/IDTR: bit 11 is the operand size (1 = 32-bit; undefined in 64-bit mode, where it is
    set).  LDTR/TR: a register operand sets bit 10 and its number in bits 6:3.
    """
    kind = _require(insn, _DESCRIPTOR_IDENTITY)
    ident = _DESCRIPTOR_IDENTITY[kind] if identity is None else identity
    _check_range("instruction identity", ident, 4)
    if insn.memory is not None:
        info = _memory_info(insn.memory, reg2=ident)
    else:
        info = InstructionInfo(reg2=ident, register_operand=True, reg1=insn.gpr or 0)
    if kind in _GDTR_IDTR_KINDS and insn.operand_size >= 32:
        info = dataclasses.replace(info, operand_size=1)
    return info.encode()


_VMX_MEMORY_ONLY = frozenset({
    InsnKind.VMCLEAR, InsnKind.VMPTRLD, InsnKind.VMPTRST, InsnKind.VMXON,
    InsnKind.XSAVES, InsnKind.XRSTORS,
})
_VMX_REG2 = frozenset({
    InsnKind.VMREAD, InsnKind.VMWRITE, InsnKind.INVEPT, InsnKind.INVVPID, InsnKind.INVPCID,
})


def vmx_instruction_info(insn: DecodedInsn) -> int:
    """VM-exit instruction information for VMCLEAR, VMPTRLD, VMPTRST, VMXON, XSAVES, XRSTORS
    (SDM Table 28-13: memory operand, bit 10 = 0), VMREAD and VMWRITE (Table 28-14: Reg1 or
    memory, bit 10 = 1 for a register, Reg2 the field-encoding register) and INVEPT, INVPCID,
    INVVPID (Table 28-12: memory operand, Reg2 the type register)."""
    kind = _require(insn, _VMX_MEMORY_ONLY | _VMX_REG2)
    reg2 = insn.reg2 or 0 if kind in _VMX_REG2 else 0
    if insn.memory is not None:
        return _memory_info(insn.memory, reg2=reg2).encode()
    if kind not in (InsnKind.VMREAD, InsnKind.VMWRITE):
        raise ValueError(f"{insn.text!r} has no memory operand")
    return InstructionInfo(reg1=insn.gpr or 0, register_operand=True, reg2=reg2).encode()


def rdrand_instruction_info(gpr: int, operand_size: int) -> int:
    """VM-exit instruction information for RDRAND and RDSEED (SDM Table 28-15): the destination
    register (bits 6:3) and operand size (bits 12:11).  TPAUSE and UMWAIT use the same layout
    with the operand size undefined."""
    _check_range("GPR", gpr, 16)
    return InstructionInfo(reg1=gpr, operand_size=_OPERAND_SIZE_CODE[operand_size]).encode()
