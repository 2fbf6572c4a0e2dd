"""VMCS component encodings (SDM Appendix B) with the names of Linux's asm/vmx.h ``enum vmcs_field``.

The width, type and access type of a field are not stored: they are *derived* from the encoding
bits, as the SDM defines them (SDM 25.11.2 "VMREAD, VMWRITE, and Encodings of VMCS Fields"):
bit 0 access type (0 full, 1 high), bits 9:1 index, bits 11:10 type, bits 14:13 width; bit 12
and bits 31:15 are reserved.  Linux's ``*_HIGH`` names are the high-access encodings of 64-bit
fields, not fields of their own: see :func:`high_encoding`.
"""

from __future__ import annotations

from enum import IntEnum


class VmcsWidth(IntEnum):
    """Encoding bits 14:13."""

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
    """Encoding bit 0."""

    FULL = 0
    HIGH = 1


def encoding_width(encoding: int) -> VmcsWidth:
    return VmcsWidth((encoding >> 13) & 3)


def encoding_type(encoding: int) -> VmcsFieldType:
    return VmcsFieldType((encoding >> 10) & 3)


def encoding_access_type(encoding: int) -> VmcsAccessType:
    return VmcsAccessType(encoding & 1)


def encoding_index(encoding: int) -> int:
    return (encoding >> 1) & 0x1FF


def encoding_reserved_bits_set(encoding: int) -> bool:
    """Bit 12 and bits 31:15 of an encoding are reserved (must be 0)."""
    return bool(encoding & 0x1000) or bool(encoding >> 15)


def width_bits(width: VmcsWidth) -> int | None:
    """16, 32 or 64 bits; None for natural width (the processor's word size)."""
    return {VmcsWidth.BITS16: 16, VmcsWidth.BITS32: 32, VmcsWidth.BITS64: 64}.get(width)


class VmcsField(IntEnum):
    """Every VMCS component of SDM Appendix B, full-access encodings, ordered by encoding."""

    # B.1.1 16-bit control fields
    VIRTUAL_PROCESSOR_ID = 0x0000
    POSTED_INTR_NV = 0x0002
    EPTP_INDEX = 0x0004
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
    GUEST_UINV = 0x0814  # not in Linux
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
    VE_INFORMATION_ADDRESS = 0x202A  # not in Linux
    XSS_EXIT_BITMAP = 0x202C
    ENCLS_EXITING_BITMAP = 0x202E
    SPP_TABLE_POINTER = 0x2030  # not in Linux
    TSC_MULTIPLIER = 0x2032
    TERTIARY_VM_EXEC_CONTROL = 0x2034
    ENCLV_EXITING_BITMAP = 0x2036
    LOW_PASID_DIRECTORY_ADDRESS = 0x2038  # not in Linux
    HIGH_PASID_DIRECTORY_ADDRESS = 0x203A  # not in Linux
    SHARED_EPTP = 0x203C  # not in Linux
    PCONFIG_EXITING_BITMAP = 0x203E  # not in Linux
    HLAT_POINTER = 0x2040  # not in Linux
    PID_POINTER_TABLE = 0x2042
    SECONDARY_VM_EXIT_CONTROLS = 0x2044  # not in Linux
    IA32_SPEC_CTRL_MASK = 0x204A  # not in Linux
    IA32_SPEC_CTRL_SHADOW = 0x204C  # not in Linux
    # B.2.2 64-bit read-only data field
    GUEST_PHYSICAL_ADDRESS = 0x2400
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
    GUEST_IA32_LBR_CTL = 0x2816
    GUEST_IA32_PKRS = 0x2818
    # B.2.4 64-bit host-state fields
    HOST_IA32_PAT = 0x2C00
    HOST_IA32_EFER = 0x2C02
    HOST_IA32_PERF_GLOBAL_CTRL = 0x2C04
    HOST_IA32_PKRS = 0x2C06
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
    NOTIFY_WINDOW = 0x4024
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
    GUEST_SMBASE = 0x4828
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
    EXIT_IO_RCX = 0x6402
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
    GUEST_S_CET = 0x6828
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
    HOST_S_CET = 0x6C18
    HOST_SSP = 0x6C1A
    HOST_INTR_SSP_TABLE = 0x6C1C

    @property
    def width(self) -> VmcsWidth:
        return encoding_width(self.value)

    @property
    def type(self) -> VmcsFieldType:
        return encoding_type(self.value)

    @property
    def index(self) -> int:
        return encoding_index(self.value)

    @property
    def bits(self) -> int | None:
        return width_bits(self.width)

    @property
    def is_read_only(self) -> bool:
        return self.type is VmcsFieldType.VM_EXIT_INFORMATION


def high_encoding(field: VmcsField) -> int:
    """The high-access encoding (Linux ``<FIELD>_HIGH``) of a 64-bit field: bits 63:32."""
    if field.width is not VmcsWidth.BITS64:
        raise ValueError(f"{field.name} is not a 64-bit field; it has no high access")
    return int(field) | 1


# The area of the VMCS each field belongs to (SDM 25.3-25.9), for dumps.  Control fields are
# split by what they control; the rest follow from the field type.
GUEST_STATE_AREA = "Guest-state area"
HOST_STATE_AREA = "Host-state area"
EXECUTION_CONTROLS = "VM-execution control fields"
EXIT_CONTROLS = "VM-exit control fields"
ENTRY_CONTROLS = "VM-entry control fields"
EXIT_INFORMATION = "VM-exit information fields"

_EXIT_CONTROL_FIELDS = frozenset({
    VmcsField.VM_EXIT_MSR_STORE_ADDR, VmcsField.VM_EXIT_MSR_LOAD_ADDR, VmcsField.VM_EXIT_CONTROLS,
    VmcsField.VM_EXIT_MSR_STORE_COUNT, VmcsField.VM_EXIT_MSR_LOAD_COUNT, VmcsField.SECONDARY_VM_EXIT_CONTROLS,
})
_ENTRY_CONTROL_FIELDS = frozenset({
    VmcsField.VM_ENTRY_MSR_LOAD_ADDR, VmcsField.VM_ENTRY_CONTROLS, VmcsField.VM_ENTRY_MSR_LOAD_COUNT,
    VmcsField.VM_ENTRY_INTR_INFO_FIELD, VmcsField.VM_ENTRY_EXCEPTION_ERROR_CODE, VmcsField.VM_ENTRY_INSTRUCTION_LEN,
})


def field_area(field: VmcsField) -> str:
    """The VMCS area of a field, as the SDM groups them and Linux's dump_vmcs prints them."""
    if field.type is VmcsFieldType.GUEST_STATE:
        return GUEST_STATE_AREA
    if field.type is VmcsFieldType.HOST_STATE:
        return HOST_STATE_AREA
    if field.type is VmcsFieldType.VM_EXIT_INFORMATION:
        return EXIT_INFORMATION
    if field in _EXIT_CONTROL_FIELDS:
        return EXIT_CONTROLS
    if field in _ENTRY_CONTROL_FIELDS:
        return ENTRY_CONTROLS
    return EXECUTION_CONTROLS
