"""SDM 27.3.1.1-27.3.1.4 Checks on the guest register state: control and debug registers and
MSRs, segment registers, descriptor-table registers, RIP and RFLAGS (a broken rule fails the VM
entry with exit reason 33, "VM-entry failure due to invalid guest state").
"""

from __future__ import annotations

from pyvmx.arch.controls import InterruptionType
from pyvmx.arch.controls import VmEntryControls as E
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import (
    RFLAGS_RESERVED_MASK,
    SYS_TYPE_LDT,
    SYS_TYPE_TSS16_BUSY,
    SYS_TYPE_TSS_BUSY,
    VMX_AR_DB_MASK,
    VMX_AR_L_MASK,
    VMX_AR_P_MASK,
    VMX_AR_S_MASK,
    VMX_AR_TYPE_ACCESSES_MASK,
    VMX_AR_TYPE_CODE_MASK,
    VMX_AR_TYPE_READABLE_MASK,
    Cr0,
    Cr4,
    Efer,
    Rflags,
)
from pyvmx.vmx.entry_checks.context import (
    SEGMENT_RPL_MASK,
    SEGMENT_TI_MASK,
    U64,
    EntryContext,
    efer_reserved,
    fixed_bits_ok,
    limit_granularity_ok,
    pat_valid,
    upper_bits_identical,
)
from pyvmx.vmx.entry_checks.registry import guest
from pyvmx.vmx.state import CS, DS, ES, FS, GS, LDTR, SEGMENT_NAMES, SS, TR


# VMX access rights: reserved bits 11:8 and 31:17 (together Linux's VMX_AR_RESERVD_MASK).
_AR_RESERVED_11_8 = 0x00000F00
_AR_RESERVED_31_17 = 0xFFFE0000

# IA32_DEBUGCTL (SDM 18.4.1): LBR (0), BTF (1), TR (6), BTS (7), BTINT (8), BTS_OFF_OS (9),
# BTS_OFF_USR (10), FREEZE_LBRS_ON_PMI (11), FREEZE_PERFMON_ON_PMI (12), ENABLE_UNCORE_PMI (13),
# FREEZE_WHILE_SMM (14), RTM_DEBUG (15); bits 5:2 and 63:16 are reserved.  TODO(arch): move.
_DEBUGCTL_RESERVED = U64 & ~(0b11 | (0x3FF << 6))


# =================================================================================================
# SDM 27.3.1 Checks on the Guest-State Area (VM-entry failure, exit reason 33)
# =================================================================================================

# --- 27.3.1.1 Guest control registers, debug registers and MSRs ----------------------------------
@guest("27.3.1.1")
def guest_cr0_fixed_bits(e: EntryContext) -> str | None:
    fixed0 = e.profile.cr0_fixed0
    if e.unrestricted_guest:
        fixed0 &= ~int(Cr0.PE | Cr0.PG)  # not checked with "unrestricted guest" = 1
    fixed1 = e.profile.cr0_fixed1 | int(Cr0.NW | Cr0.CD)  # NW and CD are never checked
    if not fixed_bits_ok(e.guest_cr0, fixed0, fixed1):
        return (
            "guest CR0 must not set any bit to a value not supported in VMX operation "
            "(PE and PG exempt with \"unrestricted guest\"; NW and CD never checked)"
        )
    return None


@guest("27.3.1.1")
def guest_cr0_pg_requires_pe(e: EntryContext) -> str | None:
    if e.guest_cr0 & Cr0.PG and not e.guest_cr0 & Cr0.PE:
        return "guest CR0.PE must be 1 when CR0.PG is 1"
    return None


@guest("27.3.1.1")
def guest_cr4_fixed_bits(e: EntryContext) -> str | None:
    if not fixed_bits_ok(e.guest_cr4, e.profile.cr4_fixed0, e.profile.cr4_fixed1):
        return "guest CR4 must not set any bit to a value not supported in VMX operation (IA32_VMX_CR4_FIXED0/1)"
    return None


# Guest CR4.CET = 1 requires CR0.WP = 1: CR4.CET is not supported (the CR4 check rejects it).


@guest("27.3.1.1")
def guest_debugctl_reserved_bits(e: EntryContext) -> str | None:
    if e.load_debug_controls and e.read(F.GUEST_IA32_DEBUGCTL) & _DEBUGCTL_RESERVED:
        return "guest IA32_DEBUGCTL: reserved bits must be 0 (\"load debug controls\" = 1)"
    return None


@guest("27.3.1.1")
def ia32e_guest_requires_paging(e: EntryContext) -> str | None:
    if e.ia32e_mode_guest and (not e.guest_cr0 & Cr0.PG or not e.guest_cr4 & Cr4.PAE):
        return "guest CR0.PG and CR4.PAE must each be 1 when \"IA-32e mode guest\" is 1"
    return None


@guest("27.3.1.1")
def non_ia32e_guest_pcide(e: EntryContext) -> str | None:
    if not e.ia32e_mode_guest and e.guest_cr4 & Cr4.PCIDE:
        return "guest CR4.PCIDE must be 0 when \"IA-32e mode guest\" is 0"
    return None


@guest("27.3.1.1")
def guest_cr3_width(e: EntryContext) -> str | None:
    if e.beyond_phys_width(e.read(F.GUEST_CR3)):
        return "guest CR3 bits beyond the physical-address width must be 0"
    return None


@guest("27.3.1.1")
def guest_dr7_upper_bits(e: EntryContext) -> str | None:
    if e.load_debug_controls and e.read(F.GUEST_DR7) >> 32:
        return "guest DR7 bits 63:32 must be 0 (\"load debug controls\" = 1)"
    return None


@guest("27.3.1.1")
def guest_sysenter_canonical(e: EntryContext) -> str | None:
    for name, field in (("ESP", F.GUEST_SYSENTER_ESP), ("EIP", F.GUEST_SYSENTER_EIP)):
        if not e.canonical(e.read(field)):
            return f"guest IA32_SYSENTER_{name} must contain a canonical address"
    return None


# "load IA32_PERF_GLOBAL_CTRL" (VM-entry): not supported.


@guest("27.3.1.1")
def guest_pat(e: EntryContext) -> str | None:
    if e.entry_controls & E.LOAD_IA32_PAT and not pat_valid(e.read(F.GUEST_IA32_PAT)):
        return "guest IA32_PAT: each byte must be 0, 1, 4, 5, 6 or 7 (\"load IA32_PAT\" = 1)"
    return None


@guest("27.3.1.1")
def guest_efer_reserved_bits(e: EntryContext) -> str | None:
    if e.entry_controls & E.LOAD_IA32_EFER and efer_reserved(e.read(F.GUEST_IA32_EFER)):
        return "guest IA32_EFER: reserved bits must be 0 (\"load IA32_EFER\" = 1)"
    return None


@guest("27.3.1.1")
def guest_efer_lma(e: EntryContext) -> str | None:
    if e.entry_controls & E.LOAD_IA32_EFER:
        if bool(e.read(F.GUEST_IA32_EFER) & Efer.LMA) != e.ia32e_mode_guest:
            return "guest IA32_EFER.LMA must equal \"IA-32e mode guest\" (\"load IA32_EFER\" = 1)"
    return None


@guest("27.3.1.1")
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
@guest("27.3.1.2")
def tr_selector_ti(e: EntryContext) -> str | None:
    if e.segment(TR).selector & SEGMENT_TI_MASK:
        return "guest TR selector: TI (bit 2) must be 0"
    return None


@guest("27.3.1.2")
def ldtr_selector_ti(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).selector & SEGMENT_TI_MASK:
        return "guest LDTR selector: TI (bit 2) must be 0 when LDTR is usable"
    return None


@guest("27.3.1.2")
def ss_rpl_equals_cs_rpl(e: EntryContext) -> str | None:
    if e.v8086 or e.unrestricted_guest:
        return None
    if e.segment(SS).selector & SEGMENT_RPL_MASK != e.segment(CS).selector & SEGMENT_RPL_MASK:
        return "guest SS selector RPL must equal CS selector RPL (not virtual-8086, no unrestricted guest)"
    return None


# Base-address fields.
@guest("27.3.1.2")
def v8086_segment_bases(e: EntryContext) -> str | None:
    if not e.v8086:
        return None
    for index in _CODE_DATA:
        seg = e.segment(index)
        if seg.base != seg.selector << 4:
            return f"guest {SEGMENT_NAMES[index]} base must be the selector shifted left 4 bits (virtual-8086)"
    return None


@guest("27.3.1.2")
def tr_fs_gs_bases_canonical(e: EntryContext) -> str | None:
    for index in (TR, FS, GS):
        if not e.canonical(e.segment(index).base):
            return f"guest {SEGMENT_NAMES[index]} base must be canonical"
    return None


@guest("27.3.1.2")
def ldtr_base_canonical(e: EntryContext) -> str | None:
    if e.usable(LDTR) and not e.canonical(e.segment(LDTR).base):
        return "guest LDTR base must be canonical when LDTR is usable"
    return None


@guest("27.3.1.2")
def cs_base_upper_bits(e: EntryContext) -> str | None:
    if e.segment(CS).base >> 32:
        return "guest CS base bits 63:32 must be 0"
    return None


@guest("27.3.1.2")
def ss_ds_es_base_upper_bits(e: EntryContext) -> str | None:
    for index in (SS, DS, ES):
        if e.usable(index) and e.segment(index).base >> 32:
            return f"guest {SEGMENT_NAMES[index]} base bits 63:32 must be 0 when usable"
    return None


# Limit fields.
@guest("27.3.1.2")
def v8086_segment_limits(e: EntryContext) -> str | None:
    if not e.v8086:
        return None
    for index in _CODE_DATA:
        if e.segment(index).limit != 0xFFFF:
            return f"guest {SEGMENT_NAMES[index]} limit must be 0000FFFFH (virtual-8086)"
    return None


# Access-rights fields of CS, SS, DS, ES, FS, GS.
@guest("27.3.1.2")
def v8086_segment_access_rights(e: EntryContext) -> str | None:
    if not e.v8086:
        return None
    for index in _CODE_DATA:
        if e.segment(index).ar != 0xF3:
            return f"guest {SEGMENT_NAMES[index]} access rights must be 000000F3H (virtual-8086)"
    return None


@guest("27.3.1.2")
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


@guest("27.3.1.2")
def ss_type(e: EntryContext) -> str | None:
    if _ar_checked(e, SS) and e.segment(SS).type not in (3, 7):
        return "guest SS type must be 3 or 7 (read/write accessed data) when usable"
    return None


@guest("27.3.1.2")
def data_segment_accessed(e: EntryContext) -> str | None:
    for index in _DATA:
        if _ar_checked(e, index) and not e.segment(index).type & VMX_AR_TYPE_ACCESSES_MASK:
            return f"guest {SEGMENT_NAMES[index]} type bit 0 (accessed) must be 1 when usable"
    return None


@guest("27.3.1.2")
def data_segment_code_readable(e: EntryContext) -> str | None:
    for index in _DATA:
        kind = e.segment(index).type
        if _ar_checked(e, index) and kind & VMX_AR_TYPE_CODE_MASK and not kind & VMX_AR_TYPE_READABLE_MASK:
            return f"guest {SEGMENT_NAMES[index]}: a code segment must be readable (type bit 1) when usable"
    return None


@guest("27.3.1.2")
def segment_s_bit(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        if _ar_checked(e, index) and not e.segment(index).ar & VMX_AR_S_MASK:
            return f"guest {SEGMENT_NAMES[index]} access rights: S (bit 4) must be 1 when usable"
    return None


@guest("27.3.1.2")
def cs_dpl_data_type(e: EntryContext) -> str | None:
    if not e.v8086 and e.segment(CS).type == 3 and e.segment(CS).dpl != 0:
        return "guest CS DPL must be 0 when CS type is 3 (unrestricted guest)"
    return None


@guest("27.3.1.2")
def cs_dpl_nonconforming(e: EntryContext) -> str | None:
    if not e.v8086 and e.segment(CS).type in (9, 11) and e.segment(CS).dpl != e.segment(SS).dpl:
        return "guest CS DPL must equal SS DPL when CS is a non-conforming code segment (type 9 or 11)"
    return None


@guest("27.3.1.2")
def cs_dpl_conforming(e: EntryContext) -> str | None:
    if not e.v8086 and e.segment(CS).type in (13, 15) and e.segment(CS).dpl > e.segment(SS).dpl:
        return "guest CS DPL must not be greater than SS DPL when CS is a conforming code segment (type 13 or 15)"
    return None


@guest("27.3.1.2")
def ss_dpl_equals_rpl(e: EntryContext) -> str | None:
    if e.v8086 or e.unrestricted_guest:
        return None
    ss = e.segment(SS)
    if ss.dpl != ss.selector & SEGMENT_RPL_MASK:
        return "guest SS DPL must equal SS selector RPL (\"unrestricted guest\" = 0)"
    return None


@guest("27.3.1.2")
def ss_dpl_zero(e: EntryContext) -> str | None:
    if e.v8086 or e.segment(SS).dpl == 0:
        return None
    if e.segment(CS).type == 3 or not e.guest_cr0 & Cr0.PE:
        return "guest SS DPL must be 0 when CS type is 3 or CR0.PE is 0"
    return None


@guest("27.3.1.2")
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


@guest("27.3.1.2")
def segment_present(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        if _ar_checked(e, index) and not e.segment(index).ar & VMX_AR_P_MASK:
            return f"guest {SEGMENT_NAMES[index]} access rights: P (bit 7) must be 1 when usable"
    return None


@guest("27.3.1.2")
def segment_ar_reserved_11_8(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        if _ar_checked(e, index) and e.segment(index).ar & _AR_RESERVED_11_8:
            return f"guest {SEGMENT_NAMES[index]} access rights: reserved bits 11:8 must be 0 when usable"
    return None


@guest("27.3.1.2")
def cs_db_with_l(e: EntryContext) -> str | None:
    ar = e.segment(CS).ar
    if not e.v8086 and e.ia32e_mode_guest and ar & VMX_AR_L_MASK and ar & VMX_AR_DB_MASK:
        return "guest CS D/B must be 0 when CS.L is 1 in IA-32e mode"
    return None


@guest("27.3.1.2")
def segment_limit_granularity(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        seg = e.segment(index)
        if _ar_checked(e, index) and not limit_granularity_ok(seg.limit, seg.ar):
            return (
                f"guest {SEGMENT_NAMES[index]} limit and G are inconsistent when usable (limit bits 11:0 "
                "not all 1 needs G = 0; limit bits 31:20 not all 0 needs G = 1)"
            )
    return None


@guest("27.3.1.2")
def segment_ar_reserved_31_17(e: EntryContext) -> str | None:
    for index in _CODE_DATA:
        if _ar_checked(e, index) and e.segment(index).ar & _AR_RESERVED_31_17:
            return f"guest {SEGMENT_NAMES[index]} access rights: reserved bits 31:17 must be 0 when usable"
    return None


# Access-rights field of TR.
@guest("27.3.1.2")
def tr_type(e: EntryContext) -> str | None:
    kind = e.segment(TR).type
    if e.ia32e_mode_guest and kind != SYS_TYPE_TSS_BUSY:
        return "guest TR type must be 11 (busy 64-bit TSS) in IA-32e mode"
    if not e.ia32e_mode_guest and kind not in (SYS_TYPE_TSS16_BUSY, SYS_TYPE_TSS_BUSY):
        return "guest TR type must be 3 (busy 16-bit TSS) or 11 (busy 32-bit TSS) outside IA-32e mode"
    return None


@guest("27.3.1.2")
def tr_s_bit(e: EntryContext) -> str | None:
    if e.segment(TR).ar & VMX_AR_S_MASK:
        return "guest TR access rights: S (bit 4) must be 0"
    return None


@guest("27.3.1.2")
def tr_present(e: EntryContext) -> str | None:
    if not e.segment(TR).ar & VMX_AR_P_MASK:
        return "guest TR access rights: P (bit 7) must be 1"
    return None


@guest("27.3.1.2")
def tr_ar_reserved_11_8(e: EntryContext) -> str | None:
    if e.segment(TR).ar & _AR_RESERVED_11_8:
        return "guest TR access rights: reserved bits 11:8 must be 0"
    return None


@guest("27.3.1.2")
def tr_limit_granularity(e: EntryContext) -> str | None:
    tr = e.segment(TR)
    if not limit_granularity_ok(tr.limit, tr.ar):
        return "guest TR limit and G are inconsistent"
    return None


@guest("27.3.1.2")
def tr_usable(e: EntryContext) -> str | None:
    if not e.usable(TR):
        return "guest TR must be usable (access rights bit 16 must be 0)"
    return None


@guest("27.3.1.2")
def tr_ar_reserved_31_17(e: EntryContext) -> str | None:
    if e.segment(TR).ar & _AR_RESERVED_31_17:
        return "guest TR access rights: reserved bits 31:17 must be 0"
    return None


# Access-rights field of LDTR (checked only if LDTR is usable).
@guest("27.3.1.2")
def ldtr_type(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).type != SYS_TYPE_LDT:
        return "guest LDTR type must be 2 (LDT) when usable"
    return None


@guest("27.3.1.2")
def ldtr_s_bit(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).ar & VMX_AR_S_MASK:
        return "guest LDTR access rights: S (bit 4) must be 0 when usable"
    return None


@guest("27.3.1.2")
def ldtr_present(e: EntryContext) -> str | None:
    if e.usable(LDTR) and not e.segment(LDTR).ar & VMX_AR_P_MASK:
        return "guest LDTR access rights: P (bit 7) must be 1 when usable"
    return None


@guest("27.3.1.2")
def ldtr_ar_reserved_11_8(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).ar & _AR_RESERVED_11_8:
        return "guest LDTR access rights: reserved bits 11:8 must be 0 when usable"
    return None


@guest("27.3.1.2")
def ldtr_limit_granularity(e: EntryContext) -> str | None:
    ldtr = e.segment(LDTR)
    if e.usable(LDTR) and not limit_granularity_ok(ldtr.limit, ldtr.ar):
        return "guest LDTR limit and G are inconsistent when usable"
    return None


@guest("27.3.1.2")
def ldtr_ar_reserved_31_17(e: EntryContext) -> str | None:
    if e.usable(LDTR) and e.segment(LDTR).ar & _AR_RESERVED_31_17:
        return "guest LDTR access rights: reserved bits 31:17 must be 0 when usable"
    return None


# --- 27.3.1.3 Guest descriptor-table registers ---------------------------------------------------
@guest("27.3.1.3")
def gdtr_idtr_bases_canonical(e: EntryContext) -> str | None:
    for name, field in (("GDTR", F.GUEST_GDTR_BASE), ("IDTR", F.GUEST_IDTR_BASE)):
        if not e.canonical(e.read(field)):
            return f"guest {name} base must be canonical"
    return None


@guest("27.3.1.3")
def gdtr_idtr_limits(e: EntryContext) -> str | None:
    for name, field in (("GDTR", F.GUEST_GDTR_LIMIT), ("IDTR", F.GUEST_IDTR_LIMIT)):
        if e.read(field) >> 16:
            return f"guest {name} limit bits 31:16 must be 0"
    return None


# --- 27.3.1.4 Guest RIP, RFLAGS and SSP ----------------------------------------------------------
@guest("27.3.1.4")
def rip_upper_bits(e: EntryContext) -> str | None:
    long_mode_code = e.ia32e_mode_guest and bool(e.segment(CS).ar & VMX_AR_L_MASK)
    if not long_mode_code and e.read(F.GUEST_RIP) >> 32:
        return "guest RIP bits 63:32 must be 0 unless \"IA-32e mode guest\" and CS.L are both 1"
    return None


@guest("27.3.1.4")
def rip_linear_address_width(e: EntryContext) -> str | None:
    """The SDM: "If the processor supports N < 64 linear-address bits, bits 63:N must be identical
    if the 'IA-32e mode guest' VM-entry control is 1 and the L bit in the access-rights field for
    CS is 1" -- bits 63:N, not 63:N-1: with N = 48, RIP 0000_8000_0000_0000H passes (the guest faults on
    its first fetch instead), unlike the canonical rules of the other address fields."""
    long_mode_code = e.ia32e_mode_guest and bool(e.segment(CS).ar & VMX_AR_L_MASK)
    if long_mode_code and not upper_bits_identical(e.read(F.GUEST_RIP), e.profile.linear_address_width):
        return (
            "guest RIP bits 63:N (N = the linear-address width) must be identical when \"IA-32e mode "
            "guest\" and CS.L are both 1"
        )
    return None


@guest("27.3.1.4")
def rflags_reserved_bits(e: EntryContext) -> str | None:
    if e.guest_rflags & RFLAGS_RESERVED_MASK:
        return "guest RFLAGS reserved bits 63:22, 15, 5 and 3 must be 0"
    return None


@guest("27.3.1.4")
def rflags_fixed_bit_1(e: EntryContext) -> str | None:
    if not e.guest_rflags & Rflags.FIXED:
        return "guest RFLAGS reserved bit 1 must be 1"
    return None


@guest("27.3.1.4")
def rflags_vm(e: EntryContext) -> str | None:
    if e.v8086 and (e.ia32e_mode_guest or not e.guest_cr0 & Cr0.PE):
        return "guest RFLAGS.VM must be 0 when \"IA-32e mode guest\" is 1 or CR0.PE is 0"
    return None


@guest("27.3.1.4")
def rflags_if_for_external_interrupt(e: EntryContext) -> str | None:
    if e.injecting_type(InterruptionType.EXT_INTR) and not e.guest_rflags & Rflags.IF:
        return "guest RFLAGS.IF must be 1 when injecting an external interrupt"
    return None


# SSP ("load CET state"): not supported.
