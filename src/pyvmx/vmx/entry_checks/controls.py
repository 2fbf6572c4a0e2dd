"""SDM 27.2.1 Checks on VMX Controls: the VM-execution, VM-exit and VM-entry control fields
(a broken rule fails VMLAUNCH/VMRESUME with VMfailValid, error 7).

The modelled processor has no dual-monitor treatment, shadow VMCS, SGX, Intel PT, CET, PML, VM
functions or APIC virtualization: rules about controls that the profile can never enable are
noted where the SDM lists them (the reserved-bit checks of 27.2.1.1 already reject those controls).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmx.arch.controls import (
    INTR_INFO_DELIVER_CODE_MASK,
    INTR_INFO_RESVD_BITS_MASK,
    VMX_BASIC_NO_HW_ERROR_CODE_CC,
    VMX_EPT_AD_BIT,
    VMX_EPT_PAGE_WALK_4_BIT,
    VMX_EPT_PAGE_WALK_5_BIT,
    VMX_EPTP_AD_ENABLE_BIT,
    VMX_EPTP_MT_MASK,
    VMX_EPTP_MT_UC,
    VMX_EPTP_MT_WB,
    VMX_EPTP_PWL_4,
    VMX_EPTP_PWL_5,
    VMX_EPTP_PWL_MASK,
    VMX_EPTP_UC_BIT,
    VMX_EPTP_WB_BIT,
    VMX_MISC_ZERO_LEN_INS,
    InterruptionType,
)
from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.controls import VmEntryControls as E
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.vmcs_fields import VmcsField
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import EXCEPTIONS_WITH_ERROR_CODE, Cr0, ExceptionVector
from pyvmx.vmx.entry_checks.context import EntryContext
from pyvmx.vmx.entry_checks.registry import control

if TYPE_CHECKING:
    from pyvmx.vmx.caps import CpuProfile

# The VTPR byte on the virtual-APIC page (SDM 30.1.1).  TODO(arch): move (Linux APIC_TASKPRI).
_APIC_TASKPRI = 0x80

# Interruption types whose injection uses the VM-entry instruction length (SDM 27.2.1.3).
_SOFTWARE_EVENT_TYPES = (
    InterruptionType.SOFT_INTR, InterruptionType.PRIV_SW_EXCEPTION, InterruptionType.SOFT_EXCEPTION,
)

# EPTP bits 11:7: reserved on this processor (bit 7, supervisor shadow-stack control, needs CET).
_EPTP_RESERVED_11_7 = 0xF80


# =================================================================================================
# SDM 27.2.1 Checks on VMX Controls (VMfailValid, error 7)
# =================================================================================================

# --- 27.2.1.1 VM-execution control fields --------------------------------------------------------
@control("27.2.1.1")
def pin_based_reserved_bits(e: EntryContext) -> str | None:
    if e.profile.controls("pin_based").violations(e.pin):
        return "reserved bits in the pin-based VM-execution controls must be set properly"
    return None


@control("27.2.1.1")
def primary_proc_based_reserved_bits(e: EntryContext) -> str | None:
    if e.profile.controls("proc_based").violations(e.proc):
        return "reserved bits in the primary processor-based VM-execution controls must be set properly"
    return None


@control("27.2.1.1")
def secondary_proc_based_reserved_bits(e: EntryContext) -> str | None:
    # e.secondary is 0 unless "activate secondary controls" is 1: then nothing is checked.
    if e.profile.controls("secondary").violations(e.secondary):
        return "reserved bits in the secondary processor-based VM-execution controls must be cleared"
    return None


# Tertiary processor-based controls: not supported ("activate tertiary controls" is reserved).


@control("27.2.1.1")
def cr3_target_count(e: EntryContext) -> str | None:
    if e.read(F.CR3_TARGET_COUNT) > e.profile.cr3_target_count:
        return "the CR3-target count must not be greater than the number IA32_VMX_MISC[24:16] reports"
    return None


@control("27.2.1.1")
def io_bitmap_addresses(e: EntryContext) -> str | None:
    if not e.proc & C.USE_IO_BITMAPS:
        return None
    for name, field in (("A", F.IO_BITMAP_A), ("B", F.IO_BITMAP_B)):
        address = e.read(field)
        if address & 0xFFF or e.beyond_phys_width(address):
            return (
                f"I/O-bitmap address {name} must be 4-KByte aligned and within the physical-address "
                "width (\"use I/O bitmaps\" = 1)"
            )
    return None


@control("27.2.1.1")
def msr_bitmap_address(e: EntryContext) -> str | None:
    if not e.proc & C.USE_MSR_BITMAPS:
        return None
    address = e.read(F.MSR_BITMAP)
    if address & 0xFFF or e.beyond_phys_width(address):
        return (
            "the MSR-bitmap address must be 4-KByte aligned and within the physical-address width "
            "(\"use MSR bitmaps\" = 1)"
        )
    return None


@control("27.2.1.1")
def virtual_apic_address(e: EntryContext) -> str | None:
    if not e.proc & C.TPR_SHADOW:
        return None
    address = e.read(F.VIRTUAL_APIC_PAGE_ADDR)
    if address & 0xFFF or e.beyond_phys_width(address):
        return (
            "the virtual-APIC address must be 4-KByte aligned and within the physical-address width "
            "(\"use TPR shadow\" = 1)"
        )
    return None


@control("27.2.1.1")
def tpr_threshold_reserved_bits(e: EntryContext) -> str | None:
    if e.proc & C.TPR_SHADOW and not e.secondary & S.VIRTUAL_INTR_DELIVERY:
        if e.read(F.TPR_THRESHOLD) & 0xFFFFFFF0:
            return "bits 31:4 of the TPR threshold must be 0 (\"use TPR shadow\" = 1)"
    return None


@control("27.2.1.1")
def tpr_threshold_vs_vtpr(e: EntryContext) -> str | None:
    if not e.proc & C.TPR_SHADOW or e.secondary & (S.VIRTUALIZE_APIC_ACCESSES | S.VIRTUAL_INTR_DELIVERY):
        return None
    vtpr_address = e.read(F.VIRTUAL_APIC_PAGE_ADDR) + _APIC_TASKPRI
    vtpr = e.read_physical(vtpr_address, 1)
    if e.read(F.TPR_THRESHOLD) & 0xF > vtpr >> 4:
        return "TPR threshold bits 3:0 must not be greater than VTPR bits 7:4 (\"use TPR shadow\" = 1)"
    return None


@control("27.2.1.1")
def apic_virtualization_requires_tpr_shadow(e: EntryContext) -> str | None:
    apicv = S.VIRTUALIZE_X2APIC_MODE | S.APIC_REGISTER_VIRT | S.VIRTUAL_INTR_DELIVERY
    if not e.proc & C.TPR_SHADOW and e.secondary & apicv:
        return (
            "\"virtualize x2APIC mode\", \"APIC-register virtualization\" and \"virtual-interrupt "
            "delivery\" must be 0 when \"use TPR shadow\" is 0"
        )
    return None


@control("27.2.1.1")
def virtual_nmis_require_nmi_exiting(e: EntryContext) -> str | None:
    if not e.pin & P.NMI_EXITING and e.pin & P.VIRTUAL_NMIS:
        return "\"virtual NMIs\" must be 0 when \"NMI exiting\" is 0"
    return None


@control("27.2.1.1")
def nmi_window_exiting_requires_virtual_nmis(e: EntryContext) -> str | None:
    if not e.pin & P.VIRTUAL_NMIS and e.proc & C.NMI_WINDOW_EXITING:
        return "\"NMI-window exiting\" must be 0 when \"virtual NMIs\" is 0"
    return None


# The APIC-access address, "virtualize x2APIC mode" vs "virtualize APIC accesses", "virtual-
# interrupt delivery" vs "external-interrupt exiting" and posted interrupts: this processor has no
# APIC virtualization (those controls are reserved in its capability MSRs).


@control("27.2.1.1")
def vpid_nonzero(e: EntryContext) -> str | None:
    if e.secondary & S.ENABLE_VPID and e.read(F.VIRTUAL_PROCESSOR_ID) == 0:
        return "the VPID must not be 0000H (\"enable VPID\" = 1)"
    return None


@control("27.2.1.1")
def eptp_valid(e: EntryContext) -> str | None:
    if not e.ept:
        return None
    broken = eptp_violation(e.read(F.EPT_POINTER), e.profile)
    return None if broken is None else f"EPTP (\"enable EPT\" = 1): {broken}"


# "enable PML": not supported.


@control("27.2.1.1")
def unrestricted_guest_requires_ept(e: EntryContext) -> str | None:
    if e.unrestricted_guest and not e.ept:
        return "\"unrestricted guest\" requires \"enable EPT\""
    return None


# Sub-page write permissions, mode-based execute control for EPT, VM functions, VMCS shadowing,
# EPT-violation #VE, Intel PT, HLAT, IPI virtualization: not supported.


def eptp_violation(eptp: int, profile: CpuProfile) -> str | None:
    """The EPTP rule of SDM 27.2.1.1 that ``eptp`` breaks, or None if it is valid (the same
    checks INVEPT makes on its descriptor, SDM 31.3 "INVEPT")."""
    cap = profile.ept_vpid_cap
    memory_type = eptp & VMX_EPTP_MT_MASK
    if not (
        (memory_type == VMX_EPTP_MT_UC and cap & VMX_EPTP_UC_BIT)
        or (memory_type == VMX_EPTP_MT_WB and cap & VMX_EPTP_WB_BIT)
    ):
        return "the EPT memory type (bits 2:0) must be one IA32_VMX_EPT_VPID_CAP supports (UC or WB)"
    walk = eptp & VMX_EPTP_PWL_MASK
    if not (
        (walk == VMX_EPTP_PWL_4 and cap & VMX_EPT_PAGE_WALK_4_BIT)
        or (walk == VMX_EPTP_PWL_5 and cap & VMX_EPT_PAGE_WALK_5_BIT)
    ):
        return "bits 5:3 (EPT page-walk length - 1) must indicate a supported walk length (4 or 5 levels)"
    if eptp & VMX_EPTP_AD_ENABLE_BIT and not cap & VMX_EPT_AD_BIT:
        return "bit 6 (enable accessed and dirty flags) must be 0 when IA32_VMX_EPT_VPID_CAP[21] is 0"
    if eptp & _EPTP_RESERVED_11_7:
        return "reserved bits 11:7 must be 0"
    if eptp >> profile.physical_address_width:
        return "bits beyond the physical-address width must be 0"
    return None


def eptp_is_valid(eptp: int, profile: CpuProfile) -> bool:
    """Whether ``eptp`` is a valid extended-page-table pointer for this processor (SDM 27.2.1.1)."""
    return eptp_violation(eptp, profile) is None


# --- 27.2.1.2 VM-exit control fields -------------------------------------------------------------
@control("27.2.1.2")
def exit_controls_reserved_bits(e: EntryContext) -> str | None:
    if e.profile.controls("exit_controls").violations(e.exit_controls):
        return "reserved bits in the primary VM-exit controls must be set properly"
    return None


# "activate secondary controls" (VM-exit): not supported.


@control("27.2.1.2")
def save_preemption_timer_requires_timer(e: EntryContext) -> str | None:
    if not e.pin & P.VMX_PREEMPTION_TIMER and e.exit_controls & X.SAVE_VMX_PREEMPTION_TIMER:
        return "\"save VMX-preemption timer value\" must be 0 when \"activate VMX-preemption timer\" is 0"
    return None


def _msr_area(e: EntryContext, name: str, count_field: VmcsField, address_field: VmcsField) -> str | None:
    """The MSR-area address rules shared by 27.2.1.2 and 27.2.1.3."""
    count = e.read(count_field)
    if count == 0:
        return None
    address = e.read(address_field)
    if address & 0xF:
        return f"the {name} address must be 16-byte aligned (count > 0)"
    if e.beyond_phys_width(address):
        return f"the {name} address must be within the physical-address width (count > 0)"
    if e.beyond_phys_width(address + 16 * count - 1):
        return f"the last byte of the {name} area must be within the physical-address width"
    return None


@control("27.2.1.2")
def exit_msr_store_area(e: EntryContext) -> str | None:
    return _msr_area(e, "VM-exit MSR-store", F.VM_EXIT_MSR_STORE_COUNT, F.VM_EXIT_MSR_STORE_ADDR)


@control("27.2.1.2")
def exit_msr_load_area(e: EntryContext) -> str | None:
    return _msr_area(e, "VM-exit MSR-load", F.VM_EXIT_MSR_LOAD_COUNT, F.VM_EXIT_MSR_LOAD_ADDR)


# --- 27.2.1.3 VM-entry control fields ------------------------------------------------------------
@control("27.2.1.3")
def entry_controls_reserved_bits(e: EntryContext) -> str | None:
    if e.profile.controls("entry_controls").violations(e.entry_controls):
        return "reserved bits in the VM-entry controls must be set properly"
    return None


@control("27.2.1.3")
def injection_type_not_reserved(e: EntryContext) -> str | None:
    if not e.injecting:
        return None
    if e.event_type == InterruptionType.RESERVED:
        return "VM-entry interruption information: interruption type 1 is reserved"
    if e.event_type == InterruptionType.OTHER_EVENT and not e.profile.supports(C.MONITOR_TRAP_FLAG):
        return (
            "VM-entry interruption information: interruption type 7 (other event) is reserved "
            "without \"monitor trap flag\" support"
        )
    return None


@control("27.2.1.3")
def injection_vector_matches_type(e: EntryContext) -> str | None:
    if not e.injecting:
        return None
    if e.event_type == InterruptionType.NMI_INTR and e.vector != ExceptionVector.NMI:
        return "VM-entry interruption information: an NMI must have vector 2"
    if e.event_type == InterruptionType.HARD_EXCEPTION and e.vector > 31:
        return "VM-entry interruption information: a hardware exception must have a vector at most 31"
    if e.event_type == InterruptionType.OTHER_EVENT and e.vector != 0:
        return "VM-entry interruption information: other event must have vector 0 (pending MTF VM exit)"
    return None


@control("27.2.1.3")
def injection_deliver_error_code(e: EntryContext) -> str | None:
    if not e.injecting:
        return None
    delivers = bool(e.intr_info & INTR_INFO_DELIVER_CODE_MASK)
    # "CR0.PE in the CR0 field"; without unrestricted guest CR0.PE is 1 or the guest-state checks
    # fail later, so treat it as 1 then (as Linux does).
    protected_mode = not e.unrestricted_guest or bool(e.guest_cr0 & Cr0.PE)
    hardware_exception = e.event_type == InterruptionType.HARD_EXCEPTION
    if e.profile.vmx_basic & VMX_BASIC_NO_HW_ERROR_CODE_CC:
        should = None if hardware_exception and protected_mode else False
    else:
        should = hardware_exception and protected_mode and e.vector in EXCEPTIONS_WITH_ERROR_CODE
    if should is not None and delivers != should:
        if should:
            return (
                "VM-entry interruption information: deliver-error-code must be 1 for a hardware "
                "exception with an error code (#DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP) in protected mode"
            )
        return (
            "VM-entry interruption information: deliver-error-code must be 0 unless a hardware "
            "exception that has an error code is injected in protected mode"
        )
    return None


@control("27.2.1.3")
def injection_reserved_bits(e: EntryContext) -> str | None:
    if e.injecting and e.intr_info & INTR_INFO_RESVD_BITS_MASK:
        return "VM-entry interruption information: reserved bits 30:12 must be 0"
    return None


@control("27.2.1.3")
def injection_error_code_reserved_bits(e: EntryContext) -> str | None:
    if e.injecting and e.intr_info & INTR_INFO_DELIVER_CODE_MASK:
        if e.read(F.VM_ENTRY_EXCEPTION_ERROR_CODE) & 0xFFFF0000:
            return "VM-entry exception error code: bits 31:16 must be 0 when an error code is delivered"
    return None


@control("27.2.1.3")
def injection_instruction_length(e: EntryContext) -> str | None:
    if not e.injecting or e.event_type not in _SOFTWARE_EVENT_TYPES:
        return None
    length = e.read(F.VM_ENTRY_INSTRUCTION_LEN)
    if length > 15:
        return "VM-entry instruction length must be 0-15 for a software interrupt or exception"
    if length == 0 and not e.profile.vmx_misc & VMX_MISC_ZERO_LEN_INS:
        return "VM-entry instruction length 0 is allowed only if IA32_VMX_MISC[30] is 1"
    return None


@control("27.2.1.3")
def entry_msr_load_area(e: EntryContext) -> str | None:
    return _msr_area(e, "VM-entry MSR-load", F.VM_ENTRY_MSR_LOAD_COUNT, F.VM_ENTRY_MSR_LOAD_ADDR)


@control("27.2.1.3")
def smm_controls_outside_smm(e: EntryContext) -> str | None:
    # This processor never runs VMLAUNCH/VMRESUME in SMM.
    if e.entry_controls & (E.SMM | E.DEACT_DUAL_MONITOR):
        return "\"entry to SMM\" and \"deactivate dual-monitor treatment\" must be 0 outside SMM"
    return None


# "load CET state", "load PKRS", "load UINV", FRED: not supported.
