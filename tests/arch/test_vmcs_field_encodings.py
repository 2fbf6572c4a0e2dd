"""VMCS field encodings (SDM Appendix B): width and type derived from the encoding bits must
match the appendix's grouping, which is written out here independently of the enum."""

from __future__ import annotations

import pytest

from pyvmx.arch.vmcs_fields import (
    VmcsAccessType,
    VmcsField,
    VmcsFieldType,
    VmcsWidth,
    encoding_access_type,
    encoding_reserved_bits_set,
    field_area,
    high_encoding,
)

W16, W32, W64, WN = VmcsWidth.BITS16, VmcsWidth.BITS32, VmcsWidth.BITS64, VmcsWidth.NATURAL
CTL, RO, GUEST, HOST = (
    VmcsFieldType.CONTROL,
    VmcsFieldType.VM_EXIT_INFORMATION,
    VmcsFieldType.GUEST_STATE,
    VmcsFieldType.HOST_STATE,
)

# (SDM appendix section, width, type, field names in that section)
APPENDIX_B = [
    ("B.1.1", W16, CTL, ["VIRTUAL_PROCESSOR_ID", "POSTED_INTR_NV", "EPTP_INDEX"]),
    ("B.1.2", W16, GUEST, ["GUEST_ES_SELECTOR", "GUEST_CS_SELECTOR", "GUEST_SS_SELECTOR", "GUEST_DS_SELECTOR",
                           "GUEST_FS_SELECTOR", "GUEST_GS_SELECTOR", "GUEST_LDTR_SELECTOR", "GUEST_TR_SELECTOR",
                           "GUEST_INTR_STATUS", "GUEST_PML_INDEX"]),
    ("B.1.3", W16, HOST, ["HOST_ES_SELECTOR", "HOST_CS_SELECTOR", "HOST_SS_SELECTOR", "HOST_DS_SELECTOR",
                          "HOST_FS_SELECTOR", "HOST_GS_SELECTOR", "HOST_TR_SELECTOR"]),
    ("B.2.1", W64, CTL, ["IO_BITMAP_A", "IO_BITMAP_B", "MSR_BITMAP", "VM_EXIT_MSR_STORE_ADDR", "VM_EXIT_MSR_LOAD_ADDR",
                         "VM_ENTRY_MSR_LOAD_ADDR", "PML_ADDRESS", "TSC_OFFSET", "VIRTUAL_APIC_PAGE_ADDR",
                         "APIC_ACCESS_ADDR", "POSTED_INTR_DESC_ADDR", "VM_FUNCTION_CONTROL", "EPT_POINTER",
                         "EOI_EXIT_BITMAP0", "EOI_EXIT_BITMAP3", "EPTP_LIST_ADDRESS", "VMREAD_BITMAP",
                         "VMWRITE_BITMAP", "XSS_EXIT_BITMAP", "ENCLS_EXITING_BITMAP", "TSC_MULTIPLIER",
                         "TERTIARY_VM_EXEC_CONTROL"]),
    ("B.2.2", W64, RO, ["GUEST_PHYSICAL_ADDRESS"]),
    ("B.2.3", W64, GUEST, ["VMCS_LINK_POINTER", "GUEST_IA32_DEBUGCTL", "GUEST_IA32_PAT", "GUEST_IA32_EFER",
                           "GUEST_IA32_PERF_GLOBAL_CTRL", "GUEST_PDPTR0", "GUEST_PDPTR1", "GUEST_PDPTR2",
                           "GUEST_PDPTR3", "GUEST_BNDCFGS", "GUEST_IA32_RTIT_CTL"]),
    ("B.2.4", W64, HOST, ["HOST_IA32_PAT", "HOST_IA32_EFER", "HOST_IA32_PERF_GLOBAL_CTRL"]),
    ("B.3.1", W32, CTL, ["PIN_BASED_VM_EXEC_CONTROL", "CPU_BASED_VM_EXEC_CONTROL", "EXCEPTION_BITMAP",
                         "PAGE_FAULT_ERROR_CODE_MASK", "PAGE_FAULT_ERROR_CODE_MATCH", "CR3_TARGET_COUNT",
                         "VM_EXIT_CONTROLS", "VM_EXIT_MSR_STORE_COUNT", "VM_EXIT_MSR_LOAD_COUNT",
                         "VM_ENTRY_CONTROLS", "VM_ENTRY_MSR_LOAD_COUNT", "VM_ENTRY_INTR_INFO_FIELD",
                         "VM_ENTRY_EXCEPTION_ERROR_CODE", "VM_ENTRY_INSTRUCTION_LEN", "TPR_THRESHOLD",
                         "SECONDARY_VM_EXEC_CONTROL", "PLE_GAP", "PLE_WINDOW"]),
    ("B.3.2", W32, RO, ["VM_INSTRUCTION_ERROR", "VM_EXIT_REASON", "VM_EXIT_INTR_INFO", "VM_EXIT_INTR_ERROR_CODE",
                        "IDT_VECTORING_INFO_FIELD", "IDT_VECTORING_ERROR_CODE", "VM_EXIT_INSTRUCTION_LEN",
                        "VMX_INSTRUCTION_INFO"]),
    ("B.3.3", W32, GUEST, ["GUEST_ES_LIMIT", "GUEST_TR_LIMIT", "GUEST_GDTR_LIMIT", "GUEST_IDTR_LIMIT",
                           "GUEST_ES_AR_BYTES", "GUEST_TR_AR_BYTES", "GUEST_INTERRUPTIBILITY_INFO",
                           "GUEST_ACTIVITY_STATE", "GUEST_SMBASE", "GUEST_SYSENTER_CS",
                           "VMX_PREEMPTION_TIMER_VALUE"]),
    ("B.3.4", W32, HOST, ["HOST_IA32_SYSENTER_CS"]),
    ("B.4.1", WN, CTL, ["CR0_GUEST_HOST_MASK", "CR4_GUEST_HOST_MASK", "CR0_READ_SHADOW", "CR4_READ_SHADOW",
                        "CR3_TARGET_VALUE0", "CR3_TARGET_VALUE1", "CR3_TARGET_VALUE2", "CR3_TARGET_VALUE3"]),
    ("B.4.2", WN, RO, ["EXIT_QUALIFICATION", "EXIT_IO_RCX", "EXIT_IO_RSI", "EXIT_IO_RDI", "EXIT_IO_RIP",
                       "GUEST_LINEAR_ADDRESS"]),
    ("B.4.3", WN, GUEST, ["GUEST_CR0", "GUEST_CR3", "GUEST_CR4", "GUEST_ES_BASE", "GUEST_TR_BASE",
                          "GUEST_GDTR_BASE", "GUEST_IDTR_BASE", "GUEST_DR7", "GUEST_RSP", "GUEST_RIP",
                          "GUEST_RFLAGS", "GUEST_PENDING_DBG_EXCEPTIONS", "GUEST_SYSENTER_ESP",
                          "GUEST_SYSENTER_EIP", "GUEST_S_CET", "GUEST_SSP", "GUEST_INTR_SSP_TABLE"]),
    ("B.4.4", WN, HOST, ["HOST_CR0", "HOST_CR3", "HOST_CR4", "HOST_FS_BASE", "HOST_GS_BASE", "HOST_TR_BASE",
                         "HOST_GDTR_BASE", "HOST_IDTR_BASE", "HOST_IA32_SYSENTER_ESP", "HOST_IA32_SYSENTER_EIP",
                         "HOST_RSP", "HOST_RIP"]),
]
CASES = [(section, name, width, ftype) for section, width, ftype, names in APPENDIX_B for name in names]


@pytest.mark.parametrize("section, name, width, ftype", CASES)
def test_appendix_b_width_and_type_from_encoding(section: str, name: str, width: VmcsWidth, ftype: VmcsFieldType) -> None:
    field = VmcsField[name]
    assert field.width is width, f"{name} is in SDM {section}"
    assert field.type is ftype, f"{name} is in SDM {section}"


# Anchors from Linux's asm/vmx.h and the seeds.
@pytest.mark.parametrize(
    "name, encoding",
    [
        ("PAGE_FAULT_ERROR_CODE_MASK", 0x4006),
        ("PAGE_FAULT_ERROR_CODE_MATCH", 0x4008),
        ("MSR_BITMAP", 0x2004),
        ("CPU_BASED_VM_EXEC_CONTROL", 0x4002),
        ("VMX_PREEMPTION_TIMER_VALUE", 0x482E),
        ("GUEST_RIP", 0x681E),
        ("HOST_RIP", 0x6C16),
        ("EXIT_QUALIFICATION", 0x6400),
        ("GUEST_PHYSICAL_ADDRESS", 0x2400),
        ("EPT_POINTER", 0x201A),
        ("GUEST_ACTIVITY_STATE", 0x4826),
        ("SECONDARY_VM_EXEC_CONTROL", 0x401E),
    ],
)
def test_linux_encodings(name: str, encoding: int) -> None:
    assert VmcsField[name] == encoding


def test_every_field_is_a_full_access_encoding_without_reserved_bits() -> None:
    for field in VmcsField:
        assert encoding_access_type(field) is VmcsAccessType.FULL, field.name
        assert not encoding_reserved_bits_set(field), field.name


def test_no_duplicate_encodings() -> None:
    values = [int(f) for f in VmcsField]
    assert len(values) == len(set(values))


def test_high_encoding_of_64_bit_field() -> None:
    assert high_encoding(VmcsField.MSR_BITMAP) == 0x2005  # Linux MSR_BITMAP_HIGH
    assert high_encoding(VmcsField.EPT_POINTER) == 0x201B
    with pytest.raises(ValueError):
        high_encoding(VmcsField.PAGE_FAULT_ERROR_CODE_MASK)


def test_read_only_fields_are_the_exit_information_type() -> None:
    assert VmcsField.VM_EXIT_REASON.is_read_only
    assert not VmcsField.GUEST_RIP.is_read_only


def test_field_areas_follow_sdm_grouping() -> None:
    assert field_area(VmcsField.VM_EXIT_CONTROLS) == "VM-exit control fields"
    assert field_area(VmcsField.VM_ENTRY_INTR_INFO_FIELD) == "VM-entry control fields"
    assert field_area(VmcsField.EXCEPTION_BITMAP) == "VM-execution control fields"
    assert field_area(VmcsField.GUEST_CR0) == "Guest-state area"
    assert field_area(VmcsField.HOST_CR0) == "Host-state area"
    assert field_area(VmcsField.EXIT_QUALIFICATION) == "VM-exit information fields"
