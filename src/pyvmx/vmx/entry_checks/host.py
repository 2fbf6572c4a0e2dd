"""SDM 27.2.2-27.2.4 Checks on the Host-State Area (a broken rule fails VMLAUNCH/VMRESUME with
VMfailValid, error 8).  The rules of 27.2.4 read the mode of the processor executing the
instruction (IA32_EFER.LMA), not an assumption: a 32-bit host needs "host address-space size" 0.
"""

from __future__ import annotations

from pyvmx.arch.controls import VmExitControls as X
from pyvmx.arch.vmcs_fields import VmcsField
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr4, Efer
from pyvmx.vmx.entry_checks.context import (
    SEGMENT_RPL_MASK,
    SEGMENT_TI_MASK,
    EntryContext,
    efer_reserved,
    fixed_bits_ok,
    pat_valid,
)
from pyvmx.vmx.entry_checks.registry import host


# =================================================================================================
# SDM 27.2.2-27.2.4 Checks on Host-State Area (VMfailValid, error 8)
# =================================================================================================

# --- 27.2.2 Host control registers, MSRs and SSP -------------------------------------------------
@host("27.2.2")
def host_cr0_fixed_bits(e: EntryContext) -> str | None:
    if not fixed_bits_ok(e.read(F.HOST_CR0), e.profile.cr0_fixed0, e.profile.cr0_fixed1):
        return "host CR0 must not set any bit to a value not supported in VMX operation (IA32_VMX_CR0_FIXED0/1)"
    return None


@host("27.2.2")
def host_cr4_fixed_bits(e: EntryContext) -> str | None:
    if not fixed_bits_ok(e.read(F.HOST_CR4), e.profile.cr4_fixed0, e.profile.cr4_fixed1):
        return "host CR4 must not set any bit to a value not supported in VMX operation (IA32_VMX_CR4_FIXED0/1)"
    return None


# Host CR4.CET = 1 requires CR0.WP = 1: CR4.CET is not supported (the CR4 check rejects it).


@host("27.2.2")
def host_cr3_width(e: EntryContext) -> str | None:
    if e.beyond_phys_width(e.read(F.HOST_CR3)):
        return "host CR3 bits beyond the physical-address width must be 0"
    return None


@host("27.2.2")
def host_sysenter_canonical(e: EntryContext) -> str | None:
    for name, field in (("ESP", F.HOST_IA32_SYSENTER_ESP), ("EIP", F.HOST_IA32_SYSENTER_EIP)):
        if not e.canonical(e.read(field)):
            return f"host IA32_SYSENTER_{name} must contain a canonical address"
    return None


# "load IA32_PERF_GLOBAL_CTRL" (VM-exit): not supported.


@host("27.2.2")
def host_pat(e: EntryContext) -> str | None:
    if e.exit_controls & X.LOAD_IA32_PAT and not pat_valid(e.read(F.HOST_IA32_PAT)):
        return "host IA32_PAT: each byte must be 0, 1, 4, 5, 6 or 7 (\"load IA32_PAT\" = 1)"
    return None


@host("27.2.2")
def host_efer_reserved_bits(e: EntryContext) -> str | None:
    if e.exit_controls & X.LOAD_IA32_EFER and efer_reserved(e.read(F.HOST_IA32_EFER)):
        return "host IA32_EFER: reserved bits must be 0 (\"load IA32_EFER\" = 1)"
    return None


@host("27.2.2")
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


@host("27.2.3")
def host_selector_rpl_ti(e: EntryContext) -> str | None:
    for name, field in _HOST_SELECTORS:
        if e.read(VmcsField[field]) & (SEGMENT_RPL_MASK | SEGMENT_TI_MASK):
            return f"host {name} selector: RPL (bits 1:0) and TI (bit 2) must be 0"
    return None


@host("27.2.3")
def host_cs_selector_nonzero(e: EntryContext) -> str | None:
    if e.read(F.HOST_CS_SELECTOR) == 0:
        return "host CS selector must not be 0000H"
    return None


@host("27.2.3")
def host_tr_selector_nonzero(e: EntryContext) -> str | None:
    if e.read(F.HOST_TR_SELECTOR) == 0:
        return "host TR selector must not be 0000H"
    return None


@host("27.2.3")
def host_ss_selector_nonzero(e: EntryContext) -> str | None:
    if e.read(F.HOST_SS_SELECTOR) == 0 and not e.host_addr_space_size:
        return "host SS selector must not be 0000H when \"host address-space size\" is 0"
    return None


@host("27.2.3")
def host_bases_canonical(e: EntryContext) -> str | None:
    for name in ("FS", "GS", "GDTR", "IDTR", "TR"):
        if not e.canonical(e.read(VmcsField[f"HOST_{name}_BASE"])):
            return f"host {name} base address must be canonical"
    return None


# --- 27.2.4 Address-space size -------------------------------------------------------------------
@host("27.2.4")
def host_addr_space_size_matches_mode(e: EntryContext) -> str | None:
    if e.host_ia32e_mode and not e.host_addr_space_size:
        return "\"host address-space size\" must be 1 on a processor in IA-32e mode"
    if not e.host_ia32e_mode and (e.host_addr_space_size or e.ia32e_mode_guest):
        return (
            "\"host address-space size\" and \"IA-32e mode guest\" must be 0 on a processor "
            "outside IA-32e mode"
        )
    return None


@host("27.2.4")
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


@host("27.2.4")
def host_64bit_requirements(e: EntryContext) -> str | None:
    if not e.host_addr_space_size:
        return None
    if not e.read(F.HOST_CR4) & Cr4.PAE:
        return "host CR4.PAE must be 1 when \"host address-space size\" is 1"
    if not e.canonical(e.read(F.HOST_RIP)):
        return "host RIP must be canonical when \"host address-space size\" is 1"
    return None
