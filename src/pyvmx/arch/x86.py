"""x86 architecture facts the VMX model needs: exception vectors, #PF error-code bits, control
register, EFER and RFLAGS bits, VMX segment access rights, paging-entry bits (SDM Vol. 3;
Linux asm/processor-flags.h, asm/trapnr.h, asm/kvm_host.h)."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class ExceptionVector(IntEnum):
    """Exception vectors (SDM 6.3.1, Table 6-1; Linux X86_TRAP_* / *_VECTOR)."""

    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20
    CP = 21


# Exceptions that push an error code (SDM 6.15, Table 6-1 "Error Code" column).
EXCEPTIONS_WITH_ERROR_CODE = frozenset(
    {ExceptionVector.DF, ExceptionVector.TS, ExceptionVector.NP, ExceptionVector.SS,
     ExceptionVector.GP, ExceptionVector.PF, ExceptionVector.AC, ExceptionVector.CP}
)


class PageFaultErrorCode(IntFlag):
    """#PF error code (SDM 4.7, Figure 4-12; Linux PFERR_*_MASK in kvm_host.h)."""

    PRESENT = 1 << 0
    WRITE = 1 << 1
    USER = 1 << 2
    RSVD = 1 << 3
    FETCH = 1 << 4
    PK = 1 << 5
    SS = 1 << 6
    SGX = 1 << 15
    GUEST_FINAL = 1 << 32  # KVM-internal: fault on the final GPA of a nested walk
    GUEST_PAGE = 1 << 33  # KVM-internal: fault on a guest paging-structure access
    IMPLICIT_ACCESS = 1 << 48  # KVM-internal


class Cr0(IntFlag):
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


class Cr4(IntFlag):
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


class Efer(IntFlag):
    SCE = 1 << 0
    LME = 1 << 8
    LMA = 1 << 10
    NX = 1 << 11
    SVME = 1 << 12
    LMSLE = 1 << 13
    FFXSR = 1 << 14
    TCE = 1 << 15


EFER_RESERVED_MASK = ~int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NX | Efer.SVME | Efer.LMSLE | Efer.FFXSR | Efer.TCE) & 0xFFFFFFFFFFFFFFFF


class Rflags(IntFlag):
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


RFLAGS_IOPL_MASK = 3 << 12
RFLAGS_IOPL_SHIFT = 12
# Bits 63:22, 15, 5 and 3 are reserved (must be 0); bit 1 must be 1 (SDM 27.3.1.4).
RFLAGS_RESERVED_MASK = (0xFFFFFFFFFFFFFFFF & ~((1 << 22) - 1)) | (1 << 15) | (1 << 5) | (1 << 3)

# --- Segment access rights, VMX format (SDM 25.4.1, Table 25-2; Linux VMX_AR_*) ----------------
VMX_AR_TYPE_MASK = 0x0F
VMX_AR_TYPE_ACCESSES_MASK = 1 << 0
VMX_AR_TYPE_READABLE_MASK = 1 << 1  # code segments
VMX_AR_TYPE_WRITEABLE_MASK = 1 << 1  # data segments
VMX_AR_TYPE_CONFORMING_MASK = 1 << 2  # code segments
VMX_AR_TYPE_EXPAND_DOWN_MASK = 1 << 2  # data segments
VMX_AR_TYPE_CODE_MASK = 1 << 3
VMX_AR_S_MASK = 1 << 4
VMX_AR_DPL_SHIFT = 5
VMX_AR_DPL_MASK = 3 << 5
VMX_AR_P_MASK = 1 << 7
VMX_AR_AVL_MASK = 1 << 12
VMX_AR_L_MASK = 1 << 13
VMX_AR_DB_MASK = 1 << 14
VMX_AR_G_MASK = 1 << 15
VMX_AR_UNUSABLE_MASK = 1 << 16
VMX_AR_RESERVD_MASK = 0xFFFE0F00

# System-segment and gate descriptor types (SDM 3.5, Table 3-2)
SYS_TYPE_TSS16_AVAIL = 1
SYS_TYPE_LDT = 2
SYS_TYPE_TSS16_BUSY = 3
SYS_TYPE_CALL_GATE16 = 4
SYS_TYPE_TASK_GATE = 5
SYS_TYPE_INTR_GATE16 = 6
SYS_TYPE_TRAP_GATE16 = 7
SYS_TYPE_TSS_AVAIL = 9  # 32-bit, or 64-bit in IA-32e mode
SYS_TYPE_TSS_BUSY = 11
SYS_TYPE_CALL_GATE = 12
SYS_TYPE_INTR_GATE = 14
SYS_TYPE_TRAP_GATE = 15


class PteFlags(IntFlag):
    """Bits of the guest's paging-structure entries (SDM 4.3-4.5; Linux _PAGE_*)."""

    PRESENT = 1 << 0
    RW = 1 << 1
    USER = 1 << 2
    PWT = 1 << 3
    PCD = 1 << 4
    ACCESSED = 1 << 5
    DIRTY = 1 << 6
    PSE = 1 << 7  # page size
    GLOBAL = 1 << 8
    NX = 1 << 63


# DR7 / DR6 basics (SDM 18.2)
DR6_FIXED_1 = 0xFFFF0FF0
DR7_FIXED_1 = 0x00000400
DR6_BS = 1 << 14
