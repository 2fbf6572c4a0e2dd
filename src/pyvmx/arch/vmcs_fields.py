"""VMCS component encodings (SDM Vol. 3 Appendix B "Field Encoding in VMCS") with the names of
Linux's ``enum vmcs_field`` (arch/x86/include/asm/vmx.h).

The width, type and access type of a field are not stored: they are *derived* from the encoding
bits exactly as SDM 25.11.2 "VMREAD, VMWRITE, and Encodings of VMCS Fields"
defines them:

* bit 0      access type (0 = full, 1 = high: bits 63:32 of a 64-bit field)
* bits 9:1   index
* bits 11:10 type (0 control, 1 VM-exit information, 2 guest state, 3 host state)
* bit 12     reserved (must be 0)
* bits 14:13 width (0 16-bit, 1 64-bit, 2 32-bit, 3 natural width)
* bits 31:15 reserved (must be 0)

Linux's ``*_HIGH`` names are the high-access encodings of 64-bit fields, not fields of their own,
so they are not members here: see :func:`high_encoding`.

Fields that Linux's ``enum vmcs_field`` does not (or did not, at the time of writing) name are
marked "not in Linux" and are named in Linux's style after the SDM's wording.
"""

from __future__ import annotations

from enum import IntEnum


class VmcsWidth(IntEnum):
    """Encoding bits 14:13 (SDM 25.11.2)."""

    BITS16 = 0
    BITS64 = 1
    BITS32 = 2
    NATURAL = 3


class VmcsFieldType(IntEnum):
    """Encoding bits 11:10 (type 1 is the SDM's "VM-exit information", a.k.a. read-only data)."""

    CONTROL = 0
    VM_EXIT_INFORMATION = 1
    GUEST_STATE = 2
    HOST_STATE = 3


class VmcsAccessType(IntEnum):
    """Encoding bit 0: full access, or high access to bits 63:32 of a 64-bit field."""

    FULL = 0
    HIGH = 1


VMCS_ENCODING_WIDTH_SHIFT = 13
VMCS_ENCODING_TYPE_SHIFT = 10
VMCS_ENCODING_INDEX_SHIFT = 1
VMCS_ENCODING_INDEX_MASK = 0x1FF
# Bit 12 and bits 31:15 (SDM 25.11.2); also bochs cpu/vmx.h VMCS_ENCODING_RESERVED_BITS.
VMCS_ENCODING_RESERVED_BITS = 0xFFFF9000


def encoding_width(encoding: int) -> VmcsWidth:
    """The width (bits 14:13) of any 32-bit encoding, valid or not."""
    return VmcsWidth((encoding >> VMCS_ENCODING_WIDTH_SHIFT) & 3)


def encoding_type(encoding: int) -> VmcsFieldType:
    """The field type (bits 11:10) of any 32-bit encoding."""
    return VmcsFieldType((encoding >> VMCS_ENCODING_TYPE_SHIFT) & 3)


def encoding_access_type(encoding: int) -> VmcsAccessType:
    """The access type (bit 0) of any 32-bit encoding."""
    return VmcsAccessType(encoding & 1)


def encoding_index(encoding: int) -> int:
    """The index (bits 9:1) of any 32-bit encoding."""
    return (encoding >> VMCS_ENCODING_INDEX_SHIFT) & VMCS_ENCODING_INDEX_MASK


def encoding_reserved_bits_set(encoding: int) -> bool:
    """True if bit 12 or any of bits 31:15 is set (SDM 25.11.2: they must be 0).

    Bits above 31 also count: an encoding is a 32-bit quantity (VMREAD/VMWRITE fail on a register
    operand with bits 63:32 set in 64-bit mode).
    """
    return bool(encoding & VMCS_ENCODING_RESERVED_BITS) or encoding >> 32 != 0


def width_bits(width: VmcsWidth) -> int | None:
    """16, 32 or 64 bits; None for natural width (the processor's word size)."""
    return _WIDTH_BITS[width]


_WIDTH_BITS: dict[VmcsWidth, int | None] = {
    VmcsWidth.BITS16: 16,
    VmcsWidth.BITS32: 32,
    VmcsWidth.BITS64: 64,
    VmcsWidth.NATURAL: None,
}


class VmcsField(IntEnum):
    """Every VMCS component of SDM Appendix B by its full-access encoding, ordered by encoding."""

    # B.1.1 16-bit control fields
    VIRTUAL_PROCESSOR_ID = 0x0000
    POSTED_INTR_NV = 0x0002
    EPTP_INDEX = 0x0004  # not in Linux
    HLAT_PREFIX_SIZE = 0x0006  # not in Linux
    LAST_PID_POINTER_INDEX = 0x0008
    # B.1.2 16-bit guest-state fields
    GUEST_ES_SELECTOR = 0x0800
    GUEST_CS_SELECTOR = 0x0802
    GUEST_SS_SELECTOR = 0x0804
    GUEST_DS_SELECTOR = 0x0806
    GUEST_FS_SELECTOR = 0x0808
    GUEST_GS_SELECTOR = 0x080A
    GUEST_LDTR_SELECTOR = 0x080C
    GUEST_TR_SELECTOR = 0x080E
    GUEST_INTR_STATUS = 0x0810
    GUEST_PML_INDEX = 0x0812
    GUEST_UINV = 0x0814  # not in Linux (user-interrupt notification vector)
    # B.1.3 16-bit host-state fields
    HOST_ES_SELECTOR = 0x0C00
    HOST_CS_SELECTOR = 0x0C02
    HOST_SS_SELECTOR = 0x0C04
    HOST_DS_SELECTOR = 0x0C06
    HOST_FS_SELECTOR = 0x0C08
    HOST_GS_SELECTOR = 0x0C0A
    HOST_TR_SELECTOR = 0x0C0C
    # B.2.1 64-bit control fields
    IO_BITMAP_A = 0x2000
    IO_BITMAP_B = 0x2002
    MSR_BITMAP = 0x2004
    VM_EXIT_MSR_STORE_ADDR = 0x2006
    VM_EXIT_MSR_LOAD_ADDR = 0x2008
    VM_ENTRY_MSR_LOAD_ADDR = 0x200A
    EXECUTIVE_VMCS_POINTER = 0x200C  # not in Linux
    PML_ADDRESS = 0x200E
    TSC_OFFSET = 0x2010
    VIRTUAL_APIC_PAGE_ADDR = 0x2012
    APIC_ACCESS_ADDR = 0x2014
    POSTED_INTR_DESC_ADDR = 0x2016
    VM_FUNCTION_CONTROL = 0x2018
    EPT_POINTER = 0x201A
    EOI_EXIT_BITMAP0 = 0x201C
    EOI_EXIT_BITMAP1 = 0x201E
    EOI_EXIT_BITMAP2 = 0x2020
    EOI_EXIT_BITMAP3 = 0x2022
    EPTP_LIST_ADDRESS = 0x2024
    VMREAD_BITMAP = 0x2026
    VMWRITE_BITMAP = 0x2028
    VE_INFORMATION_ADDRESS = 0x202A
    XSS_EXIT_BITMAP = 0x202C
    ENCLS_EXITING_BITMAP = 0x202E
    SPP_TABLE_POINTER = 0x2030  # not in Linux (sub-page-permission-table pointer)
    TSC_MULTIPLIER = 0x2032
    TERTIARY_VM_EXEC_CONTROL = 0x2034
    ENCLV_EXITING_BITMAP = 0x2036  # not in Linux
    LOW_PASID_DIRECTORY_ADDRESS = 0x2038  # not in Linux
    HIGH_PASID_DIRECTORY_ADDRESS = 0x203A  # not in Linux
    SHARED_EPT_POINTER = 0x203C  # TDX (SDM "shared-EPTP")
    PCONFIG_EXITING_BITMAP = 0x203E  # not in Linux
    HLAT_POINTER = 0x2040  # not in Linux (hypervisor-managed linear-address translation)
    PID_POINTER_TABLE = 0x2042
    SECONDARY_VM_EXIT_CONTROLS = 0x2044
    IA32_SPEC_CTRL_MASK = 0x204A  # not in Linux
    IA32_SPEC_CTRL_SHADOW = 0x204C  # not in Linux
    INJECTED_EVENT_DATA = 0x2052  # FRED; Linux FRED series, newer SDMs than Dec 2023
    # B.2.2 64-bit read-only data fields
    GUEST_PHYSICAL_ADDRESS = 0x2400
    ORIGINAL_EVENT_DATA = 0x2404  # FRED; Linux FRED series, newer SDMs than Dec 2023
    # B.2.3 64-bit guest-state fields
    VMCS_LINK_POINTER = 0x2800
    GUEST_IA32_DEBUGCTL = 0x2802
    GUEST_IA32_PAT = 0x2804
    GUEST_IA32_EFER = 0x2806
    GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808
    GUEST_PDPTR0 = 0x280A
    GUEST_PDPTR1 = 0x280C
    GUEST_PDPTR2 = 0x280E
    GUEST_PDPTR3 = 0x2810
    GUEST_BNDCFGS = 0x2812
    GUEST_IA32_RTIT_CTL = 0x2814
    GUEST_IA32_LBR_CTL = 0x2816  # Linux arch-LBR series only
    GUEST_IA32_PKRS = 0x2818  # Linux PKS series only
    GUEST_IA32_FRED_CONFIG = 0x281A  # FRED fields: Linux FRED series, newer SDMs
    GUEST_IA32_FRED_RSP1 = 0x281C
    GUEST_IA32_FRED_RSP2 = 0x281E
    GUEST_IA32_FRED_RSP3 = 0x2820
    GUEST_IA32_FRED_STKLVLS = 0x2822
    GUEST_IA32_FRED_SSP1 = 0x2824
    GUEST_IA32_FRED_SSP2 = 0x2826
    GUEST_IA32_FRED_SSP3 = 0x2828
    # B.2.4 64-bit host-state fields
    HOST_IA32_PAT = 0x2C00
    HOST_IA32_EFER = 0x2C02
    HOST_IA32_PERF_GLOBAL_CTRL = 0x2C04
    HOST_IA32_PKRS = 0x2C06  # Linux PKS series only
    HOST_IA32_FRED_CONFIG = 0x2C08  # FRED fields: Linux FRED series, newer SDMs
    HOST_IA32_FRED_RSP1 = 0x2C0A
    HOST_IA32_FRED_RSP2 = 0x2C0C
    HOST_IA32_FRED_RSP3 = 0x2C0E
    HOST_IA32_FRED_STKLVLS = 0x2C10
    HOST_IA32_FRED_SSP1 = 0x2C12
    HOST_IA32_FRED_SSP2 = 0x2C14
    HOST_IA32_FRED_SSP3 = 0x2C16
    # B.3.1 32-bit control fields
    PIN_BASED_VM_EXEC_CONTROL = 0x4000
    CPU_BASED_VM_EXEC_CONTROL = 0x4002
    EXCEPTION_BITMAP = 0x4004
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008
    CR3_TARGET_COUNT = 0x400A
    VM_EXIT_CONTROLS = 0x400C
    VM_EXIT_MSR_STORE_COUNT = 0x400E
    VM_EXIT_MSR_LOAD_COUNT = 0x4010
    VM_ENTRY_CONTROLS = 0x4012
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014
    VM_ENTRY_INTR_INFO_FIELD = 0x4016
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
    VM_ENTRY_INSTRUCTION_LEN = 0x401A
    TPR_THRESHOLD = 0x401C
    SECONDARY_VM_EXEC_CONTROL = 0x401E
    PLE_GAP = 0x4020
    PLE_WINDOW = 0x4022
    NOTIFY_WINDOW = 0x4024  # SDM "instruction-timeout control"
    # B.3.2 32-bit read-only data fields
    VM_INSTRUCTION_ERROR = 0x4400
    VM_EXIT_REASON = 0x4402
    VM_EXIT_INTR_INFO = 0x4404
    VM_EXIT_INTR_ERROR_CODE = 0x4406
    IDT_VECTORING_INFO_FIELD = 0x4408
    IDT_VECTORING_ERROR_CODE = 0x440A
    VM_EXIT_INSTRUCTION_LEN = 0x440C
    VMX_INSTRUCTION_INFO = 0x440E
    # B.3.3 32-bit guest-state fields
    GUEST_ES_LIMIT = 0x4800
    GUEST_CS_LIMIT = 0x4802
    GUEST_SS_LIMIT = 0x4804
    GUEST_DS_LIMIT = 0x4806
    GUEST_FS_LIMIT = 0x4808
    GUEST_GS_LIMIT = 0x480A
    GUEST_LDTR_LIMIT = 0x480C
    GUEST_TR_LIMIT = 0x480E
    GUEST_GDTR_LIMIT = 0x4810
    GUEST_IDTR_LIMIT = 0x4812
    GUEST_ES_AR_BYTES = 0x4814
    GUEST_CS_AR_BYTES = 0x4816
    GUEST_SS_AR_BYTES = 0x4818
    GUEST_DS_AR_BYTES = 0x481A
    GUEST_FS_AR_BYTES = 0x481C
    GUEST_GS_AR_BYTES = 0x481E
    GUEST_LDTR_AR_BYTES = 0x4820
    GUEST_TR_AR_BYTES = 0x4822
    GUEST_INTERRUPTIBILITY_INFO = 0x4824
    GUEST_ACTIVITY_STATE = 0x4826
    GUEST_SMBASE = 0x4828  # not in Linux
    GUEST_SYSENTER_CS = 0x482A
    VMX_PREEMPTION_TIMER_VALUE = 0x482E
    # B.3.4 32-bit host-state field
    HOST_IA32_SYSENTER_CS = 0x4C00
    # B.4.1 natural-width control fields
    CR0_GUEST_HOST_MASK = 0x6000
    CR4_GUEST_HOST_MASK = 0x6002
    CR0_READ_SHADOW = 0x6004
    CR4_READ_SHADOW = 0x6006
    CR3_TARGET_VALUE0 = 0x6008
    CR3_TARGET_VALUE1 = 0x600A
    CR3_TARGET_VALUE2 = 0x600C
    CR3_TARGET_VALUE3 = 0x600E
    # B.4.2 natural-width read-only data fields
    EXIT_QUALIFICATION = 0x6400
    EXIT_IO_RCX = 0x6402  # not in Linux (SDM "I/O RCX"); likewise RSI, RDI, RIP
    EXIT_IO_RSI = 0x6404
    EXIT_IO_RDI = 0x6406
    EXIT_IO_RIP = 0x6408
    GUEST_LINEAR_ADDRESS = 0x640A
    # B.4.3 natural-width guest-state fields
    GUEST_CR0 = 0x6800
    GUEST_CR3 = 0x6802
    GUEST_CR4 = 0x6804
    GUEST_ES_BASE = 0x6806
    GUEST_CS_BASE = 0x6808
    GUEST_SS_BASE = 0x680A
    GUEST_DS_BASE = 0x680C
    GUEST_FS_BASE = 0x680E
    GUEST_GS_BASE = 0x6810
    GUEST_LDTR_BASE = 0x6812
    GUEST_TR_BASE = 0x6814
    GUEST_GDTR_BASE = 0x6816
    GUEST_IDTR_BASE = 0x6818
    GUEST_DR7 = 0x681A
    GUEST_RSP = 0x681C
    GUEST_RIP = 0x681E
    GUEST_RFLAGS = 0x6820
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822
    GUEST_SYSENTER_ESP = 0x6824
    GUEST_SYSENTER_EIP = 0x6826
    GUEST_S_CET = 0x6828  # CET fields: recent Linux (KVM CET virtualization)
    GUEST_SSP = 0x682A
    GUEST_INTR_SSP_TABLE = 0x682C
    # B.4.4 natural-width host-state fields
    HOST_CR0 = 0x6C00
    HOST_CR3 = 0x6C02
    HOST_CR4 = 0x6C04
    HOST_FS_BASE = 0x6C06
    HOST_GS_BASE = 0x6C08
    HOST_TR_BASE = 0x6C0A
    HOST_GDTR_BASE = 0x6C0C
    HOST_IDTR_BASE = 0x6C0E
    HOST_IA32_SYSENTER_ESP = 0x6C10
    HOST_IA32_SYSENTER_EIP = 0x6C12
    HOST_RSP = 0x6C14
    HOST_RIP = 0x6C16
    HOST_S_CET = 0x6C18  # CET fields: recent Linux (KVM CET virtualization)
    HOST_SSP = 0x6C1A
    HOST_INTR_SSP_TABLE = 0x6C1C

    @property
    def width(self) -> VmcsWidth:
        """Width from encoding bits 14:13."""
        return encoding_width(self.value)

    @property
    def type(self) -> VmcsFieldType:
        """Field type from encoding bits 11:10."""
        return encoding_type(self.value)

    @property
    def index(self) -> int:
        """Index from encoding bits 9:1 (what IA32_VMX_VMCS_ENUM reports the maximum of)."""
        return encoding_index(self.value)

    @property
    def bits(self) -> int | None:
        """16, 32 or 64; None for natural width."""
        return width_bits(self.width)

    @property
    def is_read_only(self) -> bool:
        """A VM-exit information field (VMWRITE fails with error 13 unless IA32_VMX_MISC[29])."""
        return self.type is VmcsFieldType.VM_EXIT_INFORMATION


def high_encoding(field: VmcsField) -> int:
    """The high-access encoding (Linux ``<FIELD>_HIGH``) of a 64-bit field: bits 63:32."""
    if field.width is not VmcsWidth.BITS64:
        raise ValueError(f"{field.name} is not a 64-bit field; it has no high access")
    return int(field) | 1


# --- The VMCS area of each field (SDM 25.3-25.9), as a VMCS dump groups them --------------------
GUEST_STATE_AREA = "Guest-state area"
HOST_STATE_AREA = "Host-state area"
EXECUTION_CONTROLS = "VM-execution control fields"
EXIT_CONTROLS = "VM-exit control fields"
ENTRY_CONTROLS = "VM-entry control fields"
EXIT_INFORMATION = "VM-exit information fields"

VMCS_AREAS: tuple[str, ...] = (
    GUEST_STATE_AREA,
    HOST_STATE_AREA,
    EXECUTION_CONTROLS,
    EXIT_CONTROLS,
    ENTRY_CONTROLS,
    EXIT_INFORMATION,
)

# The field type decides the area, except that control fields are split three ways (SDM 25.6
# execution, 25.7 exit, 25.8 entry controls).  Every control field not listed below is a
# VM-execution control field.
_AREA_BY_TYPE: dict[VmcsFieldType, str] = {
    VmcsFieldType.CONTROL: EXECUTION_CONTROLS,
    VmcsFieldType.VM_EXIT_INFORMATION: EXIT_INFORMATION,
    VmcsFieldType.GUEST_STATE: GUEST_STATE_AREA,
    VmcsFieldType.HOST_STATE: HOST_STATE_AREA,
}

# SDM 25.7 "VM-Exit Control Fields".
_EXIT_CONTROL_FIELDS: frozenset[VmcsField] = frozenset({
    VmcsField.VM_EXIT_CONTROLS,
    VmcsField.SECONDARY_VM_EXIT_CONTROLS,
    VmcsField.VM_EXIT_MSR_STORE_COUNT,
    VmcsField.VM_EXIT_MSR_STORE_ADDR,
    VmcsField.VM_EXIT_MSR_LOAD_COUNT,
    VmcsField.VM_EXIT_MSR_LOAD_ADDR,
})

# SDM 25.8 "VM-Entry Control Fields" (including the event-injection fields of 25.8.3).
_ENTRY_CONTROL_FIELDS: frozenset[VmcsField] = frozenset({
    VmcsField.VM_ENTRY_CONTROLS,
    VmcsField.VM_ENTRY_MSR_LOAD_COUNT,
    VmcsField.VM_ENTRY_MSR_LOAD_ADDR,
    VmcsField.VM_ENTRY_INTR_INFO_FIELD,
    VmcsField.VM_ENTRY_EXCEPTION_ERROR_CODE,
    VmcsField.VM_ENTRY_INSTRUCTION_LEN,
    VmcsField.INJECTED_EVENT_DATA,
})


def _area_of(field: VmcsField) -> str:
    if field in _EXIT_CONTROL_FIELDS:
        return EXIT_CONTROLS
    if field in _ENTRY_CONTROL_FIELDS:
        return ENTRY_CONTROLS
    return _AREA_BY_TYPE[field.type]


# Every field's area, e.g. ``FIELD_GROUPS[VmcsField.VM_EXIT_CONTROLS] == "VM-exit control fields"``.
FIELD_GROUPS: dict[VmcsField, str] = {field: _area_of(field) for field in VmcsField}


def field_area(field: VmcsField) -> str:
    """The VMCS area of a field, as the SDM groups them and Linux's dump_vmcs() prints them."""
    return FIELD_GROUPS[field]
