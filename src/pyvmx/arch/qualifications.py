"""Exit-qualification and VM-exit instruction-information layouts (SDM Vol. 3 28.2.1 "Basic
VM-Exit Information" and 28.2.5 "Information for VM Exits Due to Instruction Execution"), as
constants only; the encoders live in :mod:`pyvmx.vmx`.

Linux's names (arch/x86/include/asm/vmx.h) are used where Linux has them; the other layouts get
a prefix per layout (``CR_ACCESS_*``, ``IO_QUAL_*``, ``INSN_INFO_*`` ...).

Exits whose qualification is an address rather than a bit layout (SDM 28.2.1):

* INVLPG: the linear-address operand.
* INVEPT, INVPCID, INVVPID, LGDT, LIDT, LLDT, LTR, SGDT, SIDT, SLDT, STR, VMCLEAR, VMPTRLD,
  VMPTRST, VMREAD, VMWRITE, VMXON, XRSTORS, XSAVES, ENCLV, UMONITOR, LOADIWKEY: the displacement
  field of the memory operand (0 for a register operand); the instruction-information field
  (below) describes the rest of the operand.
* EPT violations and EPT misconfigurations also save the guest-physical address in the
  GUEST_PHYSICAL_ADDRESS field and (bit 7 below) a guest-linear address in GUEST_LINEAR_ADDRESS.
"""

from __future__ import annotations

# --- Control-register accesses (SDM 28.2.1, "Exit Qualification for Control-Register Accesses")
CR_ACCESS_NUM_MASK = 0xF  # 3:0 control register (0 for CLTS and LMSW)
CR_ACCESS_TYPE_SHIFT = 4  # 5:4 access type
CR_ACCESS_TYPE_MASK = 0x3 << 4
CR_ACCESS_TYPE_MOV_TO_CR = 0
CR_ACCESS_TYPE_MOV_FROM_CR = 1
CR_ACCESS_TYPE_CLTS = 2
CR_ACCESS_TYPE_LMSW = 3
CR_ACCESS_LMSW_MEMORY = 1 << 6  # LMSW operand type: 0 register, 1 memory
CR_ACCESS_REG_SHIFT = 8  # 11:8 general-purpose register of MOV CR (0 RAX ... 15 R15)
CR_ACCESS_REG_MASK = 0xF << 8
LMSW_SOURCE_DATA_SHIFT = 16  # 31:16 LMSW source data
LMSW_SOURCE_DATA = 0xFFFF << 16
# Linux's names for the same fields.  Linux's CONTROL_REG_ACCESS_NUM is 0x7 (bits 2:0); the SDM
# defines bits 3:0 (bit 3 selects CR8), which is what CR_ACCESS_NUM_MASK above follows.
CONTROL_REG_ACCESS_NUM = 0x7
CONTROL_REG_ACCESS_TYPE = CR_ACCESS_TYPE_MASK
CONTROL_REG_ACCESS_REG = CR_ACCESS_REG_MASK

# --- MOV DR (SDM 28.2.1, "Exit Qualification for MOV DR"; Linux DEBUG_REG_ACCESS_*) --------------
DR_ACCESS_NUM_MASK = 0x7  # 2:0 debug register
DR_ACCESS_FROM_DR = 1 << 4  # direction: 0 MOV to DR, 1 MOV from DR
DR_ACCESS_REG_SHIFT = 8  # 11:8 general-purpose register
DR_ACCESS_REG_MASK = 0xF << 8
DEBUG_REG_ACCESS_NUM = DR_ACCESS_NUM_MASK
DEBUG_REG_ACCESS_TYPE = DR_ACCESS_FROM_DR
TYPE_MOV_TO_DR = 0 << 4
TYPE_MOV_FROM_DR = 1 << 4

# --- I/O instructions (SDM 28.2.1, "Exit Qualification for I/O Instructions") --------------------
IO_QUAL_SIZE_MASK = 0x7  # 2:0 size of access minus 1: 0 = 1 byte, 1 = 2 bytes, 3 = 4 bytes
IO_QUAL_IN = 1 << 3  # direction: 0 OUT, 1 IN
IO_QUAL_STRING = 1 << 4  # INS/OUTS
IO_QUAL_REP = 1 << 5  # REP prefixed
IO_QUAL_IMMEDIATE = 1 << 6  # operand encoding: 0 port in DX, 1 immediate
IO_QUAL_PORT_SHIFT = 16  # 31:16 port number
IO_QUAL_PORT_MASK = 0xFFFF << 16

# --- APIC accesses (SDM 28.2.1, "Exit Qualification for APIC-Access VM Exits"; Linux names) -----
APIC_ACCESS_OFFSET = 0xFFF  # 11:0 offset within the APIC page (linear accesses)
APIC_ACCESS_TYPE = 0xF000  # 15:12 access type
TYPE_LINEAR_APIC_INST_READ = 0 << 12
TYPE_LINEAR_APIC_INST_WRITE = 1 << 12
TYPE_LINEAR_APIC_INST_FETCH = 2 << 12
TYPE_LINEAR_APIC_EVENT = 3 << 12  # linear access during event delivery
TYPE_PHYSICAL_APIC_EVENT = 10 << 12  # guest-physical access during event delivery
TYPE_PHYSICAL_APIC_INST = 15 << 12  # guest-physical access for an instruction fetch or execution

# --- EPT violations (SDM 28.2.1, "Exit Qualification for EPT Violations"; Linux EPT_VIOLATION_*)
EPT_VIOLATION_ACC_READ = 1 << 0  # the access was a data read
EPT_VIOLATION_ACC_WRITE = 1 << 1  # the access was a data write
EPT_VIOLATION_ACC_INSTR = 1 << 2  # the access was an instruction fetch
EPT_VIOLATION_PROT_READ = 1 << 3  # the guest-physical address was readable
EPT_VIOLATION_PROT_WRITE = 1 << 4  # ... writable
EPT_VIOLATION_PROT_EXEC = 1 << 5  # ... executable (supervisor-mode, with mode-based execute)
EPT_VIOLATION_PROT_USER_EXEC = 1 << 6  # not in mainline Linux: ... user-mode executable (MBEC)
EPT_VIOLATION_PROT_MASK = EPT_VIOLATION_PROT_READ | EPT_VIOLATION_PROT_WRITE | EPT_VIOLATION_PROT_EXEC
EPT_VIOLATION_RWX_SHIFT = 3  # EPT entry bits 2:0 land in qualification bits 5:3
EPT_VIOLATION_GVA_IS_VALID = 1 << 7  # GUEST_LINEAR_ADDRESS is valid
EPT_VIOLATION_GVA_TRANSLATED = 1 << 8  # the access was to the translated address, not to paging structures
EPT_VIOLATION_GVA_USER = 1 << 9  # not in Linux: user-mode linear address (advanced exit information)
EPT_VIOLATION_GVA_WRITABLE = 1 << 10  # not in Linux: linear address is read/write
EPT_VIOLATION_GVA_NX = 1 << 11  # not in Linux: linear address is execute-disable
EPT_VIOLATION_NMI_UNBLOCKING = 1 << 12  # not in Linux: NMI unblocking due to IRET
EPT_VIOLATION_SHADOW_STACK = 1 << 13  # not in Linux: shadow-stack access
EPT_VIOLATION_SUPERVISOR_SHADOW_STACK = 1 << 14  # not in Linux: supervisor shadow-stack page
EPT_VIOLATION_GUEST_PAGING_VERIFY = 1 << 15  # not in Linux: guest-paging verification
EPT_VIOLATION_ASYNC = 1 << 16  # not in Linux: asynchronous to instruction execution
# Older Linux names of bits 3-6.
EPT_VIOLATION_READABLE = EPT_VIOLATION_PROT_READ
EPT_VIOLATION_WRITABLE = EPT_VIOLATION_PROT_WRITE
EPT_VIOLATION_EXECUTABLE = EPT_VIOLATION_PROT_EXEC
EPT_VIOLATION_USER_EXEC = EPT_VIOLATION_PROT_USER_EXEC

# --- Debug exceptions (SDM 28.2.1, "Exit Qualification for Debug Exceptions") -------------------
DEBUG_QUAL_B0_B3_MASK = 0xF  # 3:0 breakpoint conditions met (B0-B3)
DEBUG_QUAL_BLD = 1 << 11  # bus-lock detected
DEBUG_QUAL_BD = 1 << 13  # debug-register access detected
DEBUG_QUAL_BS = 1 << 14  # single step or branch
DEBUG_QUAL_RTM = 1 << 16  # inside an RTM region

# --- Task switches (SDM 28.2.1, "Exit Qualification for Task Switches") --------------------------
TASK_SWITCH_SELECTOR_MASK = 0xFFFF  # 15:0 selector of the new TSS
TASK_SWITCH_SOURCE_SHIFT = 30  # 31:30 source of the task switch
TASK_SWITCH_SOURCE_MASK = 0x3 << 30
# Sources (Linux kvm_host.h TASK_SWITCH_*)
TASK_SWITCH_CALL = 0
TASK_SWITCH_IRET = 1
TASK_SWITCH_JMP = 2
TASK_SWITCH_GATE = 3  # task gate in the IDT

# --- SIPI (SDM 28.2.1): the SIPI vector is in bits 7:0 ---------------------------------------------
SIPI_VECTOR_MASK = 0xFF

# --- NOTIFY (instruction timeout) exits (Linux NOTIFY_VM_CONTEXT_INVALID) ---------------------------
NOTIFY_VM_CONTEXT_INVALID = 1 << 0  # the VM context is corrupted and not valid in the VMCS

# --- VM-entry failures (SDM 27.8 "VM-Entry Failures During or After Loading Guest State";
#     Linux enum vm_entry_failure_code) ----------------------------------------------------------
ENTRY_FAIL_DEFAULT = 0
ENTRY_FAIL_PDPTE = 2  # failure loading a PDPTE
ENTRY_FAIL_NMI = 3  # NMI injection while NMIs were blocked (virtual NMIs)
ENTRY_FAIL_VMCS_LINK_PTR = 4  # invalid VMCS link pointer

# --- VM-exit instruction information (SDM 28.2.5) -------------------------------------------------
# Common positions.  Which ones a given instruction defines is listed per layout below; the other
# bits are undefined.
INSN_INFO_SCALING_MASK = 0x3  # 1:0 scaling: 0 none, 1 by 2, 2 by 4, 3 by 8
INSN_INFO_REG1_SHIFT = 3  # 6:3 register operand (VMX instructions, LLDT..., RDRAND/RDSEED destination)
INSN_INFO_REG1_MASK = 0xF << 3
INSN_INFO_ADDRESS_SIZE_SHIFT = 7  # 9:7 address size: 0 16-bit, 1 32-bit, 2 64-bit
INSN_INFO_ADDRESS_SIZE_MASK = 0x7 << 7
INSN_INFO_MEM_REG_BIT = 1 << 10  # 0 memory operand, 1 register operand
INSN_INFO_OPERAND_SIZE_SHIFT = 11  # descriptor-table instructions: bit 11, 0 16-bit, 1 32-bit
INSN_INFO_OPERAND_SIZE_BIT = 1 << 11
INSN_INFO_RDRAND_OPERAND_SIZE_SHIFT = 11  # RDRAND/RDSEED/TPAUSE/UMWAIT: 12:11, 0 16, 1 32, 2 64
INSN_INFO_RDRAND_OPERAND_SIZE_MASK = 0x3 << 11
INSN_INFO_SEGMENT_SHIFT = 15  # 17:15 segment register: 0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS
INSN_INFO_SEGMENT_MASK = 0x7 << 15
INSN_INFO_INDEX_SHIFT = 18  # 21:18 index register
INSN_INFO_INDEX_MASK = 0xF << 18
INSN_INFO_INDEX_INVALID = 1 << 22
INSN_INFO_BASE_SHIFT = 23  # 26:23 base register
INSN_INFO_BASE_MASK = 0xF << 23
INSN_INFO_BASE_INVALID = 1 << 27
INSN_INFO_REG2_SHIFT = 28  # 31:28 second register operand (VMREAD/VMWRITE, INVEPT/INVPCID/INVVPID)
INSN_INFO_REG2_MASK = 0xF << 28
INSN_INFO_IDENTITY_SHIFT = 28  # 29:28 instruction identity (descriptor-table instructions)
INSN_INFO_IDENTITY_MASK = 0x3 << 28

INSN_INFO_ADDRESS_SIZE_16 = 0
INSN_INFO_ADDRESS_SIZE_32 = 1
INSN_INFO_ADDRESS_SIZE_64 = 2

# Instruction identities of GDTR/IDTR accesses (exit reason 46) and LDTR/TR accesses (47).
GDTR_IDTR_SGDT, GDTR_IDTR_SIDT, GDTR_IDTR_LGDT, GDTR_IDTR_LIDT = range(4)
LDTR_TR_SLDT, LDTR_TR_STR, LDTR_TR_LLDT, LDTR_TR_LTR = range(4)

# Which fields each layout defines (SDM 28.2.5), as the masks above OR-ed together.
# INS/OUTS (needs IA32_VMX_BASIC[54]): address size 9:7, segment 17:15 (OUTS only; INS uses ES).
INSN_INFO_LAYOUT_INS_OUTS = INSN_INFO_ADDRESS_SIZE_MASK | INSN_INFO_SEGMENT_MASK
_MEMORY_OPERAND = (
    INSN_INFO_SCALING_MASK
    | INSN_INFO_ADDRESS_SIZE_MASK
    | INSN_INFO_SEGMENT_MASK
    | INSN_INFO_INDEX_MASK
    | INSN_INFO_INDEX_INVALID
    | INSN_INFO_BASE_MASK
    | INSN_INFO_BASE_INVALID
)
# INVEPT, INVPCID, INVVPID: memory operand plus the type register in 31:28.
INSN_INFO_LAYOUT_INVEPT_INVPCID_INVVPID = _MEMORY_OPERAND | INSN_INFO_REG2_MASK
# LGDT, LIDT, SGDT, SIDT: memory operand, operand size (bit 11), identity 29:28.
INSN_INFO_LAYOUT_GDTR_IDTR = _MEMORY_OPERAND | INSN_INFO_OPERAND_SIZE_BIT | INSN_INFO_IDENTITY_MASK
# LLDT, LTR, SLDT, STR: memory or register operand (reg1 6:3 if bit 10), identity 29:28.
INSN_INFO_LAYOUT_LDTR_TR = _MEMORY_OPERAND | INSN_INFO_REG1_MASK | INSN_INFO_MEM_REG_BIT | INSN_INFO_IDENTITY_MASK
# RDRAND, RDSEED, TPAUSE, UMWAIT: destination register 6:3, operand size 12:11.
INSN_INFO_LAYOUT_RDRAND_RDSEED = INSN_INFO_REG1_MASK | INSN_INFO_RDRAND_OPERAND_SIZE_MASK
# VMCLEAR, VMPTRLD, VMPTRST, VMXON, XRSTORS, XSAVES: memory operand only.
INSN_INFO_LAYOUT_VMX_MEMORY = _MEMORY_OPERAND
# VMREAD, VMWRITE: memory or register operand (reg1 6:3 if bit 10) and register 31:28.
INSN_INFO_LAYOUT_VMREAD_VMWRITE = _MEMORY_OPERAND | INSN_INFO_REG1_MASK | INSN_INFO_MEM_REG_BIT | INSN_INFO_REG2_MASK
