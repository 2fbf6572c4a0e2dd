"""Model-specific register indices (Linux asm/msr-index.h names without the ``MSR_`` prefix)
and the KVM paravirtual async-PF constants (Linux uapi asm/kvm_para.h)."""

from __future__ import annotations

from enum import IntEnum


class UnknownNameError(KeyError):
    """A name (MSR, control, intercept...) that the architecture tables do not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown name"


class Msr(IntEnum):
    IA32_TSC = 0x10
    IA32_PLATFORM_ID = 0x17
    IA32_APICBASE = 0x1B
    IA32_FEAT_CTL = 0x3A
    IA32_FEATURE_CONTROL = 0x3A  # alias
    IA32_TSC_ADJUST = 0x3B
    IA32_SPEC_CTRL = 0x48
    IA32_PRED_CMD = 0x49
    IA32_UCODE_REV = 0x8B
    MTRRcap = 0xFE
    IA32_ARCH_CAPABILITIES = 0x10A
    IA32_FLUSH_CMD = 0x10B
    IA32_SYSENTER_CS = 0x174
    IA32_SYSENTER_ESP = 0x175
    IA32_SYSENTER_EIP = 0x176
    IA32_MCG_CAP = 0x179
    IA32_MCG_STATUS = 0x17A
    IA32_MISC_ENABLE = 0x1A0
    IA32_DEBUGCTLMSR = 0x1D9
    IA32_CR_PAT = 0x277
    IA32_PAT = 0x277  # alias
    MTRRdefType = 0x2FF
    CORE_PERF_GLOBAL_CTRL = 0x38F
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
    IA32_TSC_DEADLINE = 0x6E0
    IA32_BNDCFGS = 0xD90
    IA32_XSS = 0xDA0
    EFER = 0xC0000080
    IA32_EFER = 0xC0000080  # alias
    STAR = 0xC0000081
    LSTAR = 0xC0000082
    CSTAR = 0xC0000083
    SYSCALL_MASK = 0xC0000084
    FS_BASE = 0xC0000100
    GS_BASE = 0xC0000101
    KERNEL_GS_BASE = 0xC0000102
    TSC_AUX = 0xC0000103
    KVM_WALL_CLOCK_NEW = 0x4B564D00
    KVM_SYSTEM_TIME_NEW = 0x4B564D01
    KVM_ASYNC_PF_EN = 0x4B564D02
    KVM_STEAL_TIME = 0x4B564D03
    KVM_PV_EOI_EN = 0x4B564D04
    KVM_POLL_CONTROL = 0x4B564D05
    KVM_ASYNC_PF_INT = 0x4B564D06
    KVM_ASYNC_PF_ACK = 0x4B564D07


# MSR_KVM_ASYNC_PF_EN bits and the reasons in the shared area (Linux uapi kvm_para.h).
KVM_ASYNC_PF_ENABLED = 1 << 0
KVM_ASYNC_PF_SEND_ALWAYS = 1 << 1
KVM_ASYNC_PF_DELIVERY_AS_PF_VMEXIT = 1 << 2
KVM_ASYNC_PF_DELIVERY_AS_INT = 1 << 3
KVM_PV_REASON_PAGE_NOT_PRESENT = 1
KVM_PV_REASON_PAGE_READY = 2


def msr_by_name(name: str) -> Msr:
    """An MSR by name: "IA32_EFER", "EFER", "MSR_EFER", "msr_ia32_efer" all work."""
    key = name.strip().upper()
    if key.startswith("MSR_"):
        key = key[4:]
    for candidate in (key, f"IA32_{key}", key.removeprefix("IA32_")):
        if candidate in Msr.__members__:
            return Msr.__members__[candidate]
    raise UnknownNameError(f"unknown MSR {name!r} (e.g. IA32_EFER, LSTAR, IA32_SYSENTER_CS)")
