"""x86 architecture facts the VMX model needs: exception vectors, #PF error-code bits, control
register, EFER and RFLAGS bits, segment access rights in the VMCS format, paging-entry bits,
debug registers, local-APIC register offsets (SDM Vol. 3; Linux asm/trapnr.h,
asm/processor-flags.h, asm/msr-index.h, asm/vmx.h, asm/kvm_host.h, asm/pgtable_types.h,
asm/debugreg.h, asm/apicdef.h).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

_U64 = (1 << 64) - 1


class ExceptionVector(IntEnum):
    """Exception vectors (SDM 6.3.1, Table 6-1; Linux ``*_VECTOR`` in uapi/asm/kvm.h)."""

    DE = 0  # divide error
    DB = 1  # debug
    NMI = 2
    BP = 3  # breakpoint (INT3)
    OF = 4  # overflow (INTO)
    BR = 5  # BOUND range exceeded
    UD = 6  # invalid opcode
    NM = 7  # device not available
    DF = 8  # double fault
    TS = 10  # invalid TSS
    NP = 11  # segment not present
    SS = 12  # stack-segment fault
    GP = 13  # general protection
    PF = 14  # page fault
    MF = 16  # x87 floating-point error
    AC = 17  # alignment check
    MC = 18  # machine check
    XM = 19  # SIMD floating-point exception
    VE = 20  # virtualization exception
    CP = 21  # control-protection exception


# Exceptions that push an error code (SDM 6.15; the "Error Code" column of Table 6-1).
EXCEPTIONS_WITH_ERROR_CODE: frozenset[ExceptionVector] = frozenset({
    ExceptionVector.DF,
    ExceptionVector.TS,
    ExceptionVector.NP,
    ExceptionVector.SS,
    ExceptionVector.GP,
    ExceptionVector.PF,
    ExceptionVector.AC,
    ExceptionVector.CP,
})


class PageFaultErrorCode(IntFlag):
    """#PF error code (SDM 4.7, Figure 4-12; Linux PFERR_*_MASK in asm/kvm_host.h).

    Bits 31:0 are architectural; GUEST_FINAL, GUEST_PAGE and IMPLICIT_ACCESS are KVM's own
    (the first two mirror AMD's nested-page-fault error code).
    """

    PRESENT = 1 << 0
    WRITE = 1 << 1
    USER = 1 << 2
    RSVD = 1 << 3
    FETCH = 1 << 4
    PK = 1 << 5
    SS = 1 << 6  # shadow-stack access
    SGX = 1 << 15
    GUEST_FINAL = 1 << 32  # fault on the final guest-physical address of a nested walk
    GUEST_PAGE = 1 << 33  # fault on a guest paging-structure access
    IMPLICIT_ACCESS = 1 << 48


class Cr0(IntFlag):
    """CR0 bits (SDM 2.5; Linux X86_CR0_*)."""

    PE = 1 << 0
    MP = 1 << 1
    EM = 1 << 2
    TS = 1 << 3
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16
    AM = 1 << 18
    NW = 1 << 29
    CD = 1 << 30
    PG = 1 << 31


# Every CR0 bit not defined above is reserved (Linux kvm_host.h CR0_RESERVED_BITS).
CR0_RESERVED_BITS = _U64 & ~int(
    Cr0.PE | Cr0.MP | Cr0.EM | Cr0.TS | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.AM | Cr0.NW | Cr0.CD | Cr0.PG
)


class Cr4(IntFlag):
    """CR4 bits (SDM 2.5; Linux X86_CR4_*)."""

    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2
    DE = 1 << 3
    PSE = 1 << 4
    PAE = 1 << 5
    MCE = 1 << 6
    PGE = 1 << 7
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12
    VMXE = 1 << 13
    SMXE = 1 << 14
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    KL = 1 << 19
    SMEP = 1 << 20
    SMAP = 1 << 21
    PKE = 1 << 22
    CET = 1 << 23
    PKS = 1 << 24
    LAM_SUP = 1 << 28
    FRED = 1 << 32


class Efer(IntFlag):
    """IA32_EFER bits (SDM 2.2.1; Linux _EFER_* / EFER_* in msr-index.h).

    SVME, LMSLE, FFXSR and TCE are AMD-only: reserved on Intel processors.
    """

    SCE = 1 << 0
    LME = 1 << 8
    LMA = 1 << 10
    NX = 1 << 11
    SVME = 1 << 12
    LMSLE = 1 << 13
    FFXSR = 1 << 14
    TCE = 1 << 15


# Bits no x86 processor defines (AMD's included).  On Intel, see EFER_INTEL_RESERVED_MASK.
EFER_RESERVED_MASK = _U64 & ~int(
    Efer.SCE | Efer.LME | Efer.LMA | Efer.NX | Efer.SVME | Efer.LMSLE | Efer.FFXSR | Efer.TCE
)
# Reserved bits on an Intel 64 processor: all but SCE, LME, LMA and NXE (SDM 2.2.1, Table 2-1).
EFER_INTEL_RESERVED_MASK = _U64 & ~int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NX)


class Rflags(IntFlag):
    """RFLAGS bits (SDM Vol. 1 3.4.3; Linux X86_EFLAGS_*)."""

    CF = 1 << 0
    FIXED = 1 << 1  # always 1
    PF = 1 << 2
    AF = 1 << 4
    ZF = 1 << 6
    SF = 1 << 7
    TF = 1 << 8
    IF = 1 << 9
    DF = 1 << 10
    OF = 1 << 11
    NT = 1 << 14
    RF = 1 << 16
    VM = 1 << 17
    AC = 1 << 18
    VIF = 1 << 19
    VIP = 1 << 20
    ID = 1 << 21


RFLAGS_IOPL_SHIFT = 12
RFLAGS_IOPL_MASK = 3 << 12  # Linux X86_EFLAGS_IOPL
RFLAGS_FIXED_ONE = int(Rflags.FIXED)
# Bits 63:22, 15, 5 and 3 are reserved (must be 0); bit 1 must be 1 (SDM 27.3.1.4).
RFLAGS_RESERVED_MASK = (_U64 & ~((1 << 22) - 1)) | (1 << 15) | (1 << 5) | (1 << 3)

# --- Segment selectors (SDM 3.4.2; Linux SEGMENT_*) ----------------------------------------------
SEGMENT_RPL_MASK = 0x3
SEGMENT_TI_MASK = 0x4  # table indicator: 0 GDT, 1 LDT
SEGMENT_INDEX_SHIFT = 3

# --- Segment access rights in the VMCS format (SDM 25.4.1, "Format of Access Rights";
#     Linux VMX_AR_*) -----------------------------------------------------------------------------
VMX_AR_TYPE_MASK = 0x0F  # 3:0 segment type
VMX_AR_S_MASK = 1 << 4  # descriptor type: 0 system, 1 code or data
VMX_AR_DPL_SHIFT = 5  # 6:5 descriptor privilege level
VMX_AR_DPL_MASK = 3 << 5
VMX_AR_P_MASK = 1 << 7  # present
VMX_AR_AVL_MASK = 1 << 12  # available for system software
VMX_AR_L_MASK = 1 << 13  # 64-bit mode active (CS only)
VMX_SEGMENT_AR_L_MASK = VMX_AR_L_MASK
VMX_AR_DB_MASK = 1 << 14  # default operation size (0 16-bit, 1 32-bit)
VMX_AR_G_MASK = 1 << 15  # granularity
VMX_AR_UNUSABLE_MASK = 1 << 16  # segment unusable (0 usable, 1 unusable)
VMX_AR_RESERVD_MASK = 0xFFFE0F00  # bits 11:8 and 31:17 (Linux's spelling)

# Code- and data-segment type bits (SDM 3.4.5.1, Table 3-1), within the type field.
VMX_AR_TYPE_ACCESSES_MASK = 1 << 0  # accessed (Linux's spelling)
VMX_AR_TYPE_READABLE_MASK = 1 << 1  # code segments: readable
# Data segments: writable.  NOTE: Linux defines VMX_AR_TYPE_WRITEABLE_MASK as (1 << 2), which is
# the expand-down bit; the SDM's write-enable bit is bit 1, which is what this constant holds.
VMX_AR_TYPE_WRITEABLE_MASK = 1 << 1
VMX_AR_TYPE_CONFORMING_MASK = 1 << 2  # code segments: conforming
VMX_AR_TYPE_EXPAND_DOWN_MASK = 1 << 2  # data segments: expand-down
VMX_AR_TYPE_CODE_MASK = 1 << 3  # 1 code, 0 data
# System types in the type field (Linux VMX_AR_TYPE_*).
VMX_AR_TYPE_BUSY_64_TSS = 11
VMX_AR_TYPE_BUSY_32_TSS = 11
VMX_AR_TYPE_BUSY_16_TSS = 3
VMX_AR_TYPE_LDT = 2

# System-segment and gate-descriptor types (SDM 3.5, Table 3-2).
SYS_TYPE_TSS16_AVAIL = 1
SYS_TYPE_LDT = 2
SYS_TYPE_TSS16_BUSY = 3
SYS_TYPE_CALL_GATE16 = 4
SYS_TYPE_TASK_GATE = 5
SYS_TYPE_INTR_GATE16 = 6
SYS_TYPE_TRAP_GATE16 = 7
SYS_TYPE_TSS_AVAIL = 9  # 32-bit TSS, or 64-bit TSS in IA-32e mode
SYS_TYPE_TSS_BUSY = 11
SYS_TYPE_CALL_GATE = 12
SYS_TYPE_INTR_GATE = 14
SYS_TYPE_TRAP_GATE = 15

# --- Paging-structure entries of the guest's own page tables (SDM 4.3-4.5; Linux _PAGE_*) -------


class PteFlags(IntFlag):
    """Bits common to 32-bit, PAE and 4-level paging-structure entries (Linux _PAGE_*)."""

    PRESENT = 1 << 0
    RW = 1 << 1
    USER = 1 << 2
    PWT = 1 << 3
    PCD = 1 << 4
    ACCESSED = 1 << 5
    DIRTY = 1 << 6  # leaf entries
    PSE = 1 << 7  # page size: maps a page (PDE/PDPTE); the PAT bit in a 4-KB PTE
    GLOBAL = 1 << 8  # leaf entries
    NX = 1 << 63  # execute-disable (PAE and 4-level paging)


PTE_PAT = 1 << 7  # Linux _PAGE_PAT: PAT bit of a 4-KB PTE (same position as PSE)
PTE_PAT_LARGE = 1 << 12  # Linux _PAGE_PAT_LARGE: PAT bit of a 2-MB/1-GB leaf entry
PTE_PKEY_SHIFT = 59  # 62:59 protection key (4-level paging, leaf entries)
PTE_PKEY_MASK = 0xF << 59

# --- Memory types (SDM 12.3, Table 12-2; Linux X86_MEMTYPE_*) -------------------------------------
X86_MEMTYPE_UC = 0
X86_MEMTYPE_WC = 1
X86_MEMTYPE_WT = 4
X86_MEMTYPE_WP = 5
X86_MEMTYPE_WB = 6
X86_MEMTYPE_UC_MINUS = 7  # PAT only

# --- Debug registers (SDM 18.2; Linux asm/debugreg.h and kvm_host.h) -----------------------------
DR6_B0_B3 = 0xF  # breakpoint conditions detected
DR6_BLD = 1 << 11  # bus-lock detected (active low)
DR6_BD = 1 << 13  # debug-register access detected
DR6_BS = 1 << 14  # single step
DR6_BT = 1 << 15  # task switch
DR6_RTM = 1 << 16  # RTM region (active low)
DR6_ACTIVE_LOW = 0xFFFF0FF0  # DR6 with no debug condition recorded (init/reset value)
DR6_VOLATILE = 0x0001E80F  # bits the processor writes
DR6_FIXED_1 = DR6_ACTIVE_LOW & ~DR6_VOLATILE  # 0xFFFE07F0, as in Linux
DR7_BP_EN_MASK = 0xFF  # L0, G0, ... L3, G3
DR7_GE = 1 << 9
DR7_GD = 1 << 13  # general detect
DR7_FIXED_1 = 0x00000400  # bit 10 reads as 1
DR7_VOLATILE = 0xFFFF2BFF  # bits software may write (bits 63:32 are reserved, must be 0)


class DebugCtl(IntFlag):
    """IA32_DEBUGCTL bits (SDM 18.4.1; Linux DEBUGCTLMSR_*)."""

    LBR = 1 << 0
    BTF = 1 << 1
    BUS_LOCK_DETECT = 1 << 2
    TR = 1 << 6
    BTS = 1 << 7
    BTINT = 1 << 8
    BTS_OFF_OS = 1 << 9
    BTS_OFF_USR = 1 << 10
    FREEZE_LBRS_ON_PMI = 1 << 11
    FREEZE_PERFMON_ON_PMI = 1 << 12
    FREEZE_IN_SMM = 1 << 14
    RTM_DEBUG = 1 << 15


class ApicRegister(IntEnum):
    """Local-APIC register offsets in the APIC page (SDM 11.4.1, Table 11-1; Linux APIC_* in
    asm/apicdef.h).  In x2APIC mode the MSR index is 0x800 + (offset >> 4)."""

    ID = 0x20
    LVR = 0x30
    TASKPRI = 0x80  # TPR
    ARBPRI = 0x90
    PROCPRI = 0xA0  # PPR
    EOI = 0xB0
    RRR = 0xC0
    LDR = 0xD0
    DFR = 0xE0
    SPIV = 0xF0
    ISR = 0x100
    TMR = 0x180
    IRR = 0x200
    ESR = 0x280
    LVTCMCI = 0x2F0
    ICR = 0x300
    ICR2 = 0x310
    LVTT = 0x320
    LVTTHMR = 0x330
    LVTPC = 0x340
    LVT0 = 0x350
    LVT1 = 0x360
    LVTERR = 0x370
    TMICT = 0x380
    TMCCT = 0x390
    TDCR = 0x3E0
    SELF_IPI = 0x3F0  # x2APIC only
