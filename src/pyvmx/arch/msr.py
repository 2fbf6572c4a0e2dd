"""Model-specific register indices with Linux's names (arch/x86/include/asm/msr-index.h, and
uapi/asm/kvm_para.h for the KVM paravirtual MSRs) minus the ``MSR_`` prefix, plus the async-PF
constants of Linux's uapi kvm_para.h.

Where the SDM's name differs from Linux's (IA32_EFER vs MSR_EFER, IA32_PAT vs MSR_IA32_CR_PAT...)
the SDM name is an alias of the same value; the Linux name comes first, so it is the canonical
``.name``.
"""

from __future__ import annotations

from enum import IntEnum


class UnknownNameError(KeyError):
    """A name (MSR, control, intercept...) that the architecture tables do not know."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message, adding quotes.
        return str(self.args[0]) if self.args else "unknown name"


class Msr(IntEnum):
    """MSR indices (SDM Vol. 4 "Model-Specific Registers"; Linux MSR_*)."""

    IA32_TSC = 0x10
    KVM_WALL_CLOCK = 0x11  # legacy KVM paravirtual MSR (uapi kvm_para.h)
    KVM_SYSTEM_TIME = 0x12  # legacy KVM paravirtual MSR (uapi kvm_para.h)
    IA32_PLATFORM_ID = 0x17
    IA32_APICBASE = 0x1B
    IA32_APIC_BASE = 0x1B  # alias: SDM name
    IA32_FEAT_CTL = 0x3A
    IA32_FEATURE_CONTROL = 0x3A  # alias: SDM and older Linux name
    IA32_TSC_ADJUST = 0x3B
    IA32_SPEC_CTRL = 0x48
    IA32_PRED_CMD = 0x49
    IA32_UCODE_REV = 0x8B
    MTRRcap = 0xFE
    IA32_MTRRCAP = 0xFE  # alias: SDM name
    IA32_ARCH_CAPABILITIES = 0x10A
    IA32_FLUSH_CMD = 0x10B
    IA32_SYSENTER_CS = 0x174
    IA32_SYSENTER_ESP = 0x175
    IA32_SYSENTER_EIP = 0x176
    IA32_MCG_CAP = 0x179
    IA32_MCG_STATUS = 0x17A
    IA32_MISC_ENABLE = 0x1A0
    IA32_FRED_RSP0 = 0x1CC
    IA32_FRED_RSP1 = 0x1CD
    IA32_FRED_RSP2 = 0x1CE
    IA32_FRED_RSP3 = 0x1CF
    IA32_FRED_STKLVLS = 0x1D0
    IA32_FRED_SSP1 = 0x1D1
    IA32_FRED_SSP2 = 0x1D2
    IA32_FRED_SSP3 = 0x1D3
    IA32_FRED_CONFIG = 0x1D4
    IA32_DEBUGCTLMSR = 0x1D9
    IA32_DEBUGCTL = 0x1D9  # alias: SDM name
    IA32_CR_PAT = 0x277
    IA32_PAT = 0x277  # alias: SDM name
    MTRRdefType = 0x2FF
    IA32_MTRR_DEF_TYPE = 0x2FF  # alias: SDM name
    CORE_PERF_GLOBAL_CTRL = 0x38F
    IA32_PERF_GLOBAL_CTRL = 0x38F  # alias: SDM name
    IA32_VMX_BASIC = 0x480
    IA32_VMX_PINBASED_CTLS = 0x481
    IA32_VMX_PROCBASED_CTLS = 0x482
    IA32_VMX_EXIT_CTLS = 0x483
    IA32_VMX_ENTRY_CTLS = 0x484
    IA32_VMX_MISC = 0x485
    IA32_VMX_CR0_FIXED0 = 0x486
    IA32_VMX_CR0_FIXED1 = 0x487
    IA32_VMX_CR4_FIXED0 = 0x488
    IA32_VMX_CR4_FIXED1 = 0x489
    IA32_VMX_VMCS_ENUM = 0x48A
    IA32_VMX_PROCBASED_CTLS2 = 0x48B
    IA32_VMX_EPT_VPID_CAP = 0x48C
    IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
    IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
    IA32_VMX_TRUE_EXIT_CTLS = 0x48F
    IA32_VMX_TRUE_ENTRY_CTLS = 0x490
    IA32_VMX_VMFUNC = 0x491
    IA32_VMX_PROCBASED_CTLS3 = 0x492
    IA32_VMX_EXIT_CTLS2 = 0x493
    IA32_RTIT_CTL = 0x570
    IA32_U_CET = 0x6A0
    IA32_S_CET = 0x6A2
    IA32_PL0_SSP = 0x6A4
    IA32_INT_SSP_TAB = 0x6A8
    IA32_TSC_DEADLINE = 0x6E0
    IA32_PKRS = 0x6E1
    IA32_BNDCFGS = 0xD90
    IA32_XSS = 0xDA0
    ARCH_LBR_CTL = 0x14CE
    IA32_LBR_CTL = 0x14CE  # alias: SDM name
    EFER = 0xC0000080
    IA32_EFER = 0xC0000080  # alias: SDM name
    STAR = 0xC0000081
    LSTAR = 0xC0000082
    CSTAR = 0xC0000083
    SYSCALL_MASK = 0xC0000084
    IA32_FMASK = 0xC0000084  # alias: SDM name
    FS_BASE = 0xC0000100
    GS_BASE = 0xC0000101
    KERNEL_GS_BASE = 0xC0000102
    TSC_AUX = 0xC0000103
    IA32_TSC_AUX = 0xC0000103  # alias: SDM name
    KVM_WALL_CLOCK_NEW = 0x4B564D00
    KVM_SYSTEM_TIME_NEW = 0x4B564D01
    KVM_ASYNC_PF_EN = 0x4B564D02
    KVM_STEAL_TIME = 0x4B564D03
    KVM_PV_EOI_EN = 0x4B564D04
    KVM_POLL_CONTROL = 0x4B564D05
    KVM_ASYNC_PF_INT = 0x4B564D06
    KVM_ASYNC_PF_ACK = 0x4B564D07
    KVM_MIGRATION_CONTROL = 0x4B564D08


# MSR_KVM_ASYNC_PF_EN bits (Linux uapi asm/kvm_para.h).  Bits 63:6 hold the 64-byte aligned
# guest-physical address of the shared area.
KVM_ASYNC_PF_ENABLED = 1 << 0
KVM_ASYNC_PF_SEND_ALWAYS = 1 << 1
KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT = 1 << 2
KVM_ASYNC_PF_DELIVERY_AS_INT = 1 << 3
# MSR_KVM_ASYNC_PF_INT: the notification vector is in bits 7:0.
KVM_ASYNC_PF_VEC_MASK = 0xFF
# Reasons in the shared area's ``flags`` (struct kvm_vcpu_pv_apf_data).
KVM_PV_REASON_PAGE_NOT_PRESENT = 1
KVM_PV_REASON_PAGE_READY = 2


def _lookup_key(name: str) -> str:
    return name.strip().upper()


# Upper-cased names, aliases included, so that lookups ignore case ("mtrrcap" -> MTRRcap).
_BY_UPPER_NAME: dict[str, Msr] = {_lookup_key(n): m for n, m in Msr.__members__.items()}


def msr_by_name(name: str) -> Msr:
    """An MSR by name, case-insensitively, with or without Linux's ``MSR_`` prefix and with or
    without the SDM's ``IA32_`` prefix: "IA32_EFER", "EFER", "MSR_EFER", "msr_ia32_efer",
    "IA32_LSTAR" all work.  Raises :class:`UnknownNameError` (a ``KeyError``) otherwise."""
    key = _lookup_key(name)
    key = key.removeprefix("MSR_")
    for candidate in (key, f"IA32_{key}", key.removeprefix("IA32_")):
        if candidate in _BY_UPPER_NAME:
            return _BY_UPPER_NAME[candidate]
    raise UnknownNameError(f"unknown MSR {name!r} (e.g. IA32_EFER, LSTAR, IA32_SYSENTER_CS)")
