"""VMX control bits and the other VMX-defined formats (SDM Vol. 3 ch. 25, 29, Appendix A), with
Linux's names (arch/x86/include/asm/vmx.h, vmxfeatures.h, msr-index.h): the Linux prefix becomes
the class name, e.g. ``CPU_BASED_HLT_EXITING`` -> ``ProcBasedControls.HLT_EXITING``.

Members Linux does not name are marked "not in Linux" and named after the SDM in Linux's style.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class PinBasedControls(IntFlag):
    """Pin-based VM-execution controls (SDM 25.6.1; Linux PIN_BASED_*)."""

    EXT_INTR_MASK = 1 << 0  # external-interrupt exiting
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5
    VMX_PREEMPTION_TIMER = 1 << 6  # activate VMX-preemption timer
    POSTED_INTR = 1 << 7  # process posted interrupts


class ProcBasedControls(IntFlag):
    """Primary processor-based VM-execution controls (SDM 25.6.2; Linux CPU_BASED_*)."""

    INTR_WINDOW_EXITING = 1 << 2  # older Linux: CPU_BASED_VIRTUAL_INTR_PENDING
    USE_TSC_OFFSETTING = 1 << 3
    HLT_EXITING = 1 << 7
    INVLPG_EXITING = 1 << 9
    MWAIT_EXITING = 1 << 10
    RDPMC_EXITING = 1 << 11
    RDTSC_EXITING = 1 << 12
    CR3_LOAD_EXITING = 1 << 15
    CR3_STORE_EXITING = 1 << 16
    ACTIVATE_TERTIARY_CONTROLS = 1 << 17
    CR8_LOAD_EXITING = 1 << 19
    CR8_STORE_EXITING = 1 << 20
    TPR_SHADOW = 1 << 21
    NMI_WINDOW_EXITING = 1 << 22  # older Linux: CPU_BASED_VIRTUAL_NMI_PENDING
    MOV_DR_EXITING = 1 << 23
    UNCOND_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    USE_MSR_BITMAPS = 1 << 28
    MONITOR_EXITING = 1 << 29
    PAUSE_EXITING = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class SecondaryProcBasedControls(IntFlag):
    """Secondary processor-based VM-execution controls (SDM 25.6.2; Linux
    SECONDARY_EXEC_*, bit numbers as in vmxfeatures.h word 2)."""

    VIRTUALIZE_APIC_ACCESSES = 1 << 0
    ENABLE_EPT = 1 << 1
    DESC = 1 << 2  # descriptor-table exiting
    ENABLE_RDTSCP = 1 << 3
    VIRTUALIZE_X2APIC_MODE = 1 << 4
    ENABLE_VPID = 1 << 5
    WBINVD_EXITING = 1 << 6
    UNRESTRICTED_GUEST = 1 << 7
    APIC_REGISTER_VIRT = 1 << 8
    VIRTUAL_INTR_DELIVERY = 1 << 9
    PAUSE_LOOP_EXITING = 1 << 10
    RDRAND_EXITING = 1 << 11
    ENABLE_INVPCID = 1 << 12
    ENABLE_VMFUNC = 1 << 13
    SHADOW_VMCS = 1 << 14
    ENCLS_EXITING = 1 << 15
    RDSEED_EXITING = 1 << 16
    ENABLE_PML = 1 << 17
    EPT_VIOLATION_VE = 1 << 18
    PT_CONCEAL_VMX = 1 << 19
    ENABLE_XSAVES = 1 << 20
    PASID_TRANSLATION = 1 << 21  # not in Linux
    MODE_BASED_EPT_EXEC = 1 << 22
    ENABLE_SPP = 1 << 23  # not in mainline Linux: sub-page write permissions for EPT
    PT_USE_GPA = 1 << 24
    TSC_SCALING = 1 << 25
    ENABLE_USR_WAIT_PAUSE = 1 << 26
    ENABLE_PCONFIG = 1 << 27  # not in Linux
    ENABLE_ENCLV = 1 << 28  # Linux has only VMX_FEATURE_ENCLV_EXITING
    BUS_LOCK_DETECTION = 1 << 30  # VMM bus-lock detection
    NOTIFY_VM_EXITING = 1 << 31  # SDM "instruction timeout"


class TertiaryProcBasedControls(IntFlag):
    """Tertiary processor-based VM-execution controls, a 64-bit field (SDM 25.6.2;
    Linux TERTIARY_EXEC_*)."""

    LOADIWKEY_EXITING = 1 << 0  # not in Linux
    ENABLE_HLAT = 1 << 1  # not in Linux
    EPT_PAGING_WRITE = 1 << 2  # not in Linux: EPT paging-write control
    GUEST_PAGING_VERIFY = 1 << 3  # not in Linux: guest-paging verification
    IPI_VIRT = 1 << 4
    VIRTUALIZE_IA32_SPEC_CTRL = 1 << 7  # not in Linux


class VmExitControls(IntFlag):
    """Primary VM-exit controls (SDM 25.7.1; Linux VM_EXIT_*)."""

    SAVE_DEBUG_CONTROLS = 1 << 2
    HOST_ADDR_SPACE_SIZE = 1 << 9
    LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 12
    ACK_INTR_ON_EXIT = 1 << 15
    SAVE_IA32_PAT = 1 << 18
    LOAD_IA32_PAT = 1 << 19
    SAVE_IA32_EFER = 1 << 20
    LOAD_IA32_EFER = 1 << 21
    SAVE_VMX_PREEMPTION_TIMER = 1 << 22
    CLEAR_BNDCFGS = 1 << 23
    PT_CONCEAL_PIP = 1 << 24  # conceal VMX from PT
    CLEAR_IA32_RTIT_CTL = 1 << 25
    CLEAR_IA32_LBR_CTL = 1 << 26  # Linux arch-LBR series only
    CLEAR_UINV = 1 << 27  # not in Linux
    LOAD_CET_STATE = 1 << 28
    LOAD_IA32_PKRS = 1 << 29  # Linux PKS series only
    SAVE_IA32_PERF_GLOBAL_CTRL = 1 << 30  # Linux mediated-PMU series only
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class SecondaryVmExitControls(IntFlag):
    """Secondary VM-exit controls, a 64-bit field (SDM 25.7.1 in revisions with FRED;
    Linux SECONDARY_VM_EXIT_*)."""

    SAVE_IA32_FRED = 1 << 0
    LOAD_IA32_FRED = 1 << 1


class VmEntryControls(IntFlag):
    """VM-entry controls (SDM 25.8.1; Linux VM_ENTRY_*)."""

    LOAD_DEBUG_CONTROLS = 1 << 2
    IA32E_MODE = 1 << 9  # IA-32e mode guest
    SMM = 1 << 10  # entry to SMM
    DEACT_DUAL_MONITOR = 1 << 11
    LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 13
    LOAD_IA32_PAT = 1 << 14
    LOAD_IA32_EFER = 1 << 15
    LOAD_BNDCFGS = 1 << 16
    PT_CONCEAL_PIP = 1 << 17  # conceal VMX from PT
    LOAD_IA32_RTIT_CTL = 1 << 18
    LOAD_UINV = 1 << 19  # not in Linux
    LOAD_CET_STATE = 1 << 20
    LOAD_IA32_LBR_CTL = 1 << 21  # Linux arch-LBR series only
    LOAD_IA32_PKRS = 1 << 22  # Linux PKS series only
    LOAD_IA32_FRED = 1 << 23  # Linux FRED series


# Default1 controls when IA32_VMX_BASIC[55] is 0, i.e. without the TRUE capability MSRs
# (SDM A.3.1, A.3.2, A.4, A.5; Linux asm/vmx.h *_ALWAYSON_WITHOUT_TRUE_MSR).
PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR = 0x00000016  # bits 1, 2, 4
CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR = 0x0401E172  # bits 1, 4-6, 8, 13-16, 26
VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR = 0x00036DFF  # bits 0-8, 10, 11, 13, 14, 16, 17
VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR = 0x000011FF  # bits 0-8, 12

# --- VM functions (SDM 25.6.14; Linux VMX_VMFUNC_*) ---------------------------------------------
VMX_VMFUNC_EPTP_SWITCHING = 1 << 0
VMFUNC_EPTP_ENTRIES = 512

# --- Interruption-information format (SDM 25.8.3, 25.9.2; Linux INTR_INFO_*)
INTR_INFO_VECTOR_MASK = 0xFF  # 7:0
INTR_INFO_INTR_TYPE_MASK = 0x700  # 10:8
INTR_INFO_INTR_TYPE_SHIFT = 8
INTR_INFO_DELIVER_CODE_MASK = 0x800  # 11
INTR_INFO_UNBLOCK_NMI = 0x1000  # 12 (VM-exit interruption information only)
INTR_INFO_VALID_MASK = 0x80000000  # 31
INTR_INFO_RESVD_BITS_MASK = 0x7FFFF000
# The IDT-vectoring information field has the same layout (Linux VECTORING_INFO_*).
VECTORING_INFO_VECTOR_MASK = INTR_INFO_VECTOR_MASK
VECTORING_INFO_TYPE_MASK = INTR_INFO_INTR_TYPE_MASK
VECTORING_INFO_DELIVER_CODE_MASK = INTR_INFO_DELIVER_CODE_MASK
VECTORING_INFO_VALID_MASK = INTR_INFO_VALID_MASK


class InterruptionType(IntEnum):
    """Bits 10:8 of the interruption-information fields.

    Linux's INTR_TYPE_* are these values shifted left by 8: INTR_TYPE_EXT_INTR 0x000,
    INTR_TYPE_RESERVED 0x100, INTR_TYPE_NMI_INTR 0x200, INTR_TYPE_HARD_EXCEPTION 0x300,
    INTR_TYPE_SOFT_INTR 0x400, INTR_TYPE_PRIV_SW_EXCEPTION 0x500, INTR_TYPE_SOFT_EXCEPTION 0x600,
    INTR_TYPE_OTHER_EVENT 0x700.
    """

    EXT_INTR = 0
    RESERVED = 1
    NMI_INTR = 2
    HARD_EXCEPTION = 3
    SOFT_INTR = 4
    PRIV_SW_EXCEPTION = 5  # INT1 (ICEBP)
    SOFT_EXCEPTION = 6  # INT3, INTO
    OTHER_EVENT = 7  # MTF pending (injection); SYSCALL/SYSENTER etc. with FRED


class GuestInterruptibility(IntFlag):
    """Guest interruptibility state (SDM 25.4.2; Linux GUEST_INTR_STATE_*)."""

    STI = 1 << 0
    MOV_SS = 1 << 1
    SMI = 1 << 2
    NMI = 1 << 3
    ENCLAVE_INTR = 1 << 4


class GuestActivityState(IntEnum):
    """Guest activity state (SDM 25.4.2; Linux GUEST_ACTIVITY_*)."""

    ACTIVE = 0
    HLT = 1
    SHUTDOWN = 2
    WAIT_SIPI = 3


# Pending debug exceptions field (SDM 25.4.2).  Not in Linux.
PENDING_DBG_B0_B3 = 0xF  # 3:0 breakpoint conditions met
PENDING_DBG_ENABLED_BP = 1 << 12  # at least one enabled breakpoint condition met
PENDING_DBG_BS = 1 << 14  # single step
PENDING_DBG_RTM = 1 << 16  # debug exception or breakpoint inside an RTM region

# --- IA32_VMX_BASIC (SDM A.1; Linux asm/vmx.h and msr-index.h VMX_BASIC_*) -----------------------
VMX_BASIC_REVISION_MASK = 0x7FFFFFFF  # 30:0 VMCS revision identifier (bit 31 is 0)
VMX_BASIC_VMCS_SIZE_SHIFT = 32
VMX_BASIC_VMCS_SIZE_MASK = 0x1FFF << 32  # 44:32 bytes for the VMXON and VMCS regions
VMX_BASIC_32BIT_PHYS_ADDR_ONLY = 1 << 48
VMX_BASIC_64 = VMX_BASIC_32BIT_PHYS_ADDR_ONLY  # older Linux msr-index.h name
VMX_BASIC_DUAL_MONITOR_TREATMENT = 1 << 49
VMX_BASIC_DUAL_MONITOR = VMX_BASIC_DUAL_MONITOR_TREATMENT  # short alias
VMX_BASIC_MEM_TYPE_SHIFT = 50
VMX_BASIC_MEM_TYPE_MASK = 0xF << 50  # 53:50
VMX_BASIC_MEM_TYPE_WB = 6
VMX_BASIC_INOUT = 1 << 54  # INS/OUTS instruction information reported
VMX_BASIC_TRUE_CTLS = 1 << 55
VMX_BASIC_NO_HW_ERROR_CODE_CC = 1 << 56  # no error-code consistency check on injection

# --- IA32_VMX_MISC (SDM A.6; Linux VMX_MISC_*) -----------------------------------------------------
VMX_MISC_PREEMPTION_TIMER_RATE_MASK = 0x1F  # 4:0 timer ticks every 2^N TSC ticks
VMX_MISC_SAVE_EFER_LMA = 1 << 5
VMX_MISC_ACTIVITY_HLT = 1 << 6
VMX_MISC_ACTIVITY_SHUTDOWN = 1 << 7
VMX_MISC_ACTIVITY_WAIT_SIPI = 1 << 8
VMX_MISC_INTEL_PT = 1 << 14
VMX_MISC_RDMSR_IN_SMM = 1 << 15
VMX_MISC_CR3_TARGET_COUNT_SHIFT = 16
VMX_MISC_CR3_TARGET_COUNT_MASK = 0x1FF << 16  # 24:16
VMX_MISC_MSR_LIST_MULTIPLIER_SHIFT = 25
VMX_MISC_MSR_LIST_MULTIPLIER_MASK = 0x7 << 25  # 27:25: max list size is 512 * (N + 1)
VMX_MISC_MSR_LIST_MULTIPLIER = 512
VMX_MISC_VMXOFF_BLOCK_SMI = 1 << 28
VMX_MISC_VMWRITE_SHADOW_RO_FIELDS = 1 << 29  # VMWRITE may write VM-exit information fields
VMX_MISC_ZERO_LEN_INS = 1 << 30  # injection with instruction length 0 allowed
VMX_MISC_MSEG_REVID_SHIFT = 32  # 63:32 MSEG revision identifier

# --- IA32_VMX_EPT_VPID_CAP (SDM A.10; Linux VMX_EPT_* / VMX_VPID_*) -------------------------------
# EPT bits are positions in the whole MSR.
VMX_EPT_EXECUTE_ONLY_BIT = 1 << 0
VMX_EPT_PAGE_WALK_4_BIT = 1 << 6
VMX_EPT_PAGE_WALK_5_BIT = 1 << 7
VMX_EPTP_UC_BIT = 1 << 8
VMX_EPTP_WB_BIT = 1 << 14
VMX_EPT_2MB_PAGE_BIT = 1 << 16
VMX_EPT_1GB_PAGE_BIT = 1 << 17
VMX_EPT_INVEPT_BIT = 1 << 20
VMX_EPT_AD_BIT = 1 << 21
VMX_EPT_ADVANCED_EXIT_INFO_BIT = 1 << 22  # not in Linux
VMX_EPT_SUPERVISOR_SHADOW_STACK_BIT = 1 << 23  # not in Linux
VMX_EPT_EXTENT_SHIFT = 24
VMX_EPT_EXTENT_CONTEXT_BIT = 1 << 25  # single-context INVEPT
VMX_EPT_EXTENT_GLOBAL_BIT = 1 << 26  # all-context INVEPT
# VPID bits: Linux defines these relative to bit 32 (it keeps the MSR's high half in a u32), and
# so do we, to keep Linux's values: test ``(cap >> VMX_VPID_CAP_SHIFT) & VMX_VPID_INVVPID_BIT``.
VMX_VPID_CAP_SHIFT = 32
VMX_VPID_INVVPID_BIT = 1 << 0  # MSR bit 32
VMX_VPID_EXTENT_INDIVIDUAL_ADDR_BIT = 1 << 8  # MSR bit 40
VMX_VPID_EXTENT_SINGLE_CONTEXT_BIT = 1 << 9  # MSR bit 41
VMX_VPID_EXTENT_GLOBAL_CONTEXT_BIT = 1 << 10  # MSR bit 42
VMX_VPID_EXTENT_SINGLE_NON_GLOBAL_BIT = 1 << 11  # MSR bit 43

# --- EPT paging-structure entries (SDM 29.3.2; Linux VMX_EPT_*) ---------------
VMX_EPT_READABLE_MASK = 1 << 0
VMX_EPT_WRITABLE_MASK = 1 << 1
VMX_EPT_EXECUTABLE_MASK = 1 << 2  # supervisor-mode execute when mode-based execute control is on
VMX_EPT_RWX_MASK = 0x7
VMX_EPT_MT_EPTE_SHIFT = 3  # 5:3 memory type of a leaf entry
VMX_EPT_MT_SHIFT = VMX_EPT_MT_EPTE_SHIFT
VMX_EPT_MT_MASK = 0x7 << 3
VMX_EPT_IPAT_BIT = 1 << 6  # ignore PAT memory type
VMX_EPT_LARGE_PAGE_BIT = 1 << 7  # not in Linux (Linux uses PT_PAGE_SIZE_MASK): maps a 1-GB/2-MB page
VMX_EPT_ACCESS_BIT = 1 << 8
VMX_EPT_DIRTY_BIT = 1 << 9  # leaf entries only
VMX_EPT_USER_EXECUTABLE_MASK = 1 << 10  # user-mode execute (mode-based execute control)
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63
# VMX_EPT_MISCONFIG_WX_VALUE: write without read is an EPT misconfiguration (Linux uses it for MMIO).
VMX_EPT_MISCONFIG_WX_VALUE = VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK

# --- EPT pointer (SDM 25.6.11; Linux VMX_EPTP_*) --------------------------------------
VMX_EPTP_MT_MASK = 0x7  # 2:0 paging-structure memory type
VMX_EPTP_MT_UC = 0
VMX_EPTP_MT_WB = 6
VMX_EPTP_PWL_MASK = 0x38  # 5:3 page-walk length minus 1
VMX_EPTP_PWL_4 = 3 << 3
VMX_EPTP_PWL_5 = 4 << 3
VMX_EPTP_AD_ENABLE_BIT = 1 << 6  # accessed and dirty flags for EPT
VMX_EPTP_SSS_ENABLE_BIT = 1 << 7  # not in Linux: supervisor shadow-stack control

# Memory types (SDM 12.3, Table 12-2; Linux X86_MEMTYPE_* in msr-index.h).
EPT_MEMTYPE_UC = 0
EPT_MEMTYPE_WC = 1
EPT_MEMTYPE_WT = 4
EPT_MEMTYPE_WP = 5
EPT_MEMTYPE_WB = 6

# INVEPT / INVVPID types (SDM 31.3, INVEPT and INVVPID; Linux VMX_EPT_EXTENT_* / VMX_VPID_EXTENT_*)
VMX_EPT_EXTENT_CONTEXT = 1
VMX_EPT_EXTENT_GLOBAL = 2
VMX_VPID_EXTENT_INDIVIDUAL_ADDR = 0
VMX_VPID_EXTENT_SINGLE_CONTEXT = 1
VMX_VPID_EXTENT_ALL_CONTEXT = 2
VMX_VPID_EXTENT_SINGLE_NON_GLOBAL = 3
VMX_NR_VPIDS = 1 << 16

# --- IA32_FEATURE_CONTROL (SDM 24.7; Linux FEAT_CTL_*, formerly FEATURE_CONTROL_*) ---------------
FEAT_CTL_LOCKED = 1 << 0
FEAT_CTL_VMX_ENABLED_INSIDE_SMX = 1 << 1
FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX = 1 << 2
FEAT_CTL_SGX_LC_ENABLED = 1 << 17
FEAT_CTL_SGX_ENABLED = 1 << 18
FEAT_CTL_LMCE_ENABLED = 1 << 20
FEATURE_CONTROL_LOCKED = FEAT_CTL_LOCKED
FEATURE_CONTROL_VMXON_ENABLED_INSIDE_SMX = FEAT_CTL_VMX_ENABLED_INSIDE_SMX
FEATURE_CONTROL_VMXON_ENABLED_OUTSIDE_SMX = FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX
