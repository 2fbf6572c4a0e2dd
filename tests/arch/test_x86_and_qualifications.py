"""x86 bits (SDM Vol. 3 ch. 2-6, 18; Linux processor-flags.h, kvm_host.h, vmx.h) and the exit
qualification / instruction-information layouts (SDM 28.2.1, 28.2.5)."""

from __future__ import annotations

from enum import IntFlag

import pytest

from pyvmx.arch import qualifications as q
from pyvmx.arch import x86

U64 = (1 << 64) - 1


def test_exception_vectors() -> None:
    expected = {"DE": 0, "DB": 1, "NMI": 2, "BP": 3, "OF": 4, "BR": 5, "UD": 6, "NM": 7, "DF": 8, "TS": 10,
                "NP": 11, "SS": 12, "GP": 13, "PF": 14, "MF": 16, "AC": 17, "MC": 18, "XM": 19, "VE": 20,
                "CP": 21}
    assert {v.name: int(v) for v in x86.ExceptionVector} == expected


def test_exceptions_with_error_code() -> None:
    assert sorted(int(v) for v in x86.EXCEPTIONS_WITH_ERROR_CODE) == [8, 10, 11, 12, 13, 14, 17, 21]


@pytest.mark.parametrize(
    "cls, expected",
    [
        (x86.PageFaultErrorCode, {"PRESENT": 0, "WRITE": 1, "USER": 2, "RSVD": 3, "FETCH": 4, "PK": 5, "SS": 6,
                                  "SGX": 15, "GUEST_FINAL": 32, "GUEST_PAGE": 33, "IMPLICIT_ACCESS": 48}),
        (x86.Cr0, {"PE": 0, "MP": 1, "EM": 2, "TS": 3, "ET": 4, "NE": 5, "WP": 16, "AM": 18, "NW": 29, "CD": 30,
                   "PG": 31}),
        (x86.Cr4, {"VME": 0, "PVI": 1, "TSD": 2, "DE": 3, "PSE": 4, "PAE": 5, "MCE": 6, "PGE": 7, "PCE": 8,
                   "OSFXSR": 9, "OSXMMEXCPT": 10, "UMIP": 11, "LA57": 12, "VMXE": 13, "SMXE": 14,
                   "FSGSBASE": 16, "PCIDE": 17, "OSXSAVE": 18, "KL": 19, "SMEP": 20, "SMAP": 21, "PKE": 22,
                   "CET": 23, "PKS": 24, "LAM_SUP": 28, "FRED": 32}),
        (x86.Efer, {"SCE": 0, "LME": 8, "LMA": 10, "NX": 11, "SVME": 12, "LMSLE": 13, "FFXSR": 14, "TCE": 15}),
        (x86.Rflags, {"CF": 0, "FIXED": 1, "PF": 2, "AF": 4, "ZF": 6, "SF": 7, "TF": 8, "IF": 9, "DF": 10,
                      "OF": 11, "NT": 14, "RF": 16, "VM": 17, "AC": 18, "VIF": 19, "VIP": 20, "ID": 21}),
        (x86.PteFlags, {"PRESENT": 0, "RW": 1, "USER": 2, "PWT": 3, "PCD": 4, "ACCESSED": 5, "DIRTY": 6,
                        "PSE": 7, "GLOBAL": 8, "NX": 63}),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_bit_positions(cls: type[IntFlag], expected: dict[str, int]) -> None:
    assert {m.name: int(m).bit_length() - 1 for m in cls} == expected
    assert len(cls.__members__) == len(expected)  # no aliases, nothing extra


def test_rflags_reserved_mask() -> None:
    defined = 0
    for flag in x86.Rflags:
        defined |= int(flag)
    assert x86.RFLAGS_RESERVED_MASK & (defined | x86.RFLAGS_IOPL_MASK) == 0
    assert x86.RFLAGS_RESERVED_MASK | defined | x86.RFLAGS_IOPL_MASK == U64
    assert x86.RFLAGS_RESERVED_MASK & 0xFFFF_FFFF == 0xFFC0_8028  # 31:22, 15, 5, 3
    assert x86.RFLAGS_FIXED_ONE == 2


def test_efer_and_cr0_reserved_masks() -> None:
    assert x86.EFER_INTEL_RESERVED_MASK == U64 & ~0xD01
    assert x86.EFER_RESERVED_MASK == U64 & ~0xFD01
    assert x86.CR0_RESERVED_BITS == U64 & ~0xE005003F


def test_vmx_access_rights_partition_32_bits() -> None:
    parts = [x86.VMX_AR_TYPE_MASK, x86.VMX_AR_S_MASK, x86.VMX_AR_DPL_MASK, x86.VMX_AR_P_MASK, x86.VMX_AR_AVL_MASK,
             x86.VMX_AR_L_MASK, x86.VMX_AR_DB_MASK, x86.VMX_AR_G_MASK, x86.VMX_AR_UNUSABLE_MASK,
             x86.VMX_AR_RESERVD_MASK]
    assert sum(parts) == 0xFFFFFFFF
    assert all(a & b == 0 for i, a in enumerate(parts) for b in parts[i + 1:])
    assert x86.VMX_AR_RESERVD_MASK == 0xF00 | 0xFFFE0000  # bits 11:8 and 31:17
    assert x86.VMX_AR_DPL_MASK >> x86.VMX_AR_DPL_SHIFT == 3


def test_segment_types() -> None:
    # Code/data type bits (SDM Table 3-1): accessed 0, write/read 1, expand-down/conforming 2, code 3.
    assert (x86.VMX_AR_TYPE_ACCESSES_MASK, x86.VMX_AR_TYPE_WRITEABLE_MASK, x86.VMX_AR_TYPE_READABLE_MASK,
            x86.VMX_AR_TYPE_EXPAND_DOWN_MASK, x86.VMX_AR_TYPE_CONFORMING_MASK, x86.VMX_AR_TYPE_CODE_MASK) == (
        1, 2, 2, 4, 4, 8)
    # System types (SDM Table 3-2).
    assert (x86.SYS_TYPE_TSS16_AVAIL, x86.SYS_TYPE_LDT, x86.SYS_TYPE_TSS16_BUSY, x86.SYS_TYPE_TSS_AVAIL,
            x86.SYS_TYPE_TSS_BUSY, x86.SYS_TYPE_CALL_GATE, x86.SYS_TYPE_INTR_GATE, x86.SYS_TYPE_TRAP_GATE) == (
        1, 2, 3, 9, 11, 12, 14, 15)
    assert x86.VMX_AR_TYPE_BUSY_64_TSS == x86.SYS_TYPE_TSS_BUSY
    assert x86.VMX_AR_TYPE_BUSY_16_TSS == x86.SYS_TYPE_TSS16_BUSY
    assert x86.VMX_AR_TYPE_LDT == x86.SYS_TYPE_LDT


def test_debug_registers_match_linux() -> None:
    assert x86.DR6_FIXED_1 == 0xFFFE07F0
    assert x86.DR6_ACTIVE_LOW == 0xFFFF0FF0
    assert (x86.DR6_BD, x86.DR6_BS, x86.DR6_BT, x86.DR6_RTM) == (1 << 13, 1 << 14, 1 << 15, 1 << 16)
    assert x86.DR7_FIXED_1 == 0x400 and x86.DR7_GD == 1 << 13


def test_apic_register_offsets() -> None:
    assert (int(x86.ApicRegister.TASKPRI), int(x86.ApicRegister.EOI), int(x86.ApicRegister.ICR)) == (0x80, 0xB0, 0x300)
    assert 0x800 + (x86.ApicRegister.TASKPRI >> 4) == 0x808  # x2APIC TPR MSR
    assert all(int(r) % 0x10 == 0 for r in x86.ApicRegister)


# --- Exit qualifications ------------------------------------------------------------------------


def _disjoint(*masks: int) -> bool:
    return all(a & b == 0 for i, a in enumerate(masks) for b in masks[i + 1:])


def test_cr_access_layout() -> None:
    assert _disjoint(q.CR_ACCESS_NUM_MASK, q.CR_ACCESS_TYPE_MASK, q.CR_ACCESS_LMSW_MEMORY, q.CR_ACCESS_REG_MASK,
                     q.LMSW_SOURCE_DATA)
    # MOV to CR8 from R9: CR 8, type 0, register 9.
    qual = 8 | q.CR_ACCESS_TYPE_MOV_TO_CR << q.CR_ACCESS_TYPE_SHIFT | 9 << q.CR_ACCESS_REG_SHIFT
    assert qual == 0x908
    lmsw = q.CR_ACCESS_TYPE_LMSW << q.CR_ACCESS_TYPE_SHIFT | 0x1234 << q.LMSW_SOURCE_DATA_SHIFT
    assert lmsw == 0x1234_0030
    assert (q.CONTROL_REG_ACCESS_TYPE, q.CONTROL_REG_ACCESS_REG) == (0x30, 0xF00)  # Linux


def test_mov_dr_layout() -> None:
    assert _disjoint(q.DR_ACCESS_NUM_MASK, q.DR_ACCESS_FROM_DR, q.DR_ACCESS_REG_MASK)
    assert q.TYPE_MOV_FROM_DR == q.DR_ACCESS_FROM_DR == 0x10


def test_io_layout() -> None:
    assert _disjoint(q.IO_QUAL_SIZE_MASK, q.IO_QUAL_IN, q.IO_QUAL_STRING, q.IO_QUAL_REP, q.IO_QUAL_IMMEDIATE,
                     q.IO_QUAL_PORT_MASK)
    # "in al, 0x60": 1 byte, IN, immediate operand, port 0x60.
    assert 0 | q.IO_QUAL_IN | q.IO_QUAL_IMMEDIATE | 0x60 << q.IO_QUAL_PORT_SHIFT == 0x0060_0048


def test_ept_violation_bits() -> None:
    bits = [q.EPT_VIOLATION_ACC_READ, q.EPT_VIOLATION_ACC_WRITE, q.EPT_VIOLATION_ACC_INSTR,
            q.EPT_VIOLATION_PROT_READ, q.EPT_VIOLATION_PROT_WRITE, q.EPT_VIOLATION_PROT_EXEC,
            q.EPT_VIOLATION_PROT_USER_EXEC, q.EPT_VIOLATION_GVA_IS_VALID, q.EPT_VIOLATION_GVA_TRANSLATED,
            q.EPT_VIOLATION_GVA_USER, q.EPT_VIOLATION_GVA_WRITABLE, q.EPT_VIOLATION_GVA_NX,
            q.EPT_VIOLATION_NMI_UNBLOCKING, q.EPT_VIOLATION_SHADOW_STACK,
            q.EPT_VIOLATION_SUPERVISOR_SHADOW_STACK, q.EPT_VIOLATION_GUEST_PAGING_VERIFY, q.EPT_VIOLATION_ASYNC]
    assert bits == [1 << i for i in range(17)]
    assert q.EPT_VIOLATION_PROT_MASK == 0x7 << q.EPT_VIOLATION_RWX_SHIFT


def test_debug_and_task_switch_layouts() -> None:
    assert (q.DEBUG_QUAL_B0_B3_MASK, q.DEBUG_QUAL_BD, q.DEBUG_QUAL_BS, q.DEBUG_QUAL_RTM) == (
        0xF, 1 << 13, 1 << 14, 1 << 16)
    assert q.TASK_SWITCH_GATE << q.TASK_SWITCH_SOURCE_SHIFT == q.TASK_SWITCH_SOURCE_MASK
    assert (q.TASK_SWITCH_CALL, q.TASK_SWITCH_IRET, q.TASK_SWITCH_JMP, q.TASK_SWITCH_GATE) == (0, 1, 2, 3)


def test_entry_failure_qualifications() -> None:
    assert (q.ENTRY_FAIL_DEFAULT, q.ENTRY_FAIL_PDPTE, q.ENTRY_FAIL_NMI, q.ENTRY_FAIL_VMCS_LINK_PTR) == (0, 2, 3, 4)


def test_instruction_information_layouts() -> None:
    # INS/OUTS: address size 9:7 and segment 17:15 only.
    assert q.INSN_INFO_LAYOUT_INS_OUTS == 0x380 | 0x38000
    # Descriptor-table instructions (GDTR/IDTR): scaling 1:0, address size 9:7, operand size 11,
    # segment 17:15, index 21:18 + invalid 22, base 26:23 + invalid 27, identity 29:28.
    assert q.INSN_INFO_LAYOUT_GDTR_IDTR == 0x3 | 0x380 | 0x800 | 0x38000 | 0x3C0000 | 0x400000 | 0x7800000 \
        | 0x8000000 | 0x30000000
    # RDRAND/RDSEED: destination register 6:3, operand size 12:11.
    assert q.INSN_INFO_LAYOUT_RDRAND_RDSEED == 0x78 | 0x1800
    # VMREAD/VMWRITE also use reg1 6:3, the mem/reg bit 10 and reg2 31:28.
    assert q.INSN_INFO_LAYOUT_VMREAD_VMWRITE & ~q.INSN_INFO_LAYOUT_VMX_MEMORY == 0x78 | 0x400 | 0xF0000000
    assert q.INSN_INFO_LAYOUT_INVEPT_INVPCID_INVVPID & ~q.INSN_INFO_LAYOUT_VMX_MEMORY == 0xF0000000
    assert (q.GDTR_IDTR_SGDT, q.GDTR_IDTR_SIDT, q.GDTR_IDTR_LGDT, q.GDTR_IDTR_LIDT) == (0, 1, 2, 3)
    assert (q.LDTR_TR_SLDT, q.LDTR_TR_STR, q.LDTR_TR_LLDT, q.LDTR_TR_LTR) == (0, 1, 2, 3)
