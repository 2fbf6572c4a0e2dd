"""Basic VM-exit reasons (SDM Appendix C), Linux uapi/asm/vmx.h ``EXIT_REASON_*`` names."""

from __future__ import annotations

from enum import IntEnum

VMX_EXIT_REASONS_FAILED_VMENTRY = 0x80000000
VMX_EXIT_REASONS_SGX_ENCLAVE_MODE = 0x08000000
VMX_EXIT_REASON_BASIC_MASK = 0xFFFF


class ExitReason(IntEnum):
    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT_SIGNAL = 3
    SIPI_SIGNAL = 4
    IO_SMI = 5  # SDM name; not in Linux
    OTHER_SMI = 6  # SDM name; not in Linux
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    CPUID = 10
    GETSEC = 11  # SDM name; not in Linux
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    RSM = 17  # SDM name; not in Linux
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMOFF = 26
    VMON = 27
    CR_ACCESS = 28
    DR_ACCESS = 29
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    INVALID_STATE = 33
    MSR_LOAD_FAIL = 34
    MWAIT_INSTRUCTION = 36
    MONITOR_TRAP_FLAG = 37
    MONITOR_INSTRUCTION = 39
    PAUSE_INSTRUCTION = 40
    MCE_DURING_VMENTRY = 41
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
    PCONFIG = 65  # SDM name; not in Linux
    SPP = 66
    UMWAIT = 67
    TPAUSE = 68
    LOADIWKEY = 69  # SDM name; not in Linux
    ENCLV = 70  # SDM name; not in Linux
    ENQCMD_PASID = 72  # SDM name; not in Linux
    ENQCMDS_PASID = 73  # SDM name; not in Linux
    BUS_LOCK = 74
    NOTIFY = 75
    SEAMCALL = 76  # SDM name; not in Linux
    TDCALL = 77
    RDMSRLIST = 78  # SDM name; not in Linux
    WRMSRLIST = 79  # SDM name; not in Linux


EXIT_REASON_DESCRIPTIONS: dict[ExitReason, str] = {
    ExitReason.EXCEPTION_NMI: "exception or non-maskable interrupt",
    ExitReason.EXTERNAL_INTERRUPT: "external interrupt",
    ExitReason.TRIPLE_FAULT: "triple fault",
    ExitReason.INIT_SIGNAL: "INIT signal",
    ExitReason.SIPI_SIGNAL: "start-up IPI",
    ExitReason.IO_SMI: "I/O system-management interrupt",
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
    ExitReason.DR_ACCESS: "MOV DR",
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
    ExitReason.GDTR_IDTR: "access to GDTR or IDTR",
    ExitReason.LDTR_TR: "access to LDTR or TR",
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
}
