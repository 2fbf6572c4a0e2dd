"""Basic VM-exit reasons (SDM Vol. 3 Appendix C "VMX Basic Exit Reasons", Table C-1) with the
names of Linux's ``EXIT_REASON_*`` (arch/x86/include/uapi/asm/vmx.h), and the flag bits of the
exit-reason field (SDM 25.9.1, table "Format of Exit Reason").

Numbers the SDM leaves unassigned (35, 38, 42, 71, ...) have no member.  Where Linux has no name
the SDM's wording is used in Linux's style; such members say so.
"""

from __future__ import annotations

from enum import IntEnum

# Exit-reason field (SDM 25.9.1).  Bits 15:0 hold the basic exit reason.
VMX_EXIT_REASON_BASIC_MASK = 0xFFFF
VMX_EXIT_REASONS_BUS_LOCK_DETECTED = 1 << 26  # Linux union vmx_exit_reason.bus_lock_detected
VMX_EXIT_REASONS_SGX_ENCLAVE_MODE = 0x08000000  # bit 27: exit from enclave mode
VMX_EXIT_REASONS_SMI_PENDING_MTF = 1 << 28  # Linux union vmx_exit_reason.smi_pending_mtf
VMX_EXIT_REASONS_SMI_FROM_VMX_ROOT = 1 << 29  # Linux union vmx_exit_reason.smi_from_vmx_root
VMX_EXIT_REASONS_FAILED_VMENTRY = 0x80000000  # bit 31: VM-entry failure


class ExitReason(IntEnum):
    """Basic exit reasons, SDM Table C-1."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT_SIGNAL = 3
    SIPI_SIGNAL = 4
    IO_SMI = 5  # not in Linux
    OTHER_SMI = 6
    INTERRUPT_WINDOW = 7  # older Linux: EXIT_REASON_PENDING_INTERRUPT
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    CPUID = 10
    GETSEC = 11  # not in Linux
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    RSM = 17  # not in Linux
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMOFF = 26  # Linux's name for the VMXOFF exit
    VMXOFF = 26  # alias: the SDM's instruction name
    VMON = 27  # Linux's name for the VMXON exit
    VMXON = 27  # alias: the SDM's instruction name
    CR_ACCESS = 28
    DR_ACCESS = 29
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    INVALID_STATE = 33
    MSR_LOAD_FAIL = 34
    # 35 is not used
    MWAIT_INSTRUCTION = 36
    MONITOR_TRAP_FLAG = 37
    # 38 is not used
    MONITOR_INSTRUCTION = 39
    PAUSE_INSTRUCTION = 40
    MCE_DURING_VMENTRY = 41
    # 42 is not used
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    EOI_INDUCED = 45
    GDTR_IDTR = 46
    LDTR_TR = 47
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    INVEPT = 50
    RDTSCP = 51
    PREEMPTION_TIMER = 52
    INVVPID = 53
    WBINVD = 54
    XSETBV = 55
    APIC_WRITE = 56
    RDRAND = 57
    INVPCID = 58
    VMFUNC = 59
    ENCLS = 60
    RDSEED = 61
    PML_FULL = 62
    XSAVES = 63
    XRSTORS = 64
    PCONFIG = 65  # not in Linux
    SPP = 66  # not in mainline Linux (SPP series): SPP-related event
    UMWAIT = 67
    TPAUSE = 68
    LOADIWKEY = 69  # not in Linux
    ENCLV = 70  # not in mainline Linux
    # 71 is not used
    ENQCMD_PASID = 72  # not in Linux: ENQCMD PASID translation failure
    ENQCMDS_PASID = 73  # not in Linux: ENQCMDS PASID translation failure
    BUS_LOCK = 74
    NOTIFY = 75  # SDM "instruction timeout"
    SEAMCALL = 76
    TDCALL = 77
    RDMSRLIST = 78  # not in Linux
    WRMSRLIST = 79  # not in Linux
    URDMSR = 80  # not in Linux; SDM revisions after Dec 2023 (also bochs cpu/vmx.h)
    UWRMSR = 81  # not in Linux; SDM revisions after Dec 2023 (also bochs cpu/vmx.h)
    # 82 and 83 are not assigned in the sources checked
    MSR_READ_IMM = 84  # RDMSR with an immediate operand; SDM revisions after Dec 2023
    MSR_WRITE_IMM = 85  # WRMSRNS with an immediate operand; SDM revisions after Dec 2023


EXIT_REASON_DESCRIPTIONS: dict[ExitReason, str] = {
    ExitReason.EXCEPTION_NMI: "exception or non-maskable interrupt (NMI)",
    ExitReason.EXTERNAL_INTERRUPT: "external interrupt",
    ExitReason.TRIPLE_FAULT: "triple fault",
    ExitReason.INIT_SIGNAL: "INIT signal",
    ExitReason.SIPI_SIGNAL: "start-up IPI (SIPI)",
    ExitReason.IO_SMI: "I/O system-management interrupt (SMI)",
    ExitReason.OTHER_SMI: "other SMI",
    ExitReason.INTERRUPT_WINDOW: "interrupt window",
    ExitReason.NMI_WINDOW: "NMI window",
    ExitReason.TASK_SWITCH: "task switch",
    ExitReason.CPUID: "CPUID",
    ExitReason.GETSEC: "GETSEC",
    ExitReason.HLT: "HLT",
    ExitReason.INVD: "INVD",
    ExitReason.INVLPG: "INVLPG",
    ExitReason.RDPMC: "RDPMC",
    ExitReason.RDTSC: "RDTSC",
    ExitReason.RSM: "RSM in SMM",
    ExitReason.VMCALL: "VMCALL",
    ExitReason.VMCLEAR: "VMCLEAR",
    ExitReason.VMLAUNCH: "VMLAUNCH",
    ExitReason.VMPTRLD: "VMPTRLD",
    ExitReason.VMPTRST: "VMPTRST",
    ExitReason.VMREAD: "VMREAD",
    ExitReason.VMRESUME: "VMRESUME",
    ExitReason.VMWRITE: "VMWRITE",
    ExitReason.VMOFF: "VMXOFF",
    ExitReason.VMON: "VMXON",
    ExitReason.CR_ACCESS: "control-register access",
    ExitReason.DR_ACCESS: "MOV DR (debug-register access)",
    ExitReason.IO_INSTRUCTION: "I/O instruction",
    ExitReason.MSR_READ: "RDMSR",
    ExitReason.MSR_WRITE: "WRMSR",
    ExitReason.INVALID_STATE: "VM-entry failure due to invalid guest state",
    ExitReason.MSR_LOAD_FAIL: "VM-entry failure due to MSR loading",
    ExitReason.MWAIT_INSTRUCTION: "MWAIT",
    ExitReason.MONITOR_TRAP_FLAG: "monitor trap flag",
    ExitReason.MONITOR_INSTRUCTION: "MONITOR",
    ExitReason.PAUSE_INSTRUCTION: "PAUSE",
    ExitReason.MCE_DURING_VMENTRY: "VM-entry failure due to machine-check event",
    ExitReason.TPR_BELOW_THRESHOLD: "TPR below threshold",
    ExitReason.APIC_ACCESS: "APIC access",
    ExitReason.EOI_INDUCED: "virtualized EOI",
    ExitReason.GDTR_IDTR: "access to GDTR or IDTR (LGDT, LIDT, SGDT, SIDT)",
    ExitReason.LDTR_TR: "access to LDTR or TR (LLDT, LTR, SLDT, STR)",
    ExitReason.EPT_VIOLATION: "EPT violation",
    ExitReason.EPT_MISCONFIG: "EPT misconfiguration",
    ExitReason.INVEPT: "INVEPT",
    ExitReason.RDTSCP: "RDTSCP",
    ExitReason.PREEMPTION_TIMER: "VMX-preemption timer expired",
    ExitReason.INVVPID: "INVVPID",
    ExitReason.WBINVD: "WBINVD or WBNOINVD",
    ExitReason.XSETBV: "XSETBV",
    ExitReason.APIC_WRITE: "APIC write",
    ExitReason.RDRAND: "RDRAND",
    ExitReason.INVPCID: "INVPCID",
    ExitReason.VMFUNC: "VMFUNC",
    ExitReason.ENCLS: "ENCLS",
    ExitReason.RDSEED: "RDSEED",
    ExitReason.PML_FULL: "page-modification log full",
    ExitReason.XSAVES: "XSAVES",
    ExitReason.XRSTORS: "XRSTORS",
    ExitReason.PCONFIG: "PCONFIG",
    ExitReason.SPP: "SPP-related event",
    ExitReason.UMWAIT: "UMWAIT",
    ExitReason.TPAUSE: "TPAUSE",
    ExitReason.LOADIWKEY: "LOADIWKEY",
    ExitReason.ENCLV: "ENCLV",
    ExitReason.ENQCMD_PASID: "ENQCMD PASID translation failure",
    ExitReason.ENQCMDS_PASID: "ENQCMDS PASID translation failure",
    ExitReason.BUS_LOCK: "bus lock",
    ExitReason.NOTIFY: "instruction timeout (notify)",
    ExitReason.SEAMCALL: "SEAMCALL",
    ExitReason.TDCALL: "TDCALL",
    ExitReason.RDMSRLIST: "RDMSRLIST",
    ExitReason.WRMSRLIST: "WRMSRLIST",
    ExitReason.URDMSR: "URDMSR",
    ExitReason.UWRMSR: "UWRMSR",
    ExitReason.MSR_READ_IMM: "RDMSR with immediate operand",
    ExitReason.MSR_WRITE_IMM: "WRMSRNS with immediate operand",
}

# Exit reasons reported only with bit 31 set, for a failed VM entry (SDM 27.8).
VM_ENTRY_FAILURE_REASONS: frozenset[ExitReason] = frozenset({
    ExitReason.INVALID_STATE,
    ExitReason.MSR_LOAD_FAIL,
    ExitReason.MCE_DURING_VMENTRY,
})
