"""SDM 27.3.1.5-27.3.1.6 Checks on the guest non-register state (activity and interruptibility
state, pending debug exceptions, the VMCS link pointer) and on the PAE PDPTEs (exit reason 33;
the exit qualification names a PDPTE or VMCS-link-pointer failure, SDM 27.8).
"""

from __future__ import annotations

from pyvmx.arch.controls import (
    VMX_MISC_ACTIVITY_HLT,
    VMX_MISC_ACTIVITY_SHUTDOWN,
    VMX_MISC_ACTIVITY_WAIT_SIPI,
    GuestActivityState,
    GuestInterruptibility,
    InterruptionType,
)
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.qualifications import ENTRY_FAIL_NMI, ENTRY_FAIL_PDPTE, ENTRY_FAIL_VMCS_LINK_PTR
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import DR6_BS, Cr0, Cr4, ExceptionVector, Rflags
from pyvmx.vmx.entry_checks.context import U64, EntryContext
from pyvmx.vmx.entry_checks.registry import guest
from pyvmx.vmx.state import SS
from pyvmx.vmx.vmcs import VMCS_SHADOW_INDICATOR

_INVALID_VMCS_POINTER = U64

# IA32_DEBUGCTL.BTF (SDM 18.4.1): single-step on branches.  TODO(arch): move.
_DEBUGCTL_BTF = 1 << 1

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
_PENDING_DBG_RESERVED = U64 & ~(0xF | (1 << 12) | DR6_BS)

# PAE page-directory-pointer-table entries (SDM 4.4.1): present (0); reserved 2:1 and 8:5, and
# every bit from MAXPHYADDR up (bit 63 too: PDPTEs have no XD bit).
_PDPTE_PRESENT = 1 << 0
_PDPTE_RESERVED_LOW = 0x1E6
_PDPTE_FIELDS = (F.GUEST_PDPTR0, F.GUEST_PDPTR1, F.GUEST_PDPTR2, F.GUEST_PDPTR3)


# --- 27.3.1.5 Guest non-register state -----------------------------------------------------------
@guest("27.3.1.5")
def activity_state_supported(e: EntryContext) -> str | None:
    state = e.activity_state
    if state != GuestActivityState.ACTIVE and not (
        state in _ACTIVITY_STATE_MISC_BIT and e.profile.vmx_misc & _ACTIVITY_STATE_MISC_BIT[state]
    ):
        return "the activity state must be 0-3 and supported by IA32_VMX_MISC[8:6]"
    return None


@guest("27.3.1.5")
def activity_hlt_requires_ss_dpl_0(e: EntryContext) -> str | None:
    if e.activity_state == GuestActivityState.HLT and e.segment(SS).dpl != 0:
        return "the activity state must not be HLT when SS DPL is not 0"
    return None


@guest("27.3.1.5")
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


@guest("27.3.1.5")
def activity_state_allows_injection(e: EntryContext) -> str | None:
    state = e.activity_state
    if e.injecting and not _injection_allowed(state, e.event_type, e.vector):
        name = {1: "HLT", 2: "shutdown", 3: "wait-for-SIPI"}.get(state, str(state))
        return f"the injected event must be one the {name} activity state allows"
    return None


# The wait-for-SIPI state with "entry to SMM" = 1: "entry to SMM" is never 1 here.


@guest("27.3.1.5")
def interruptibility_reserved_bits(e: EntryContext) -> str | None:
    if e.interruptibility & _INTERRUPTIBILITY_RESERVED:
        return "interruptibility state: reserved bits 31:5 must be 0"
    return None


@guest("27.3.1.5")
def interruptibility_sti_and_mov_ss(e: EntryContext) -> str | None:
    both = GuestInterruptibility.STI | GuestInterruptibility.MOV_SS
    if e.interruptibility & both == both:
        return "interruptibility state: blocking by STI and by MOV SS cannot both be 1"
    return None


@guest("27.3.1.5")
def interruptibility_sti_requires_if(e: EntryContext) -> str | None:
    if e.interruptibility & GuestInterruptibility.STI and not e.guest_rflags & Rflags.IF:
        return "interruptibility state: blocking by STI must be 0 when RFLAGS.IF is 0"
    return None


@guest("27.3.1.5")
def interruptibility_external_interrupt_injection(e: EntryContext) -> str | None:
    blocking = e.interruptibility & (GuestInterruptibility.STI | GuestInterruptibility.MOV_SS)
    if e.injecting_type(InterruptionType.EXT_INTR) and blocking:
        return "interruptibility state: blocking by STI and by MOV SS must be 0 when injecting an external interrupt"
    return None


@guest("27.3.1.5")
def interruptibility_nmi_injection_mov_ss(e: EntryContext) -> str | None:
    if e.injecting_type(InterruptionType.NMI_INTR) and e.interruptibility & GuestInterruptibility.MOV_SS:
        return "interruptibility state: blocking by MOV SS must be 0 when injecting an NMI"
    return None


@guest("27.3.1.5")
def interruptibility_smi_outside_smm(e: EntryContext) -> str | None:
    if e.interruptibility & GuestInterruptibility.SMI:
        return "interruptibility state: blocking by SMI must be 0 outside SMM"
    return None


# Blocking by SMI must be 1 with "entry to SMM": "entry to SMM" is never 1 here.


@guest("27.3.1.5", qualification=ENTRY_FAIL_NMI)
def interruptibility_nmi_injection_sti(e: EntryContext) -> str | None:
    # "A processor may require bit 0 (blocking by STI) to be 0 ... when injecting an NMI": this one
    # does, and reports it with exit qualification 3 (SDM 27.8).
    if e.injecting_type(InterruptionType.NMI_INTR) and e.interruptibility & GuestInterruptibility.STI:
        return "interruptibility state: blocking by STI must be 0 when injecting an NMI (this processor requires it)"
    return None


@guest("27.3.1.5")
def interruptibility_nmi_injection_virtual_nmi_blocking(e: EntryContext) -> str | None:
    if (
        e.virtual_nmis
        and e.injecting_type(InterruptionType.NMI_INTR)
        and e.interruptibility & GuestInterruptibility.NMI
    ):
        return "interruptibility state: blocking by NMI must be 0 when injecting an NMI with \"virtual NMIs\" = 1"
    return None


@guest("27.3.1.5")
def interruptibility_enclave(e: EntryContext) -> str | None:
    # Bit 4 (enclave interruption) needs SGX, which this processor does not have.
    if e.interruptibility & GuestInterruptibility.ENCLAVE_INTR:
        return "interruptibility state: enclave interruption (bit 4) must be 0 without SGX support"
    return None


@guest("27.3.1.5")
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


@guest("27.3.1.5")
def pending_debug_bs_set(e: EntryContext) -> str | None:
    bs = e.read(F.GUEST_PENDING_DBG_EXCEPTIONS) & _PENDING_DBG_BS
    if _bs_checked(e) and _single_step_trap_pending(e) and not bs:
        return (
            "pending debug exceptions: BS must be 1 when RFLAGS.TF = 1 and IA32_DEBUGCTL.BTF = 0 "
            "(blocking by STI or MOV SS, or HLT)"
        )
    return None


@guest("27.3.1.5")
def pending_debug_bs_clear(e: EntryContext) -> str | None:
    bs = e.read(F.GUEST_PENDING_DBG_EXCEPTIONS) & _PENDING_DBG_BS
    if _bs_checked(e) and not _single_step_trap_pending(e) and bs:
        return (
            "pending debug exceptions: BS must be 0 when RFLAGS.TF = 0 or IA32_DEBUGCTL.BTF = 1 "
            "(blocking by STI or MOV SS, or HLT)"
        )
    return None


# Pending debug exceptions with RTM (bit 16): RTM is not supported, so bit 16 is reserved above.


@guest("27.3.1.5", qualification=ENTRY_FAIL_VMCS_LINK_PTR)
def vmcs_link_pointer(e: EntryContext) -> str | None:
    link = e.read(F.VMCS_LINK_POINTER)
    if link == _INVALID_VMCS_POINTER:
        return None
    if link & 0xFFF:
        return "VMCS link pointer: bits 11:0 must be 0"
    if e.beyond_phys_width(link):
        return "VMCS link pointer: bits beyond the physical-address width must be 0"
    # A read beyond the end of memory returns all ones, which can never match.
    header = e.read_physical(link, 4)
    if header & 0x7FFFFFFF != e.profile.revision_id:
        return "VMCS link pointer: bits 30:0 of the referenced VMCS must hold the VMCS revision identifier"
    if bool(header & VMCS_SHADOW_INDICATOR) != bool(e.secondary & S.SHADOW_VMCS):
        return "VMCS link pointer: bit 31 of the referenced VMCS must equal \"VMCS shadowing\" (0)"
    if link == e.vmcs_address:
        return "VMCS link pointer: must not be the current-VMCS pointer"
    return None


# --- 27.3.1.6 Guest page-directory-pointer-table entries -----------------------------------------
def _pdpte_reserved(e: EntryContext) -> int:
    """PAE PDPTE reserved bits (SDM 4.4.1): 2:1, 8:5 and MAXPHYADDR-63 (bit 63, XD, included)."""
    return _PDPTE_RESERVED_LOW | (U64 & ~((1 << e.profile.physical_address_width) - 1))


def _guest_pae_paging(e: EntryContext) -> bool:
    return bool(e.guest_cr0 & Cr0.PG and e.guest_cr4 & Cr4.PAE) and not e.ia32e_mode_guest


@guest("27.3.1.6", qualification=ENTRY_FAIL_PDPTE)
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
        pdpte = e.read_physical(address, 8)
        if pdpte & _PDPTE_PRESENT and pdpte & reserved:
            return f"PDPTE{i} loaded from guest CR3 must not set reserved bits when present (\"enable EPT\" = 0)"
    return None
