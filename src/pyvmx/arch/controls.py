"""VMX control bits and VMX-defined formats (SDM 25.6-25.9, Appendix A), with Linux's names
(asm/vmx.h, asm/vmxfeatures.h): the Linux prefix becomes the class name, e.g.
``CPU_BASED_HLT_EXITING`` -> ``ProcBasedControls.HLT_EXITING``."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class PinBasedControls(IntFlag):
    """Pin-based VM-execution controls (SDM 25.6.1, Table 25-5)."""

    EXT_INTR_MASK = 1 << 0  # external-interrupt exiting
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5
    VMX_PREEMPTION_TIMER = 1 << 6
    POSTED_INTR = 1 << 7


class ProcBasedControls(IntFlag):
    """Primary processor-based VM-execution controls (SDM 25.6.2, Table 25-6)."""

    INTR_WINDOW_EXITING = 1 << 2
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
    NMI_WINDOW_EXITING = 1 << 22
    MOV_DR_EXITING = 1 << 23
    UNCOND_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    USE_MSR_BITMAPS = 1 << 28
    MONITOR_EXITING = 1 << 29
    PAUSE_EXITING = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class SecondaryProcBasedControls(IntFlag):
    """Secondary processor-based VM-execution controls (SDM 25.6.2, Table 25-7)."""

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
    MODE_BASED_EPT_EXEC = 1 << 22
    PT_USE_GPA = 1 << 24
    TSC_SCALING = 1 << 25
    ENABLE_USR_WAIT_PAUSE = 1 << 26
    ENABLE_ENCLV = 1 << 28
    BUS_LOCK_DETECTION = 1 << 30
    NOTIFY_VM_EXITING = 1 << 31


class TertiaryProcBasedControls(IntFlag):
    """Tertiary processor-based VM-execution controls (SDM 25.6.2, Table 25-8)."""

    LOADIWKEY_EXITING = 1 << 0
    ENABLE_HLAT = 1 << 1
    EPT_PAGING_WRITE = 1 << 2
    GUEST_PAGING_VERIFY = 1 << 3
    IPI_VIRT = 1 << 4
    VIRTUALIZE_IA32_SPEC_CTRL = 1 << 7


class VmExitControls(IntFlag):
    """Primary VM-exit controls (SDM 25.7.1, Table 25-13)."""

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
    PT_CONCEAL_PIP = 1 << 24
    CLEAR_IA32_RTIT_CTL = 1 << 25
    CLEAR_IA32_LBR_CTL = 1 << 26
    LOAD_CET_STATE = 1 << 28
    LOAD_IA32_PKRS = 1 << 29
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class VmEntryControls(IntFlag):
    """VM-entry controls (SDM 25.8.1, Table 25-15)."""

    LOAD_DEBUG_CONTROLS = 1 << 2
    IA32E_MODE = 1 << 9
    SMM = 1 << 10
    DEACT_DUAL_MONITOR = 1 << 11
    LOAD_IA32_PERF_GLOBAL_CTRL = 1 << 13
    LOAD_IA32_PAT = 1 << 14
    LOAD_IA32_EFER = 1 << 15
    LOAD_BNDCFGS = 1 << 16
    PT_CONCEAL_PIP = 1 << 17
    LOAD_IA32_RTIT_CTL = 1 << 18
    LOAD_CET_STATE = 1 << 20
    LOAD_IA32_LBR_CTL = 1 << 21
    LOAD_IA32_PKRS = 1 << 22


# Default1 controls when the TRUE capability MSRs are absent (SDM A.2; Linux vmx.h).
PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR = 0x00000016
CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR = 0x0401E172
VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR = 0x00036DFF
VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR = 0x000011FF

# --- Interruption-information format (SDM 25.8.3, 25.9.2; Linux INTR_INFO_*) -------------------
INTR_INFO_VECTOR_MASK = 0xFF
INTR_INFO_INTR_TYPE_MASK = 0x700
INTR_INFO_DELIVER_CODE_MASK = 0x800
INTR_INFO_UNBLOCK_NMI = 0x1000
INTR_INFO_VALID_MASK = 0x80000000
INTR_INFO_RESVD_BITS_MASK = 0x7FFFF000


class InterruptionType(IntEnum):
    """Bits 10:8 of the interruption-information fields (Linux INTR_TYPE_* are these << 8)."""

    EXT_INTR = 0
    RESERVED = 1
    NMI_INTR = 2
    HARD_EXCEPTION = 3
    SOFT_INTR = 4
    PRIV_SW_EXCEPTION = 5
    SOFT_EXCEPTION = 6
    OTHER_EVENT = 7


class GuestInterruptibility(IntFlag):
    """Guest interruptibility state (SDM 25.4.2, Table 25-3; Linux GUEST_INTR_STATE_*)."""

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


# --- IA32_VMX_BASIC (SDM A.1) ---------------------------------------------------------------
VMX_BASIC_REVISION_MASK = 0x7FFFFFFF
VMX_BASIC_VMCS_SIZE_SHIFT = 32
VMX_BASIC_32BIT_PHYS_ADDR_ONLY = 1 << 48
VMX_BASIC_DUAL_MONITOR = 1 << 49
VMX_BASIC_MEM_TYPE_SHIFT = 50
VMX_BASIC_MEM_TYPE_WB = 6
VMX_BASIC_INOUT = 1 << 54
VMX_BASIC_TRUE_CTLS = 1 << 55
VMX_BASIC_NO_HW_ERROR_CODE_CC = 1 << 56

# --- IA32_VMX_MISC (SDM A.6) ------------------------------------------------------------------
VMX_MISC_PREEMPTION_TIMER_RATE_MASK = 0x1F
VMX_MISC_SAVE_EFER_LMA = 1 << 5
VMX_MISC_ACTIVITY_HLT = 1 << 6
VMX_MISC_ACTIVITY_SHUTDOWN = 1 << 7
VMX_MISC_ACTIVITY_WAIT_SIPI = 1 << 8
VMX_MISC_INTEL_PT = 1 << 14
VMX_MISC_RDMSR_IN_SMM = 1 << 15
VMX_MISC_CR3_TARGET_COUNT_SHIFT = 16
VMX_MISC_CR3_TARGET_COUNT_MASK = 0x1FF << 16
VMX_MISC_MSR_LIST_MULTIPLIER_SHIFT = 25
VMX_MISC_VMWRITE_SHADOW_RO_FIELDS = 1 << 29
VMX_MISC_ZERO_LEN_INS = 1 << 30

# --- IA32_VMX_EPT_VPID_CAP (SDM A.10; Linux VMX_EPT_* / VMX_VPID_*) -------------------------
VMX_EPT_EXECUTE_ONLY_BIT = 1 << 0
VMX_EPT_PAGE_WALK_4_BIT = 1 << 6
VMX_EPT_PAGE_WALK_5_BIT = 1 << 7
VMX_EPTP_UC_BIT = 1 << 8
VMX_EPTP_WB_BIT = 1 << 14
VMX_EPT_2MB_PAGE_BIT = 1 << 16
VMX_EPT_1GB_PAGE_BIT = 1 << 17
VMX_EPT_INVEPT_BIT = 1 << 20
VMX_EPT_AD_BIT = 1 << 21
VMX_EPT_EXTENT_CONTEXT_BIT = 1 << 25
VMX_EPT_EXTENT_GLOBAL_BIT = 1 << 26
VMX_VPID_INVVPID_BIT = 1 << 32
VMX_VPID_EXTENT_INDIVIDUAL_ADDR_BIT = 1 << 40
VMX_VPID_EXTENT_SINGLE_CONTEXT_BIT = 1 << 41
VMX_VPID_EXTENT_GLOBAL_CONTEXT_BIT = 1 << 42
VMX_VPID_EXTENT_SINGLE_NON_GLOBAL_BIT = 1 << 43

# --- EPT entries and the EPTP (SDM 29.3.2, 25.6.11) -------------------------------------------
VMX_EPT_READABLE_MASK = 1 << 0
VMX_EPT_WRITABLE_MASK = 1 << 1
VMX_EPT_EXECUTABLE_MASK = 1 << 2
VMX_EPT_RWX_MASK = 0x7
VMX_EPT_MT_SHIFT = 3
VMX_EPT_MT_MASK = 0x7 << 3
VMX_EPT_IPAT_BIT = 1 << 6
VMX_EPT_LARGE_PAGE_BIT = 1 << 7
VMX_EPT_ACCESS_BIT = 1 << 8
VMX_EPT_DIRTY_BIT = 1 << 9
VMX_EPT_USER_EXECUTABLE_MASK = 1 << 10
VMX_EPT_SUPPRESS_VE_BIT = 1 << 63
VMX_EPTP_MT_MASK = 0x7
VMX_EPTP_MT_UC = 0
VMX_EPTP_MT_WB = 6
VMX_EPTP_PWL_MASK = 0x38
VMX_EPTP_PWL_4 = 3 << 3
VMX_EPTP_PWL_5 = 4 << 3
VMX_EPTP_AD_ENABLE_BIT = 1 << 6
EPT_MEMTYPE_UC = 0
EPT_MEMTYPE_WC = 1
EPT_MEMTYPE_WT = 4
EPT_MEMTYPE_WP = 5
EPT_MEMTYPE_WB = 6

# INVEPT / INVVPID types (SDM 31.3)
VMX_EPT_EXTENT_CONTEXT = 1
VMX_EPT_EXTENT_GLOBAL = 2
VMX_VPID_EXTENT_INDIVIDUAL_ADDR = 0
VMX_VPID_EXTENT_SINGLE_CONTEXT = 1
VMX_VPID_EXTENT_ALL_CONTEXT = 2
VMX_VPID_EXTENT_SINGLE_NON_GLOBAL = 3

# --- IA32_FEATURE_CONTROL (SDM 24.7; Linux FEAT_CTL_*) --------------------------------------
FEAT_CTL_LOCKED = 1 << 0
FEAT_CTL_VMX_ENABLED_INSIDE_SMX = 1 << 1
FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX = 1 << 2
