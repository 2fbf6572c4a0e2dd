"""VM-entry checks (SDM 27.2 "Checks on VMX Controls and Host-State Area", 27.3 "Checking and
Loading Guest State", 27.4 "Loading MSRs").

Each rule is one small function that returns None when it holds, or the rule in words when it
is broken; the decorator that registers it (``@_control``, ``@_host``, ``@_guest``) wraps it
into an :class:`EntryCheck` that turns a broken rule into an :class:`EntryCheckFailure` naming the
SDM section.  The three public entry points run their rules in SDM order and stop at the first
failure, so the processor can report exactly which check failed; :func:`load_msrs` does SDM 27.4.

The split follows Bochs' ``VMenterLoadCheckVmControls`` / ``VMenterLoadCheckHostState`` /
``VMenterLoadCheckGuestState`` (the SDM's own split); each rule is registered with its area and
SDM section by a decorator, as Linux wraps each nested VM-entry check in ``CC()`` so the failing
one is named.  The modelled processor is a 64-bit processor outside SMM, without the dual-monitor
treatment, shadow VMCS, SGX, Intel PT, CET, PML, VM functions or APIC virtualization: rules about
controls that the profile can never enable are skipped with a comment where the SDM lists them
(the reserved-bit checks of 27.2.1 already reject those controls).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from functools import cached_property
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmx.arch.controls import (
    INTR_INFO_DELIVER_CODE_MASK,
    INTR_INFO_INTR_TYPE_MASK,
    INTR_INFO_RESVD_BITS_MASK,
    INTR_INFO_VALID_MASK,
    INTR_INFO_VECTOR_MASK,
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
    VMX_MISC_ACTIVITY_HLT,
    VMX_MISC_ACTIVITY_SHUTDOWN,
    VMX_MISC_ACTIVITY_WAIT_SIPI,
    VMX_MISC_MSR_LIST_MULTIPLIER_SHIFT,
    VMX_MISC_ZERO_LEN_INS,
    GuestActivityState,
    GuestInterruptibility,
    InterruptionType,
)
from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.controls import VmEntryControls as E
from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.exit_reasons import ExitReason
from pyvmx.arch.msr import Msr
from pyvmx.arch.qualifications import ENTRY_FAIL_NMI, ENTRY_FAIL_PDPTE, ENTRY_FAIL_VMCS_LINK_PTR
from pyvmx.arch.vm_instruction_errors import VmInstructionError
from pyvmx.arch.vmcs_fields import VmcsField
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import (
    DR6_BS,
    EXCEPTIONS_WITH_ERROR_CODE,
    RFLAGS_RESERVED_MASK,
    SYS_TYPE_LDT,
    SYS_TYPE_TSS16_BUSY,
    SYS_TYPE_TSS_BUSY,
    VMX_AR_DB_MASK,
    VMX_AR_G_MASK,
    VMX_AR_L_MASK,
    VMX_AR_P_MASK,
    VMX_AR_S_MASK,
    VMX_AR_TYPE_ACCESSES_MASK,
    VMX_AR_TYPE_CODE_MASK,
    VMX_AR_TYPE_READABLE_MASK,
    VMX_AR_UNUSABLE_MASK,
    Cr0,
    Cr4,
    Efer,
    ExceptionVector,
    Rflags,
)
from pyvmx.vmx.state import CS, ES, FS, GS, LDTR, SEGMENT_NAMES, SS, TR, DS, Segment
from pyvmx.vmx.vmcs import VMCS_SHADOW_INDICATOR

if TYPE_CHECKING:
    from pyvmx.vmx.caps import CpuProfile
    from pyvmx.vmx.memory import PhysicalMemory
    from pyvmx.vmx.processor import Processor
    from pyvmx.vmx.vmcs import VmcsRegion

_U64 = (1 << 64) - 1
_INVALID_VMCS_POINTER = _U64

# The modelled processor has 48 linear-address bits (no 5-level paging: CR4.LA57 is unsupported).
LINEAR_ADDRESS_WIDTH = 48

# Segment selectors (SDM 3.4.2). TODO(arch): move (Linux SEGMENT_RPL_MASK / SEGMENT_TI_MASK).
SEGMENT_RPL_MASK = 0x3
SEGMENT_TI_MASK = 0x4

# VMX access rights: reserved bits 11:8 and 31:17 (together Linux's VMX_AR_RESERVD_MASK).
_AR_RESERVED_11_8 = 0x00000F00
_AR_RESERVED_31_17 = 0xFFFE0000

# IA32_EFER bits an Intel 64 processor implements (SDM 2.2.1): SCE, LME, LMA, NXE.  (The arch
# EFER_RESERVED_MASK also allows AMD's SVME/LMSLE/FFXSR/TCE, which WRMSR rejects on Intel.)
_EFER_SUPPORTED = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NX)

# IA32_PAT memory types WRMSR accepts (SDM 11.12.2): UC, WC, WT, WP, WB, UC-.
_PAT_MEMORY_TYPES = frozenset({0, 1, 4, 5, 6, 7})

# IA32_DEBUGCTL (SDM 18.4.1): LBR (0), BTF (1), TR (6), BTS (7), BTINT (8), BTS_OFF_OS (9),
# BTS_OFF_USR (10), FREEZE_LBRS_ON_PMI (11), FREEZE_PERFMON_ON_PMI (12), ENABLE_UNCORE_PMI (13),
# FREEZE_WHILE_SMM (14), RTM_DEBUG (15); bits 5:2 and 63:16 are reserved.  TODO(arch): move.
_DEBUGCTL_BTF = 1 << 1
_DEBUGCTL_RESERVED = _U64 & ~(0b11 | (0x3FF << 6))

# The VTPR byte on the virtual-APIC page (SDM 30.1.1).  TODO(arch): move (Linux APIC_TASKPRI).
_APIC_TASKPRI = 0x80

# Interruption types whose injection uses the VM-entry instruction length (SDM 27.2.1.3).
_SOFTWARE_EVENT_TYPES = (
    InterruptionType.SOFT_INTR, InterruptionType.PRIV_SW_EXCEPTION, InterruptionType.SOFT_EXCEPTION,
)

# EPTP bits 11:7: reserved on this processor (bit 7, supervisor shadow-stack control, needs CET).
_EPTP_RESERVED_11_7 = 0xF80

# Activity states other than active and the IA32_VMX_MISC bit that says they are supported (A.6).
_ACTIVITY_STATE_MISC_BIT: dict[int, int] = {
    GuestActivityState.HLT: VMX_MISC_ACTIVITY_HLT,
    GuestActivityState.SHUTDOWN: VMX_MISC_ACTIVITY_SHUTDOWN,
    GuestActivityState.WAIT_SIPI: VMX_MISC_ACTIVITY_WAIT_SIPI,
}

# Interruptibility state: bits 31:5 are reserved (SDM 25.4.2, Table 25-3).
_INTERRUPTIBILITY_RESERVED = 0xFFFFFFE0

# Pending debug exceptions (SDM 25.4.2, Table 25-4): B3-B0 (3:0), enabled breakpoint (12) and BS
# (14) are defined; RTM (16) is reserved on a processor without RTM, as this one is.
_PENDING_DBG_BS = DR6_BS
_PENDING_DBG_RESERVED = _U64 & ~(0xF | (1 << 12) | DR6_BS)

# PAE page-directory-pointer-table entries (SDM 4.4.1): present (0); reserved 2:1 and 8:5, and
# every bit from MAXPHYADDR up (bit 63 too: PDPTEs have no XD bit).
_PDPTE_PRESENT = 1 << 0
_PDPTE_RESERVED_LOW = 0x1E6
_PDPTE_FIELDS = (F.GUEST_PDPTR0, F.GUEST_PDPTR1, F.GUEST_PDPTR2, F.GUEST_PDPTR3)

# IA32_SMM_MONITOR_CTL, writable only in SMM (SDM 33.15.5).  TODO(arch): move to Msr.
_MSR_IA32_SMM_MONITOR_CTL = 0x9B

# Bits 31:8 of an MSR index in the x2APIC range 800H-8FFH (SDM 27.4).
_X2APIC_MSR_RANGE_HIGH = 0x8


class CheckArea(enum.Enum):
    CONTROLS = "VMX controls"  # VMfailValid(7)
    HOST_STATE = "host-state area"  # VMfailValid(8)
    GUEST_STATE = "guest-state area"  # VM-entry failure, exit reason 33
    MSR_LOADING = "VM-entry MSR-load area"  # VM-entry failure, exit reason 34


@dataclass(frozen=True)
class EntryCheckFailure:
    """The first VM-entry check that failed."""

    area: CheckArea
    rule: str  # e.g. "SDM 27.2.1.1: reserved bits in the pin-based VM-execution controls"
    qualification: int = 0  # exit qualification for guest-state/MSR-load failures

    @property
    def error(self) -> VmInstructionError:
        if self.area is CheckArea.HOST_STATE:
            return VmInstructionError.ENTRY_INVALID_HOST_STATE_FIELD
        return VmInstructionError.ENTRY_INVALID_CONTROL_FIELD

    @property
    def exit_reason(self) -> ExitReason:
        if self.area is CheckArea.MSR_LOADING:
            return ExitReason.MSR_LOAD_FAIL
        return ExitReason.INVALID_STATE

    def __str__(self) -> str:
        return f"{self.area.value}: {self.rule}"


# --- How a rule is named -------------------------------------------------------------------------
# A rule is a function of the entry being checked that returns None when the rule holds, or the
# rule in words when it is broken; the decorator that registers it adds the area and SDM section.
Rule = Callable[["EntryContext"], "str | None"]


@dataclass(frozen=True)
class EntryCheck:
    """One registered VM-entry rule: where the SDM states it and what a failure reports."""

    area: CheckArea
    section: str  # "27.2.1.1"
    rule: Rule
    qualification: int = 0

    @property
    def name(self) -> str:
        return self.rule.__name__

    def __call__(self, entry: EntryContext) -> EntryCheckFailure | None:
        broken = self.rule(entry)
        if broken is None:
            return None
        return EntryCheckFailure(self.area, f"SDM {self.section}: {broken}", self.qualification)


CONTROL_CHECKS: list[EntryCheck] = []  # SDM 27.2.1, in SDM order
HOST_STATE_CHECKS: list[EntryCheck] = []  # SDM 27.2.2-27.2.4
GUEST_STATE_CHECKS: list[EntryCheck] = []  # SDM 27.3.1


@dataclass(frozen=True)
class _Registrar:
    """``@_guest("27.3.1.2")`` registers the rule below it, in source (= SDM) order."""

    checks: list[EntryCheck]
    area: CheckArea

    def __call__(self, section: str, qualification: int = 0) -> Callable[[Rule], Rule]:
        def register(rule: Rule) -> Rule:
            self.checks.append(EntryCheck(self.area, section, rule, qualification))
            return rule

        return register


_control = _Registrar(CONTROL_CHECKS, CheckArea.CONTROLS)
_host = _Registrar(HOST_STATE_CHECKS, CheckArea.HOST_STATE)
_guest = _Registrar(GUEST_STATE_CHECKS, CheckArea.GUEST_STATE)


def _first_failure(checks: list[EntryCheck], entry: EntryContext) -> EntryCheckFailure | None:
    for check in checks:
        failure = check(entry)
        if failure is not None:
            return failure
    return None


# --- The entry being checked ---------------------------------------------------------------------
class EntryContext:
    """The current VMCS of one VM entry, with the VMX controls decoded once into typed predicates
    (Bochs' VMCS cache).  The secondary processor-based controls read as 0 unless "activate
    secondary controls" is 1, as the processor then behaves (SDM 27.2.1.1)."""

    def __init__(
        self,
        vmcs: VmcsRegion,
        profile: CpuProfile,
        memory: PhysicalMemory | None = None,
        *,
        host_ia32e_mode: bool = True,
    ) -> None:
        self.vmcs = vmcs
        self.profile = profile
        self.memory = memory
        self.host_ia32e_mode = host_ia32e_mode  # the processor executing VMLAUNCH/VMRESUME
        self.pin = vmcs.read(F.PIN_BASED_VM_EXEC_CONTROL)
        self.proc = vmcs.read(F.CPU_BASED_VM_EXEC_CONTROL)
        self.secondary = (
            vmcs.read(F.SECONDARY_VM_EXEC_CONTROL) if self.proc & C.ACTIVATE_SECONDARY_CONTROLS else 0
        )
        self.exit_controls = vmcs.read(F.VM_EXIT_CONTROLS)
        self.entry_controls = vmcs.read(F.VM_ENTRY_CONTROLS)
        self._segments: dict[int, Segment] = {}
        self._fields: dict[VmcsField, int] = {}

    def read(self, field: VmcsField) -> int:
        """VMCS ``field``, read once per VM entry (the checks do not change the VMCS)."""
        value = self._fields.get(field)
        if value is None:
            value = self._fields[field] = self.vmcs.read(field)
        return value

    # --- decoded controls ------------------------------------------------------------------
    @cached_property
    def unrestricted_guest(self) -> bool:
        return bool(self.secondary & S.UNRESTRICTED_GUEST)

    @cached_property
    def ept(self) -> bool:
        return bool(self.secondary & S.ENABLE_EPT)

    @cached_property
    def virtual_nmis(self) -> bool:
        return bool(self.pin & P.VIRTUAL_NMIS)

    @cached_property
    def host_addr_space_size(self) -> bool:
        return bool(self.exit_controls & X.HOST_ADDR_SPACE_SIZE)

    @cached_property
    def ia32e_mode_guest(self) -> bool:
        return bool(self.entry_controls & E.IA32E_MODE)

    @cached_property
    def load_debug_controls(self) -> bool:
        return bool(self.entry_controls & E.LOAD_DEBUG_CONTROLS)

    # --- the physical-address width ----------------------------------------------------------
    def beyond_phys_width(self, address: int) -> bool:
        """Whether ``address`` sets a bit at or above the physical-address width (MAXPHYADDR)."""
        return bool(address >> self.profile.physical_address_width)

    # --- VM-entry event injection (SDM 25.8.3) -------------------------------------------------
    @cached_property
    def intr_info(self) -> int:
        return self.read(F.VM_ENTRY_INTR_INFO_FIELD)

    @cached_property
    def injecting(self) -> bool:
        return bool(self.intr_info & INTR_INFO_VALID_MASK)

    @cached_property
    def event_type(self) -> int:
        return (self.intr_info & INTR_INFO_INTR_TYPE_MASK) >> 8

    @cached_property
    def vector(self) -> int:
        return self.intr_info & INTR_INFO_VECTOR_MASK

    def injecting_type(self, kind: InterruptionType) -> bool:
        return self.injecting and self.event_type == kind

    # --- guest state ---------------------------------------------------------------------------
    @cached_property
    def guest_cr0(self) -> int:
        return self.read(F.GUEST_CR0)

    @cached_property
    def guest_cr4(self) -> int:
        return self.read(F.GUEST_CR4)

    @cached_property
    def guest_rflags(self) -> int:
        return self.read(F.GUEST_RFLAGS)

    @cached_property
    def v8086(self) -> bool:
        """The guest will be in virtual-8086 mode (RFLAGS.VM = 1 in the RFLAGS field)."""
        return bool(self.guest_rflags & Rflags.VM)

    @cached_property
    def interruptibility(self) -> int:
        return self.read(F.GUEST_INTERRUPTIBILITY_INFO)

    @cached_property
    def activity_state(self) -> int:
        return self.read(F.GUEST_ACTIVITY_STATE)

    def segment(self, index: int) -> Segment:
        """Guest ES, CS, SS, DS, FS, GS, LDTR or TR from the guest-state area (state.py order)."""
        seg = self._segments.get(index)
        if seg is None:
            name = SEGMENT_NAMES[index]
            seg = Segment(
                selector=self.read(VmcsField[f"GUEST_{name}_SELECTOR"]),
                base=self.read(VmcsField[f"GUEST_{name}_BASE"]),
                limit=self.read(VmcsField[f"GUEST_{name}_LIMIT"]),
                ar=self.read(VmcsField[f"GUEST_{name}_AR_BYTES"]),
            )
            self._segments[index] = seg
        return seg

    def usable(self, index: int) -> bool:
        return not self.segment(index).ar & VMX_AR_UNUSABLE_MASK


def canonical(address: int) -> bool:
    """Whether a linear address is canonical for 48 linear-address bits (bits 63:47 all equal);
    this processor has no 5-level paging (CPUID.80000008H:EAX[15:8] = 48)."""
    top = address >> (LINEAR_ADDRESS_WIDTH - 1)
    return top == 0 or top == (1 << (65 - LINEAR_ADDRESS_WIDTH)) - 1


def _limit_granularity_ok(limit: int, ar: int) -> bool:
    """The limit/G consistency rule of SDM 27.3.1.2: if any of limit bits 11:0 is 0, G must be
    0; if any of limit bits 31:20 is 1, G must be 1."""
    g = bool(ar & VMX_AR_G_MASK)
    if limit & 0xFFF != 0xFFF and g:
        return False
    if limit & 0xFFF00000 and not g:
        return False
    return True


def _pat_valid(pat: int) -> bool:
    """Each byte of IA32_PAT must be a valid memory type: 0 (UC), 1 (WC), 4 (WT), 5 (WP), 6 (WB)
    or 7 (UC-) -- what WRMSR accepts at CPL 0 (SDM 11.12.2)."""
    return all((pat >> (8 * i)) & 0xFF in _PAT_MEMORY_TYPES for i in range(8))


def _efer_reserved(efer: int) -> int:
    return efer & ~_EFER_SUPPORTED & _U64


# =================================================================================================
# SDM 27.2.1 Checks on VMX Controls (VMfailValid, error 7)
# =================================================================================================

# --- 27.2.1.1 VM-execution control fields --------------------------------------------------------
@_control("27.2.1.1")
def pin_based_reserved_bits(e: EntryContext) -> str | None:
    if e.profile.controls("pin_based").violations(e.pin):
        return "reserved bits in the pin-based VM-execution controls must be set properly"
    return None


@_control("27.2.1.1")
def primary_proc_based_reserved_bits(e: EntryContext) -> str | None:
    if e.profile.controls("proc_based").violations(e.proc):
        return "reserved bits in the primary processor-based VM-execution controls must be set properly"
    return None


@_control("27.2.1.1")
def secondary_proc_based_reserved_bits(e: EntryContext) -> str | None:
    # e.secondary is 0 unless "activate secondary controls" is 1: then nothing is checked.
    if e.profile.controls("secondary").violations(e.secondary):
        return "reserved bits in the secondary processor-based VM-execution controls must be cleared"
    return None


# Tertiary processor-based controls: not supported ("activate tertiary controls" is reserved).


@_control("27.2.1.1")
def cr3_target_count(e: EntryContext) -> str | None:
    if e.read(F.CR3_TARGET_COUNT) > e.profile.cr3_target_count:
        return "the CR3-target count must not be greater than the number IA32_VMX_MISC[24:16] reports"
    return None


@_control("27.2.1.1")
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


@_control("27.2.1.1")
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


@_control("27.2.1.1")
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


@_control("27.2.1.1")
def tpr_threshold_reserved_bits(e: EntryContext) -> str | None:
    if e.proc & C.TPR_SHADOW and not e.secondary & S.VIRTUAL_INTR_DELIVERY:
        if e.read(F.TPR_THRESHOLD) & 0xFFFFFFF0:
            return "bits 31:4 of the TPR threshold must be 0 (\"use TPR shadow\" = 1)"
    return None


@_control("27.2.1.1")
def tpr_threshold_vs_vtpr(e: EntryContext) -> str | None:
    if not e.proc & C.TPR_SHADOW or e.secondary & (S.VIRTUALIZE_APIC_ACCESSES | S.VIRTUAL_INTR_DELIVERY):
        return None
    vtpr_address = e.read(F.VIRTUAL_APIC_PAGE_ADDR) + _APIC_TASKPRI
    vtpr = e.memory.read8(vtpr_address) if e.memory is not None and e.memory.contains(vtpr_address) else 0xFF
    if e.read(F.TPR_THRESHOLD) & 0xF > vtpr >> 4:
        return "TPR threshold bits 3:0 must not be greater than VTPR bits 7:4 (\"use TPR shadow\" = 1)"
    return None


@_control("27.2.1.1")
def apic_virtualization_requires_tpr_shadow(e: EntryContext) -> str | None:
    apicv = S.VIRTUALIZE_X2APIC_MODE | S.APIC_REGISTER_VIRT | S.VIRTUAL_INTR_DELIVERY
    if not e.proc & C.TPR_SHADOW and e.secondary & apicv:
        return (
            "\"virtualize x2APIC mode\", \"APIC-register virtualization\" and \"virtual-interrupt "
            "delivery\" must be 0 when \"use TPR shadow\" is 0"
        )
    return None


@_control("27.2.1.1")
def virtual_nmis_require_nmi_exiting(e: EntryContext) -> str | None:
    if not e.pin & P.NMI_EXITING and e.pin & P.VIRTUAL_NMIS:
        return "\"virtual NMIs\" must be 0 when \"NMI exiting\" is 0"
    return None


@_control("27.2.1.1")
def nmi_window_exiting_requires_virtual_nmis(e: EntryContext) -> str | None:
    if not e.pin & P.VIRTUAL_NMIS and e.proc & C.NMI_WINDOW_EXITING:
        return "\"NMI-window exiting\" must be 0 when \"virtual NMIs\" is 0"
    return None


# The APIC-access address, "virtualize x2APIC mode" vs "virtualize APIC accesses", "virtual-
# interrupt delivery" vs "external-interrupt exiting" and posted interrupts: this processor has no
# APIC virtualization (those controls are reserved in its capability MSRs).


@_control("27.2.1.1")
def vpid_nonzero(e: EntryContext) -> str | None:
    if e.secondary & S.ENABLE_VPID and e.read(F.VIRTUAL_PROCESSOR_ID) == 0:
        return "the VPID must not be 0000H (\"enable VPID\" = 1)"
    return None


@_control("27.2.1.1")
def eptp_valid(e: EntryContext) -> str | None:
    if not e.ept:
        return None
    broken = eptp_violation(e.read(F.EPT_POINTER), e.profile)
    return None if broken is None else f"EPTP (\"enable EPT\" = 1): {broken}"


# "enable PML": not supported.


@_control("27.2.1.1")
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
@_control("27.2.1.2")
def exit_controls_reserved_bits(e: EntryContext) -> str | None:
    if e.profile.controls("exit_controls").violations(e.exit_controls):
        return "reserved bits in the primary VM-exit controls must be set properly"
    return None


# "activate secondary controls" (VM-exit): not supported.


@_control("27.2.1.2")
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


@_control("27.2.1.2")
def exit_msr_store_area(e: EntryContext) -> str | None:
    return _msr_area(e, "VM-exit MSR-store", F.VM_EXIT_MSR_STORE_COUNT, F.VM_EXIT_MSR_STORE_ADDR)


@_control("27.2.1.2")
def exit_msr_load_area(e: EntryContext) -> str | None:
    return _msr_area(e, "VM-exit MSR-load", F.VM_EXIT_MSR_LOAD_COUNT, F.VM_EXIT_MSR_LOAD_ADDR)


# --- 27.2.1.3 VM-entry control fields ------------------------------------------------------------
@_control("27.2.1.3")
def entry_controls_reserved_bits(e: EntryContext) -> str | None:
    if e.profile.controls("entry_controls").violations(e.entry_controls):
        return "reserved bits in the VM-entry controls must be set properly"
    return None


@_control("27.2.1.3")
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


@_control("27.2.1.3")
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


@_control("27.2.1.3")
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


@_control("27.2.1.3")
def injection_reserved_bits(e: EntryContext) -> str | None:
    if e.injecting and e.intr_info & INTR_INFO_RESVD_BITS_MASK:
        return "VM-entry interruption information: reserved bits 30:12 must be 0"
    return None


@_control("27.2.1.3")
def injection_error_code_reserved_bits(e: EntryContext) -> str | None:
    if e.injecting and e.intr_info & INTR_INFO_DELIVER_CODE_MASK:
        if e.read(F.VM_ENTRY_EXCEPTION_ERROR_CODE) & 0xFFFF0000:
            return "VM-entry exception error code: bits 31:16 must be 0 when an error code is delivered"
    return None


@_control("27.2.1.3")
def injection_instruction_length(e: EntryContext) -> str | None:
    if not e.injecting or e.event_type not in _SOFTWARE_EVENT_TYPES:
        return None
    length = e.read(F.VM_ENTRY_INSTRUCTION_LEN)
    if length > 15:
        return "VM-entry instruction length must be 0-15 for a software interrupt or exception"
    if length == 0 and not e.profile.vmx_misc & VMX_MISC_ZERO_LEN_INS:
        return "VM-entry instruction length 0 is allowed only if IA32_VMX_MISC[30] is 1"
    return None


@_control("27.2.1.3")
def entry_msr_load_area(e: EntryContext) -> str | None:
    return _msr_area(e, "VM-entry MSR-load", F.VM_ENTRY_MSR_LOAD_COUNT, F.VM_ENTRY_MSR_LOAD_ADDR)


@_control("27.2.1.3")
def smm_controls_outside_smm(e: EntryContext) -> str | None:
    # This processor never runs VMLAUNCH/VMRESUME in SMM.
    if e.entry_controls & (E.SMM | E.DEACT_DUAL_MONITOR):
        return "\"entry to SMM\" and \"deactivate dual-monitor treatment\" must be 0 outside SMM"
    return None


# "load CET state", "load PKRS", "load UINV", FRED: not supported.


# =================================================================================================
# SDM 27.2.2-27.2.4 Checks on Host-State Area (VMfailValid, error 8)
# =================================================================================================

# --- 27.2.2 Host control registers, MSRs and SSP -------------------------------------------------
def _fixed_bits_ok(value: int, fixed0: int, fixed1: int) -> bool:
    """IA32_VMX_CRx_FIXED0/FIXED1: bits 1 in FIXED0 must be 1, bits 0 in FIXED1 must be 0
    (the upper half of a 64-bit control register is reserved, SDM 24.8 and A.7/A.8)."""
    value, fixed0, fixed1 = int(value), int(fixed0), int(fixed1)  # plain ints: ~ on an IntFlag
    return value & fixed0 == fixed0 and value & ~fixed1 & _U64 == 0  # inverts only its members


@_host("27.2.2")
def host_cr0_fixed_bits(e: EntryContext) -> str | None:
    if not _fixed_bits_ok(e.read(F.HOST_CR0), e.profile.cr0_fixed0, e.profile.cr0_fixed1):
        return "host CR0 must not set any bit to a value not supported in VMX operation (IA32_VMX_CR0_FIXED0/1)"
    return None


@_host("27.2.2")
def host_cr4_fixed_bits(e: EntryContext) -> str | None:
    if not _fixed_bits_ok(e.read(F.HOST_CR4), e.profile.cr4_fixed0, e.profile.cr4_fixed1):
        return "host CR4 must not set any bit to a value not supported in VMX operation (IA32_VMX_CR4_FIXED0/1)"
    return None


# Host CR4.CET = 1 requires CR0.WP = 1: CR4.CET is not supported (the CR4 check rejects it).


@_host("27.2.2")
def host_cr3_width(e: EntryContext) -> str | None:
    if e.beyond_phys_width(e.read(F.HOST_CR3)):
        return "host CR3 bits beyond the physical-address width must be 0"
    return None


@_host("27.2.2")
def host_sysenter_canonical(e: EntryContext) -> str | None:
    for name, field in (("ESP", F.HOST_IA32_SYSENTER_ESP), ("EIP", F.HOST_IA32_SYSENTER_EIP)):
        if not canonical(e.read(field)):
            return f"host IA32_SYSENTER_{name} must contain a canonical address"
    return None


# "load IA32_PERF_GLOBAL_CTRL" (VM-exit): not supported.


@_host("27.2.2")
def host_pat(e: EntryContext) -> str | None:
    if e.exit_controls & X.LOAD_IA32_PAT and not _pat_valid(e.read(F.HOST_IA32_PAT)):
        return "host IA32_PAT: each byte must be 0, 1, 4, 5, 6 or 7 (\"load IA32_PAT\" = 1)"
    return None


@_host("27.2.2")
def host_efer_reserved_bits(e: EntryContext) -> str | None:
    if e.exit_controls & X.LOAD_IA32_EFER and _efer_reserved(e.read(F.HOST_IA32_EFER)):
        return "host IA32_EFER: reserved bits must be 0 (\"load IA32_EFER\" = 1)"
    return None


@_host("27.2.2")
def host_efer_lma_lme(e: EntryContext) -> str | None:
    if not e.exit_controls & X.LOAD_IA32_EFER:
        return None
    efer = e.read(F.HOST_IA32_EFER)
    if bool(efer & Efer.LMA) != e.host_addr_space_size or bool(efer & Efer.LME) != e.host_addr_space_size:
        return (
            "host IA32_EFER: LMA and LME must each equal \"host address-space size\" "
            "(\"load IA32_EFER\" = 1)"
        )
    return None


# "load CET state", "load PKRS" (VM-exit): not supported.


# --- 27.2.3 Host segment and descriptor-table registers ------------------------------------------
_HOST_SELECTORS = (
    ("CS", "HOST_CS_SELECTOR"), ("SS", "HOST_SS_SELECTOR"), ("DS", "HOST_DS_SELECTOR"),
    ("ES", "HOST_ES_SELECTOR"), ("FS", "HOST_FS_SELECTOR"), ("GS", "HOST_GS_SELECTOR"),
    ("TR", "HOST_TR_SELECTOR"),
)


@_host("27.2.3")
def host_selector_rpl_ti(e: EntryContext) -> str | None:
    for name, field in _HOST_SELECTORS:
        if e.read(VmcsField[field]) & (SEGMENT_RPL_MASK | SEGMENT_TI_MASK):
            return f"host {name} selector: RPL (bits 1:0) and TI (bit 2) must be 0"
    return None


@_host("27.2.3")
def host_cs_selector_nonzero(e: EntryContext) -> str | None:
    if e.read(F.HOST_CS_SELECTOR) == 0:
        return "host CS selector must not be 0000H"
    return None


@_host("27.2.3")
def host_tr_selector_nonzero(e: EntryContext) -> str | None:
    if e.read(F.HOST_TR_SELECTOR) == 0:
        return "host TR selector must not be 0000H"
    return None


@_host("27.2.3")
def host_ss_selector_nonzero(e: EntryContext) -> str | None:
    if e.read(F.HOST_SS_SELECTOR) == 0 and not e.host_addr_space_size:
        return "host SS selector must not be 0000H when \"host address-space size\" is 0"
    return None


@_host("27.2.3")
def host_bases_canonical(e: EntryContext) -> str | None:
    for name in ("FS", "GS", "GDTR", "IDTR", "TR"):
        if not canonical(e.read(VmcsField[f"HOST_{name}_BASE"])):
            return f"host {name} base address must be canonical"
    return None


# --- 27.2.4 Address-space size -------------------------------------------------------------------
@_host("27.2.4")
def host_addr_space_size_matches_mode(e: EntryContext) -> str | None:
    if e.host_ia32e_mode and not e.host_addr_space_size:
        return "\"host address-space size\" must be 1 on a processor in IA-32e mode"
    if not e.host_ia32e_mode and (e.host_addr_space_size or e.ia32e_mode_guest):
        return (
            "\"host address-space size\" and \"IA-32e mode guest\" must be 0 on a processor "
            "outside IA-32e mode"
        )
    return None


@_host("27.2.4")
def host_32bit_requirements(e: EntryContext) -> str | None:
    if e.host_addr_space_size:
        return None
    if e.ia32e_mode_guest:
        return "\"IA-32e mode guest\" must be 0 when \"host address-space size\" is 0"
    if e.read(F.HOST_CR4) & Cr4.PCIDE:
        return "host CR4.PCIDE must be 0 when \"host address-space size\" is 0"
    if e.read(F.HOST_RIP) >> 32:
        return "host RIP bits 63:32 must be 0 when \"host address-space size\" is 0"
    return None


@_host("27.2.4")
def host_64bit_requirements(e: EntryContext) -> str | None:
    if not e.host_addr_space_size:
        return None
    if not e.read(F.HOST_CR4) & Cr4.PAE:
        return "host CR4.PAE must be 1 when \"host address-space size\" is 1"
    if not canonical(e.read(F.HOST_RIP)):
        return "host RIP must be canonical when \"host address-space size\" is 1"
    return None


# =================================================================================================
# SDM 27.3.1 Checks on the Guest-State Area (VM-entry failure, exit reason 33)
# =================================================================================================

# --- 27.3.1.1 Guest control registers, debug registers and MSRs ----------------------------------
@_guest("27.3.1.1")
def guest_cr0_fixed_bits(e: EntryContext) -> str | None:
    fixed0 = e.profile.cr0_fixed0
    if e.unrestricted_guest:
        fixed0 &= ~int(Cr0.PE | Cr0.PG)  # not checked with "unrestricted guest" = 1
    fixed1 = e.profile.cr0_fixed1 | int(Cr0.NW | Cr0.CD)  # NW and CD are never checked
    if not _fixed_bits_ok(e.guest_cr0, fixed0, fixed1):
        return (
            "guest CR0 must not set any bit to a value not supported in VMX operation "
            "(PE and PG exempt with \"unrestricted guest\"; NW and CD never checked)"
        )
    return None


@_guest("27.3.1.1")
def guest_cr0_pg_requires_pe(e: EntryContext) -> str | None:
    if e.guest_cr0 & Cr0.PG and not e.guest_cr0 & Cr0.PE:
        return "guest CR0.PE must be 1 when CR0.PG is 1"
    return None


@_guest("27.3.1.1")
def guest_cr4_fixed_bits(e: EntryContext) -> str | None:
    if not _fixed_bits_ok(e.guest_cr4, e.profile.cr4_fixed0, e.profile.cr4_fixed1):
        return "guest CR4 must not set any bit to a value not supported in VMX operation (IA32_VMX_CR4_FIXED0/1)"
    return None


# Guest CR4.CET = 1 requires CR0.WP = 1: CR4.CET is not supported (the CR4 check rejects it).


@_guest("27.3.1.1")
def guest_debugctl_reserved_bits(e: EntryContext) -> str | None:
    if e.load_debug_controls and e.read(F.GUEST_IA32_DEBUGCTL) & _DEBUGCTL_RESERVED:
        return "guest IA32_DEBUGCTL: reserved bits must be 0 (\"load debug controls\" = 1)"
    return None


@_guest("27.3.1.1")
def ia32e_guest_requires_paging(e: EntryContext) -> str | None:
    if e.ia32e_mode_guest and (not e.guest_cr0 & Cr0.PG or not e.guest_cr4 & Cr4.PAE):
        return "guest CR0.PG and CR4.PAE must each be 1 when \"IA-32e mode guest\" is 1"
    return None


@_guest("27.3.1.1")
def non_ia32e_guest_pcide(e: EntryContext) -> str | None:
    if not e.ia32e_mode_guest and e.guest_cr4 & Cr4.PCIDE:
        return "guest CR4.PCIDE must be 0 when \"IA-32e mode guest\" is 0"
    return None


@_guest("27.3.1.1")
def guest_cr3_width(e: EntryContext) -> str | None:
    if e.beyond_phys_width(e.read(F.GUEST_CR3)):
        return "guest CR3 bits beyond the physical-address width must be 0"
    return None


@_guest("27.3.1.1")
def guest_dr7_upper_bits(e: EntryContext) -> str | None:
    if e.load_debug_controls and e.read(F.GUEST_DR7) >> 32:
        return "guest DR7 bits 63:32 must be 0 (\"load debug controls\" = 1)"
    return None


@_guest("27.3.1.1")
def guest_sysenter_canonical(e: EntryContext) -> str | None:
    for name, field in (("ESP", F.GUEST_SYSENTER_ESP), ("EIP", F.GUEST_SYSENTER_EIP)):
        if not canonical(e.read(field)):
            return f"guest IA32_SYSENTER_{name} must contain a canonical address"
    return None


# "load IA32_PERF_GLOBAL_CTRL" (VM-entry): not supported.


@_guest("27.3.1.1")
def guest_pat(e: EntryContext) -> str | None:
    if e.entry_controls & E.LOAD_IA32_PAT and not _pat_valid(e.read(F.GUEST_IA32_PAT)):
        return "guest IA32_PAT: each byte must be 0, 1, 4, 5, 6 or 7 (\"load IA32_PAT\" = 1)"
    return None


@_guest("27.3.1.1")
def guest_efer_reserved_bits(e: EntryContext) -> str | None:
    if e.entry_controls & E.LOAD_IA32_EFER and _efer_reserved(e.read(F.GUEST_IA32_EFER)):
        return "guest IA32_EFER: reserved bits must be 0 (\"load IA32_EFER\" = 1)"
    return None


@_guest("27.3.1.1")
def guest_efer_lma(e: EntryContext) -> str | None:
    if e.entry_controls & E.LOAD_IA32_EFER:
        if bool(e.read(F.GUEST_IA32_EFER) & Efer.LMA) != e.ia32e_mode_guest:
            return "guest IA32_EFER.LMA must equal \"IA-32e mode guest\" (\"load IA32_EFER\" = 1)"
    return None


@_guest("27.3.1.1")
def guest_efer_lme(e: EntryContext) -> str | None:
    if e.entry_controls & E.LOAD_IA32_EFER and e.guest_cr0 & Cr0.PG:
        efer = e.read(F.GUEST_IA32_EFER)
        if bool(efer & Efer.LME) != bool(efer & Efer.LMA):
            return "guest IA32_EFER.LME must equal IA32_EFER.LMA when CR0.PG is 1 (\"load IA32_EFER\" = 1)"
    return None


# "load IA32_BNDCFGS", "load IA32_RTIT_CTL", "load CET state", "load guest IA32_LBR_CTL",
# "load PKRS", "load UINV": not supported.


# --- 27.3.1.2 Guest segment registers ------------------------------------------------------------
_CODE_DATA = (ES, CS, SS, DS, FS, GS)
_DATA = (ES, DS, FS, GS)  # "DS, ES, FS, GS" in the SDM's words


def _ar_checked(e: EntryContext, index: int) -> bool:
    """The SDM's "if the register is CS or if the register is usable", outside virtual-8086."""
    return not e.v8086 and (index == CS or e.usable(index))


# Selector fields.
@_guest("27.3.1.2")
def tr_selector_ti(e: EntryContext) -> str | None:
    if e.segment(TR).selector & SEGMENT_TI_MASK:
        return "guest TR selector: TI (bit 2) must be 0"
    return None


@_guest("27.3.1.2")
def ldtr_selector_ti(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).selector & SEGMENT_TI_MASK:
        return "guest LDTR selector: TI (bit 2) must be 0 when LDTR is usable"
    return None


@_guest("27.3.1.2")
def ss_rpl_equals_cs_rpl(e: EntryContext) -> str | None:
    if e.v8086 or e.unrestricted_guest:
        return None
    if e.segment(SS).selector & SEGMENT_RPL_MASK != e.segment(CS).selector & SEGMENT_RPL_MASK:
        return "guest SS selector RPL must equal CS selector RPL (not virtual-8086, no unrestricted guest)"
    return None


# Base-address fields.
@_guest("27.3.1.2")
def v8086_segment_bases(e: EntryContext) -> str | None:
    if not e.v8086:
        return None
    for index in _CODE_DATA:
        seg = e.segment(index)
        if seg.base != seg.selector << 4:
            return f"guest {SEGMENT_NAMES[index]} base must be the selector shifted left 4 bits (virtual-8086)"
    return None


@_guest("27.3.1.2")
def tr_fs_gs_bases_canonical(e: EntryContext) -> str | None:
    for index in (TR, FS, GS):
        if not canonical(e.segment(index).base):
            return f"guest {SEGMENT_NAMES[index]} base must be canonical"
    return None


@_guest("27.3.1.2")
def ldtr_base_canonical(e: EntryContext) -> str | None:
    if e.usable(LDTR) and not canonical(e.segment(LDTR).base):
        return "guest LDTR base must be canonical when LDTR is usable"
    return None


@_guest("27.3.1.2")
def cs_base_upper_bits(e: EntryContext) -> str | None:
    if e.segment(CS).base >> 32:
        return "guest CS base bits 63:32 must be 0"
    return None


@_guest("27.3.1.2")
def ss_ds_es_base_upper_bits(e: EntryContext) -> str | None:
    for index in (SS, DS, ES):
        if e.usable(index) and e.segment(index).base >> 32:
            return f"guest {SEGMENT_NAMES[index]} base bits 63:32 must be 0 when usable"
    return None


# Limit fields.
@_guest("27.3.1.2")
def v8086_segment_limits(e: EntryContext) -> str | None:
    if not e.v8086:
        return None
    for index in _CODE_DATA:
        if e.segment(index).limit != 0xFFFF:
            return f"guest {SEGMENT_NAMES[index]} limit must be 0000FFFFH (virtual-8086)"
    return None


# Access-rights fields of CS, SS, DS, ES, FS, GS.
@_guest("27.3.1.2")
def v8086_segment_access_rights(e: EntryContext) -> str | None:
    if not e.v8086:
        return None
    for index in _CODE_DATA:
        if e.segment(index).ar != 0xF3:
            return f"guest {SEGMENT_NAMES[index]} access rights must be 000000F3H (virtual-8086)"
    return None


@_guest("27.3.1.2")
def cs_type(e: EntryContext) -> str | None:
    if e.v8086:
        return None
    kind = e.segment(CS).type
    if kind in (9, 11, 13, 15):
        return None
    if kind == 3 and e.unrestricted_guest:
        return None
    return (
        "guest CS type must be 9, 11, 13 or 15 (accessed code), or 3 (accessed read/write data) "
        "with \"unrestricted guest\""
    )


@_guest("27.3.1.2")
def ss_type(e: EntryContext) -> str | None:
    if _ar_checked(e, SS) and e.segment(SS).type not in (3, 7):
        return "guest SS type must be 3 or 7 (read/write accessed data) when usable"
    return None


@_guest("27.3.1.2")
def data_segment_accessed(e: EntryContext) -> str | None:
    for index in _DATA:
        if _ar_checked(e, index) and not e.segment(index).type & VMX_AR_TYPE_ACCESSES_MASK:
            return f"guest {SEGMENT_NAMES[index]} type bit 0 (accessed) must be 1 when usable"
    return None


@_guest("27.3.1.2")
def data_segment_code_readable(e: EntryContext) -> str | None:
    for index in _DATA:
        kind = e.segment(index).type
        if _ar_checked(e, index) and kind & VMX_AR_TYPE_CODE_MASK and not kind & VMX_AR_TYPE_READABLE_MASK:
            return f"guest {SEGMENT_NAMES[index]}: a code segment must be readable (type bit 1) when usable"
    return None


@_guest("27.3.1.2")
def segment_s_bit(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        if _ar_checked(e, index) and not e.segment(index).ar & VMX_AR_S_MASK:
            return f"guest {SEGMENT_NAMES[index]} access rights: S (bit 4) must be 1 when usable"
    return None


@_guest("27.3.1.2")
def cs_dpl_data_type(e: EntryContext) -> str | None:
    if not e.v8086 and e.segment(CS).type == 3 and e.segment(CS).dpl != 0:
        return "guest CS DPL must be 0 when CS type is 3 (unrestricted guest)"
    return None


@_guest("27.3.1.2")
def cs_dpl_nonconforming(e: EntryContext) -> str | None:
    if not e.v8086 and e.segment(CS).type in (9, 11) and e.segment(CS).dpl != e.segment(SS).dpl:
        return "guest CS DPL must equal SS DPL when CS is a non-conforming code segment (type 9 or 11)"
    return None


@_guest("27.3.1.2")
def cs_dpl_conforming(e: EntryContext) -> str | None:
    if not e.v8086 and e.segment(CS).type in (13, 15) and e.segment(CS).dpl > e.segment(SS).dpl:
        return "guest CS DPL must not be greater than SS DPL when CS is a conforming code segment (type 13 or 15)"
    return None


@_guest("27.3.1.2")
def ss_dpl_equals_rpl(e: EntryContext) -> str | None:
    if e.v8086 or e.unrestricted_guest:
        return None
    ss = e.segment(SS)
    if ss.dpl != ss.selector & SEGMENT_RPL_MASK:
        return "guest SS DPL must equal SS selector RPL (\"unrestricted guest\" = 0)"
    return None


@_guest("27.3.1.2")
def ss_dpl_zero(e: EntryContext) -> str | None:
    if e.v8086 or e.segment(SS).dpl == 0:
        return None
    if e.segment(CS).type == 3 or not e.guest_cr0 & Cr0.PE:
        return "guest SS DPL must be 0 when CS type is 3 or CR0.PE is 0"
    return None


@_guest("27.3.1.2")
def data_segment_dpl_vs_rpl(e: EntryContext) -> str | None:
    if e.unrestricted_guest:
        return None
    for index in _DATA:
        seg = e.segment(index)
        if _ar_checked(e, index) and seg.type <= 11 and seg.dpl < seg.selector & SEGMENT_RPL_MASK:
            return (
                f"guest {SEGMENT_NAMES[index]} DPL must not be less than its selector RPL (data or "
                "non-conforming code segment, \"unrestricted guest\" = 0)"
            )
    return None


@_guest("27.3.1.2")
def segment_present(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        if _ar_checked(e, index) and not e.segment(index).ar & VMX_AR_P_MASK:
            return f"guest {SEGMENT_NAMES[index]} access rights: P (bit 7) must be 1 when usable"
    return None


@_guest("27.3.1.2")
def segment_ar_reserved_11_8(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        if _ar_checked(e, index) and e.segment(index).ar & _AR_RESERVED_11_8:
            return f"guest {SEGMENT_NAMES[index]} access rights: reserved bits 11:8 must be 0 when usable"
    return None


@_guest("27.3.1.2")
def cs_db_with_l(e: EntryContext) -> str | None:
    ar = e.segment(CS).ar
    if not e.v8086 and e.ia32e_mode_guest and ar & VMX_AR_L_MASK and ar & VMX_AR_DB_MASK:
        return "guest CS D/B must be 0 when CS.L is 1 in IA-32e mode"
    return None


@_guest("27.3.1.2")
def segment_limit_granularity(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        seg = e.segment(index)
        if _ar_checked(e, index) and not _limit_granularity_ok(seg.limit, seg.ar):
            return (
                f"guest {SEGMENT_NAMES[index]} limit and G are inconsistent when usable (limit bits 11:0 "
                "not all 1 needs G = 0; limit bits 31:20 not all 0 needs G = 1)"
            )
    return None


@_guest("27.3.1.2")
def segment_ar_reserved_31_17(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        if _ar_checked(e, index) and e.segment(index).ar & _AR_RESERVED_31_17:
            return f"guest {SEGMENT_NAMES[index]} access rights: reserved bits 31:17 must be 0 when usable"
    return None


# Access-rights field of TR.
@_guest("27.3.1.2")
def tr_type(e: EntryContext) -> str | None:
    kind = e.segment(TR).type
    if e.ia32e_mode_guest and kind != SYS_TYPE_TSS_BUSY:
        return "guest TR type must be 11 (busy 64-bit TSS) in IA-32e mode"
    if not e.ia32e_mode_guest and kind not in (SYS_TYPE_TSS16_BUSY, SYS_TYPE_TSS_BUSY):
        return "guest TR type must be 3 (busy 16-bit TSS) or 11 (busy 32-bit TSS) outside IA-32e mode"
    return None


@_guest("27.3.1.2")
def tr_s_bit(e: EntryContext) -> str | None:
    if e.segment(TR).ar & VMX_AR_S_MASK:
        return "guest TR access rights: S (bit 4) must be 0"
    return None


@_guest("27.3.1.2")
def tr_present(e: EntryContext) -> str | None:
    if not e.segment(TR).ar & VMX_AR_P_MASK:
        return "guest TR access rights: P (bit 7) must be 1"
    return None


@_guest("27.3.1.2")
def tr_ar_reserved_11_8(e: EntryContext) -> str | None:
    if e.segment(TR).ar & _AR_RESERVED_11_8:
        return "guest TR access rights: reserved bits 11:8 must be 0"
    return None


@_guest("27.3.1.2")
def tr_limit_granularity(e: EntryContext) -> str | None:
    tr = e.segment(TR)
    if not _limit_granularity_ok(tr.limit, tr.ar):
        return "guest TR limit and G are inconsistent"
    return None


@_guest("27.3.1.2")
def tr_usable(e: EntryContext) -> str | None:
    if not e.usable(TR):
        return "guest TR must be usable (access rights bit 16 must be 0)"
    return None


@_guest("27.3.1.2")
def tr_ar_reserved_31_17(e: EntryContext) -> str | None:
    if e.segment(TR).ar & _AR_RESERVED_31_17:
        return "guest TR access rights: reserved bits 31:17 must be 0"
    return None


# Access-rights field of LDTR (checked only if LDTR is usable).
@_guest("27.3.1.2")
def ldtr_type(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).type != SYS_TYPE_LDT:
        return "guest LDTR type must be 2 (LDT) when usable"
    return None


@_guest("27.3.1.2")
def ldtr_s_bit(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).ar & VMX_AR_S_MASK:
        return "guest LDTR access rights: S (bit 4) must be 0 when usable"
    return None


@_guest("27.3.1.2")
def ldtr_present(e: EntryContext) -> str | None:
    if e.usable(LDTR) and not e.segment(LDTR).ar & VMX_AR_P_MASK:
        return "guest LDTR access rights: P (bit 7) must be 1 when usable"
    return None


@_guest("27.3.1.2")
def ldtr_ar_reserved_11_8(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).ar & _AR_RESERVED_11_8:
        return "guest LDTR access rights: reserved bits 11:8 must be 0 when usable"
    return None


@_guest("27.3.1.2")
def ldtr_limit_granularity(e: EntryContext) -> str | None:
    ldtr = e.segment(LDTR)
    if e.usable(LDTR) and not _limit_granularity_ok(ldtr.limit, ldtr.ar):
        return "guest LDTR limit and G are inconsistent when usable"
    return None


@_guest("27.3.1.2")
def ldtr_ar_reserved_31_17(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).ar & _AR_RESERVED_31_17:
        return "guest LDTR access rights: reserved bits 31:17 must be 0 when usable"
    return None


# --- 27.3.1.3 Guest descriptor-table registers ---------------------------------------------------
@_guest("27.3.1.3")
def gdtr_idtr_bases_canonical(e: EntryContext) -> str | None:
    for name, field in (("GDTR", F.GUEST_GDTR_BASE), ("IDTR", F.GUEST_IDTR_BASE)):
        if not canonical(e.read(field)):
            return f"guest {name} base must be canonical"
    return None


@_guest("27.3.1.3")
def gdtr_idtr_limits(e: EntryContext) -> str | None:
    for name, field in (("GDTR", F.GUEST_GDTR_LIMIT), ("IDTR", F.GUEST_IDTR_LIMIT)):
        if e.read(field) >> 16:
            return f"guest {name} limit bits 31:16 must be 0"
    return None


# --- 27.3.1.4 Guest RIP, RFLAGS and SSP ----------------------------------------------------------
@_guest("27.3.1.4")
def rip_upper_bits(e: EntryContext) -> str | None:
    long_mode_code = e.ia32e_mode_guest and bool(e.segment(CS).ar & VMX_AR_L_MASK)
    if not long_mode_code and e.read(F.GUEST_RIP) >> 32:
        return "guest RIP bits 63:32 must be 0 unless \"IA-32e mode guest\" and CS.L are both 1"
    return None


@_guest("27.3.1.4")
def rip_canonical(e: EntryContext) -> str | None:
    long_mode_code = e.ia32e_mode_guest and bool(e.segment(CS).ar & VMX_AR_L_MASK)
    if long_mode_code and not canonical(e.read(F.GUEST_RIP)):
        return "guest RIP must be canonical when \"IA-32e mode guest\" and CS.L are both 1"
    return None


@_guest("27.3.1.4")
def rflags_reserved_bits(e: EntryContext) -> str | None:
    if e.guest_rflags & RFLAGS_RESERVED_MASK:
        return "guest RFLAGS reserved bits 63:22, 15, 5 and 3 must be 0"
    return None


@_guest("27.3.1.4")
def rflags_fixed_bit_1(e: EntryContext) -> str | None:
    if not e.guest_rflags & Rflags.FIXED:
        return "guest RFLAGS reserved bit 1 must be 1"
    return None


@_guest("27.3.1.4")
def rflags_vm(e: EntryContext) -> str | None:
    if e.v8086 and (e.ia32e_mode_guest or not e.guest_cr0 & Cr0.PE):
        return "guest RFLAGS.VM must be 0 when \"IA-32e mode guest\" is 1 or CR0.PE is 0"
    return None


@_guest("27.3.1.4")
def rflags_if_for_external_interrupt(e: EntryContext) -> str | None:
    if e.injecting_type(InterruptionType.EXT_INTR) and not e.guest_rflags & Rflags.IF:
        return "guest RFLAGS.IF must be 1 when injecting an external interrupt"
    return None


# SSP ("load CET state"): not supported.


# --- 27.3.1.5 Guest non-register state -----------------------------------------------------------
@_guest("27.3.1.5")
def activity_state_supported(e: EntryContext) -> str | None:
    state = e.activity_state
    if state != GuestActivityState.ACTIVE and not (
        state in _ACTIVITY_STATE_MISC_BIT and e.profile.vmx_misc & _ACTIVITY_STATE_MISC_BIT[state]
    ):
        return "the activity state must be 0-3 and supported by IA32_VMX_MISC[8:6]"
    return None


@_guest("27.3.1.5")
def activity_hlt_requires_ss_dpl_0(e: EntryContext) -> str | None:
    if e.activity_state == GuestActivityState.HLT and e.segment(SS).dpl != 0:
        return "the activity state must not be HLT when SS DPL is not 0"
    return None


@_guest("27.3.1.5")
def activity_active_when_sti_or_mov_ss_blocking(e: EntryContext) -> str | None:
    blocking = e.interruptibility & (GuestInterruptibility.STI | GuestInterruptibility.MOV_SS)
    if blocking and e.activity_state != GuestActivityState.ACTIVE:
        return "the activity state must be active when there is blocking by STI or by MOV SS"
    return None


def _injection_allowed(state: int, kind: int, vector: int) -> bool:
    """Which injected events each activity state allows (SDM 27.3.1.5)."""
    if state == GuestActivityState.HLT:
        return (
            kind in (InterruptionType.EXT_INTR, InterruptionType.NMI_INTR)
            or (kind == InterruptionType.HARD_EXCEPTION and vector in (ExceptionVector.DB, ExceptionVector.MC))
            or (kind == InterruptionType.OTHER_EVENT and vector == 0)
        )
    if state == GuestActivityState.SHUTDOWN:
        return kind == InterruptionType.NMI_INTR or (
            kind == InterruptionType.HARD_EXCEPTION and vector == ExceptionVector.MC
        )
    if state == GuestActivityState.WAIT_SIPI:
        return False
    return True


@_guest("27.3.1.5")
def activity_state_allows_injection(e: EntryContext) -> str | None:
    state = e.activity_state
    if e.injecting and not _injection_allowed(state, e.event_type, e.vector):
        name = {1: "HLT", 2: "shutdown", 3: "wait-for-SIPI"}.get(state, str(state))
        return f"the injected event must be one the {name} activity state allows"
    return None


# The wait-for-SIPI state with "entry to SMM" = 1: "entry to SMM" is never 1 here.


@_guest("27.3.1.5")
def interruptibility_reserved_bits(e: EntryContext) -> str | None:
    if e.interruptibility & _INTERRUPTIBILITY_RESERVED:
        return "interruptibility state: reserved bits 31:5 must be 0"
    return None


@_guest("27.3.1.5")
def interruptibility_sti_and_mov_ss(e: EntryContext) -> str | None:
    both = GuestInterruptibility.STI | GuestInterruptibility.MOV_SS
    if e.interruptibility & both == both:
        return "interruptibility state: blocking by STI and by MOV SS cannot both be 1"
    return None


@_guest("27.3.1.5")
def interruptibility_sti_requires_if(e: EntryContext) -> str | None:
    if e.interruptibility & GuestInterruptibility.STI and not e.guest_rflags & Rflags.IF:
        return "interruptibility state: blocking by STI must be 0 when RFLAGS.IF is 0"
    return None


@_guest("27.3.1.5")
def interruptibility_external_interrupt_injection(e: EntryContext) -> str | None:
    blocking = e.interruptibility & (GuestInterruptibility.STI | GuestInterruptibility.MOV_SS)
    if e.injecting_type(InterruptionType.EXT_INTR) and blocking:
        return "interruptibility state: blocking by STI and by MOV SS must be 0 when injecting an external interrupt"
    return None


@_guest("27.3.1.5")
def interruptibility_nmi_injection_mov_ss(e: EntryContext) -> str | None:
    if e.injecting_type(InterruptionType.NMI_INTR) and e.interruptibility & GuestInterruptibility.MOV_SS:
        return "interruptibility state: blocking by MOV SS must be 0 when injecting an NMI"
    return None


@_guest("27.3.1.5")
def interruptibility_smi_outside_smm(e: EntryContext) -> str | None:
    if e.interruptibility & GuestInterruptibility.SMI:
        return "interruptibility state: blocking by SMI must be 0 outside SMM"
    return None


# Blocking by SMI must be 1 with "entry to SMM": "entry to SMM" is never 1 here.


@_guest("27.3.1.5", qualification=ENTRY_FAIL_NMI)
def interruptibility_nmi_injection_sti(e: EntryContext) -> str | None:
    # "A processor may require bit 0 (blocking by STI) to be 0 ... when injecting an NMI": this one
    # does, and reports it with exit qualification 3 (SDM 27.8).
    if e.injecting_type(InterruptionType.NMI_INTR) and e.interruptibility & GuestInterruptibility.STI:
        return "interruptibility state: blocking by STI must be 0 when injecting an NMI (this processor requires it)"
    return None


@_guest("27.3.1.5")
def interruptibility_nmi_injection_virtual_nmi_blocking(e: EntryContext) -> str | None:
    if (
        e.virtual_nmis
        and e.injecting_type(InterruptionType.NMI_INTR)
        and e.interruptibility & GuestInterruptibility.NMI
    ):
        return "interruptibility state: blocking by NMI must be 0 when injecting an NMI with \"virtual NMIs\" = 1"
    return None


@_guest("27.3.1.5")
def interruptibility_enclave(e: EntryContext) -> str | None:
    # Bit 4 (enclave interruption) needs SGX, which this processor does not have.
    if e.interruptibility & GuestInterruptibility.ENCLAVE_INTR:
        return "interruptibility state: enclave interruption (bit 4) must be 0 without SGX support"
    return None


@_guest("27.3.1.5")
def pending_debug_reserved_bits(e: EntryContext) -> str | None:
    if e.read(F.GUEST_PENDING_DBG_EXCEPTIONS) & _PENDING_DBG_RESERVED:
        return "pending debug exceptions: bits 11:4, 13, 15 and 63:16 must be 0 (no RTM)"
    return None


def _bs_checked(e: EntryContext) -> bool:
    return bool(
        e.interruptibility & (GuestInterruptibility.STI | GuestInterruptibility.MOV_SS)
        or e.activity_state == GuestActivityState.HLT
    )


def _single_step_trap_pending(e: EntryContext) -> bool:
    """RFLAGS.TF = 1 and IA32_DEBUGCTL.BTF = 0: a single-step trap is due after the instruction."""
    return bool(e.guest_rflags & Rflags.TF) and not e.read(F.GUEST_IA32_DEBUGCTL) & _DEBUGCTL_BTF


@_guest("27.3.1.5")
def pending_debug_bs_set(e: EntryContext) -> str | None:
    bs = e.read(F.GUEST_PENDING_DBG_EXCEPTIONS) & _PENDING_DBG_BS
    if _bs_checked(e) and _single_step_trap_pending(e) and not bs:
        return (
            "pending debug exceptions: BS must be 1 when RFLAGS.TF = 1 and IA32_DEBUGCTL.BTF = 0 "
            "(blocking by STI or MOV SS, or HLT)"
        )
    return None


@_guest("27.3.1.5")
def pending_debug_bs_clear(e: EntryContext) -> str | None:
    bs = e.read(F.GUEST_PENDING_DBG_EXCEPTIONS) & _PENDING_DBG_BS
    if _bs_checked(e) and not _single_step_trap_pending(e) and bs:
        return (
            "pending debug exceptions: BS must be 0 when RFLAGS.TF = 0 or IA32_DEBUGCTL.BTF = 1 "
            "(blocking by STI or MOV SS, or HLT)"
        )
    return None


# Pending debug exceptions with RTM (bit 16): RTM is not supported, so bit 16 is reserved above.


@_guest("27.3.1.5", qualification=ENTRY_FAIL_VMCS_LINK_PTR)
def vmcs_link_pointer(e: EntryContext) -> str | None:
    link = e.read(F.VMCS_LINK_POINTER)
    if link == _INVALID_VMCS_POINTER:
        return None
    if link & 0xFFF:
        return "VMCS link pointer: bits 11:0 must be 0"
    if e.beyond_phys_width(link):
        return "VMCS link pointer: bits beyond the physical-address width must be 0"
    # A read beyond the end of memory returns all ones, which can never match.
    header = (
        e.memory.read32(link) if e.memory is not None and e.memory.contains(link, 4) else 0xFFFFFFFF
    )
    if header & 0x7FFFFFFF != e.profile.revision_id:
        return "VMCS link pointer: bits 30:0 of the referenced VMCS must hold the VMCS revision identifier"
    if bool(header & VMCS_SHADOW_INDICATOR) != bool(e.secondary & S.SHADOW_VMCS):
        return "VMCS link pointer: bit 31 of the referenced VMCS must equal \"VMCS shadowing\" (0)"
    if link == e.vmcs.address:
        return "VMCS link pointer: must not be the current-VMCS pointer"
    return None


# --- 27.3.1.6 Guest page-directory-pointer-table entries -----------------------------------------
def _pdpte_reserved(e: EntryContext) -> int:
    """PAE PDPTE reserved bits (SDM 4.4.1): 2:1, 8:5 and MAXPHYADDR-63 (bit 63, XD, included)."""
    return _PDPTE_RESERVED_LOW | (_U64 & ~((1 << e.profile.physical_address_width) - 1))


def _guest_pae_paging(e: EntryContext) -> bool:
    return bool(e.guest_cr0 & Cr0.PG and e.guest_cr4 & Cr4.PAE) and not e.ia32e_mode_guest


@_guest("27.3.1.6", qualification=ENTRY_FAIL_PDPTE)
def pdptes_valid(e: EntryContext) -> str | None:
    if not _guest_pae_paging(e):
        return None
    reserved = _pdpte_reserved(e)
    if e.ept:
        for i, field in enumerate(_PDPTE_FIELDS):
            pdpte = e.read(field)
            if pdpte & _PDPTE_PRESENT and pdpte & reserved:
                return f"guest PDPTE{i} field: a present PDPTE must not set reserved bits (\"enable EPT\" = 1)"
        return None
    table = e.read(F.GUEST_CR3) & 0xFFFFFFE0
    for i in range(4):
        address = table + 8 * i
        # A read beyond the end of memory returns all ones: present, with reserved bits set.
        in_memory = e.memory is not None and e.memory.contains(address, 8)
        pdpte = e.memory.read64(address) if e.memory is not None and in_memory else _U64
        if pdpte & _PDPTE_PRESENT and pdpte & reserved:
            return f"PDPTE{i} loaded from guest CR3 must not set reserved bits when present (\"enable EPT\" = 0)"
    return None


# =================================================================================================
# The entry points VMLAUNCH/VMRESUME call (SDM 31.3), in the order of SDM 27.1
# =================================================================================================
def check_vmx_controls(
    vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory | None = None
) -> EntryCheckFailure | None:
    """SDM 27.2.1: the VM-execution, VM-exit and VM-entry control fields (VMfailValid(7))."""
    return _first_failure(CONTROL_CHECKS, EntryContext(vmcs, profile, memory))


def check_host_state(
    vmcs: VmcsRegion, profile: CpuProfile, *, host_ia32e_mode: bool = True
) -> EntryCheckFailure | None:
    """SDM 27.2.2-27.2.4: the host-state area (VMfailValid(8)).

    ``host_ia32e_mode`` says whether the processor executing VMLAUNCH/VMRESUME is in IA-32e mode
    (IA32_EFER.LMA = 1); the modelled host always is, so "host address-space size" must be 1."""
    return _first_failure(HOST_STATE_CHECKS, EntryContext(vmcs, profile, host_ia32e_mode=host_ia32e_mode))


def check_guest_state(
    vmcs: VmcsRegion, profile: CpuProfile, memory: PhysicalMemory | None = None
) -> EntryCheckFailure | None:
    """SDM 27.3.1: the guest-state area (VM-entry failure, exit reason 33; the qualification is
    2 for a PDPTE, 3 for NMI injection under STI blocking, 4 for the VMCS link pointer)."""
    return _first_failure(GUEST_STATE_CHECKS, EntryContext(vmcs, profile, memory))


# --- SDM 27.4 Loading MSRs (VM-entry failure, exit reason 34) ------------------------------------
MSR_ENTRY_SIZE = 16  # bits 31:0 index, 63:32 reserved, 127:64 data (SDM 25.8.2, Table 25-15)


def max_msr_list_entries(profile: CpuProfile) -> int:
    """512 * (N + 1), N = IA32_VMX_MISC[27:25]: the recommended maximum length of an MSR list
    (SDM A.6)."""
    return 512 * (((profile.vmx_misc >> VMX_MISC_MSR_LIST_MULTIPLIER_SHIFT) & 7) + 1)


def _msr_entry_violation(index: int, reserved: int, value: int) -> str | None:
    """Why the processor refuses to load one VM-entry MSR-load entry (SDM 27.4), in SDM order."""
    if index in (Msr.FS_BASE, Msr.GS_BASE):
        return "IA32_FS_BASE and IA32_GS_BASE cannot be loaded from the VM-entry MSR-load area"
    if index >> 8 == _X2APIC_MSR_RANGE_HIGH:
        return "x2APIC MSRs (index 800H-8FFH) cannot be loaded from the VM-entry MSR-load area"
    if index == _MSR_IA32_SMM_MONITOR_CTL:
        return "IA32_SMM_MONITOR_CTL can be written only in SMM"
    if reserved:
        return "bits 63:32 of an MSR-load entry must be 0"
    if index == Msr.EFER and _efer_reserved(value):
        return "IA32_EFER: WRMSR of this value would #GP (reserved bits set)"
    return None


def load_msrs(vmcs: VmcsRegion, processor: Processor) -> EntryCheckFailure | None:
    """SDM 27.4: process the VM-entry MSR-load area, entry by entry.

    The accepted (index, value) pairs go to ``processor.entry_msr_loads`` (a new list on every
    call) for the CPU engine to apply.  The first entry that cannot be loaded fails the VM entry
    with that entry's number (1-based) as the exit qualification; entries before it stay in the
    list, as a real processor has already loaded them.

    A list longer than 512 * (IA32_VMX_MISC[27:25] + 1) entries is "undefined processor
    behaviour" in the SDM (A.6), not a control-field check of 27.2.1; this processor, like KVM's
    nested_vmx_load_msr, fails at the first entry beyond that limit.
    """
    loads: list[tuple[int, int]] = []
    processor.entry_msr_loads = loads
    count = vmcs.read(F.VM_ENTRY_MSR_LOAD_COUNT)
    if count == 0:
        return None
    area = vmcs.read(F.VM_ENTRY_MSR_LOAD_ADDR)
    limit = max_msr_list_entries(processor.profile)
    memory = processor.memory
    for number in range(1, count + 1):
        if number > limit:
            return _msr_failure("the MSR-load list must not be longer than 512 * (IA32_VMX_MISC[27:25] + 1)", number)
        address = area + MSR_ENTRY_SIZE * (number - 1)
        if not memory.contains(address, MSR_ENTRY_SIZE):
            return _msr_failure("the MSR-load entry lies outside physical memory (reads return all ones)", number)
        header = memory.read64(address)
        value = memory.read64(address + 8)
        index, reserved = header & 0xFFFFFFFF, header >> 32
        broken = _msr_entry_violation(index, reserved, value)
        if broken is not None:
            return _msr_failure(broken, number)
        loads.append((index, value))
    return None


def _msr_failure(rule: str, number: int) -> EntryCheckFailure:
    return EntryCheckFailure(CheckArea.MSR_LOADING, f"SDM 27.4: {rule}", qualification=number)
