"""VMCS field encodings (SDM Appendix B).

The expectation table below is written out by hand, section by section, in the order of SDM
Appendix B (B.1.1 16-bit control fields ... B.4.4 natural-width host-state fields), with each
field's encoding.  The width and type of a section are stated once per section, so a wrong
encoding, a field filed under the wrong section or a field missing from either side fails.
"""

from __future__ import annotations

import pytest

from pyvmx.arch.vmcs_fields import (
    FIELD_GROUPS,
    VMCS_AREAS,
    VmcsAccessType,
    VmcsField,
    VmcsFieldType,
    VmcsWidth,
    encoding_access_type,
    encoding_index,
    encoding_reserved_bits_set,
    encoding_type,
    encoding_width,
    field_area,
    high_encoding,
    width_bits,
)

W16, W32, W64, WN = VmcsWidth.BITS16, VmcsWidth.BITS32, VmcsWidth.BITS64, VmcsWidth.NATURAL
CTL, RO, GUEST, HOST = (
    VmcsFieldType.CONTROL,
    VmcsFieldType.VM_EXIT_INFORMATION,
    VmcsFieldType.GUEST_STATE,
    VmcsFieldType.HOST_STATE,
)

# (SDM section, width, type, [(name, encoding), ...])
APPENDIX_B: list[tuple[str, VmcsWidth, VmcsFieldType, list[tuple[str, int]]]] = [
    ("B.1.1 16-bit control fields", W16, CTL, [
        ("VIRTUAL_PROCESSOR_ID", 0x0000),
        ("POSTED_INTR_NV", 0x0002),
        ("EPTP_INDEX", 0x0004),
        ("HLAT_PREFIX_SIZE", 0x0006),
        ("LAST_PID_POINTER_INDEX", 0x0008),
    ]),
    ("B.1.2 16-bit guest-state fields", W16, GUEST, [
        ("GUEST_ES_SELECTOR", 0x0800),
        ("GUEST_CS_SELECTOR", 0x0802),
        ("GUEST_SS_SELECTOR", 0x0804),
        ("GUEST_DS_SELECTOR", 0x0806),
        ("GUEST_FS_SELECTOR", 0x0808),
        ("GUEST_GS_SELECTOR", 0x080A),
        ("GUEST_LDTR_SELECTOR", 0x080C),
        ("GUEST_TR_SELECTOR", 0x080E),
        ("GUEST_INTR_STATUS", 0x0810),
        ("GUEST_PML_INDEX", 0x0812),
        ("GUEST_UINV", 0x0814),
    ]),
    ("B.1.3 16-bit host-state fields", W16, HOST, [
        ("HOST_ES_SELECTOR", 0x0C00),
        ("HOST_CS_SELECTOR", 0x0C02),
        ("HOST_SS_SELECTOR", 0x0C04),
        ("HOST_DS_SELECTOR", 0x0C06),
        ("HOST_FS_SELECTOR", 0x0C08),
        ("HOST_GS_SELECTOR", 0x0C0A),
        ("HOST_TR_SELECTOR", 0x0C0C),
    ]),
    ("B.2.1 64-bit control fields", W64, CTL, [
        ("IO_BITMAP_A", 0x2000),
        ("IO_BITMAP_B", 0x2002),
        ("MSR_BITMAP", 0x2004),
        ("VM_EXIT_MSR_STORE_ADDR", 0x2006),
        ("VM_EXIT_MSR_LOAD_ADDR", 0x2008),
        ("VM_ENTRY_MSR_LOAD_ADDR", 0x200A),
        ("EXECUTIVE_VMCS_POINTER", 0x200C),
        ("PML_ADDRESS", 0x200E),
        ("TSC_OFFSET", 0x2010),
        ("VIRTUAL_APIC_PAGE_ADDR", 0x2012),
        ("APIC_ACCESS_ADDR", 0x2014),
        ("POSTED_INTR_DESC_ADDR", 0x2016),
        ("VM_FUNCTION_CONTROL", 0x2018),
        ("EPT_POINTER", 0x201A),
        ("EOI_EXIT_BITMAP0", 0x201C),
        ("EOI_EXIT_BITMAP1", 0x201E),
        ("EOI_EXIT_BITMAP2", 0x2020),
        ("EOI_EXIT_BITMAP3", 0x2022),
        ("EPTP_LIST_ADDRESS", 0x2024),
        ("VMREAD_BITMAP", 0x2026),
        ("VMWRITE_BITMAP", 0x2028),
        ("VE_INFORMATION_ADDRESS", 0x202A),
        ("XSS_EXIT_BITMAP", 0x202C),
        ("ENCLS_EXITING_BITMAP", 0x202E),
        ("SPP_TABLE_POINTER", 0x2030),
        ("TSC_MULTIPLIER", 0x2032),
        ("TERTIARY_VM_EXEC_CONTROL", 0x2034),
        ("ENCLV_EXITING_BITMAP", 0x2036),
        ("LOW_PASID_DIRECTORY_ADDRESS", 0x2038),
        ("HIGH_PASID_DIRECTORY_ADDRESS", 0x203A),
        ("SHARED_EPT_POINTER", 0x203C),
        ("PCONFIG_EXITING_BITMAP", 0x203E),
        ("HLAT_POINTER", 0x2040),
        ("PID_POINTER_TABLE", 0x2042),
        ("SECONDARY_VM_EXIT_CONTROLS", 0x2044),
        ("IA32_SPEC_CTRL_MASK", 0x204A),
        ("IA32_SPEC_CTRL_SHADOW", 0x204C),
        ("INJECTED_EVENT_DATA", 0x2052),
    ]),
    ("B.2.2 64-bit read-only data fields", W64, RO, [
        ("GUEST_PHYSICAL_ADDRESS", 0x2400),
        ("ORIGINAL_EVENT_DATA", 0x2404),
    ]),
    ("B.2.3 64-bit guest-state fields", W64, GUEST, [
        ("VMCS_LINK_POINTER", 0x2800),
        ("GUEST_IA32_DEBUGCTL", 0x2802),
        ("GUEST_IA32_PAT", 0x2804),
        ("GUEST_IA32_EFER", 0x2806),
        ("GUEST_IA32_PERF_GLOBAL_CTRL", 0x2808),
        ("GUEST_PDPTR0", 0x280A),
        ("GUEST_PDPTR1", 0x280C),
        ("GUEST_PDPTR2", 0x280E),
        ("GUEST_PDPTR3", 0x2810),
        ("GUEST_BNDCFGS", 0x2812),
        ("GUEST_IA32_RTIT_CTL", 0x2814),
        ("GUEST_IA32_LBR_CTL", 0x2816),
        ("GUEST_IA32_PKRS", 0x2818),
        ("GUEST_IA32_FRED_CONFIG", 0x281A),
        ("GUEST_IA32_FRED_RSP1", 0x281C),
        ("GUEST_IA32_FRED_RSP2", 0x281E),
        ("GUEST_IA32_FRED_RSP3", 0x2820),
        ("GUEST_IA32_FRED_STKLVLS", 0x2822),
        ("GUEST_IA32_FRED_SSP1", 0x2824),
        ("GUEST_IA32_FRED_SSP2", 0x2826),
        ("GUEST_IA32_FRED_SSP3", 0x2828),
    ]),
    ("B.2.4 64-bit host-state fields", W64, HOST, [
        ("HOST_IA32_PAT", 0x2C00),
        ("HOST_IA32_EFER", 0x2C02),
        ("HOST_IA32_PERF_GLOBAL_CTRL", 0x2C04),
        ("HOST_IA32_PKRS", 0x2C06),
        ("HOST_IA32_FRED_CONFIG", 0x2C08),
        ("HOST_IA32_FRED_RSP1", 0x2C0A),
        ("HOST_IA32_FRED_RSP2", 0x2C0C),
        ("HOST_IA32_FRED_RSP3", 0x2C0E),
        ("HOST_IA32_FRED_STKLVLS", 0x2C10),
        ("HOST_IA32_FRED_SSP1", 0x2C12),
        ("HOST_IA32_FRED_SSP2", 0x2C14),
        ("HOST_IA32_FRED_SSP3", 0x2C16),
    ]),
    ("B.3.1 32-bit control fields", W32, CTL, [
        ("PIN_BASED_VM_EXEC_CONTROL", 0x4000),
        ("CPU_BASED_VM_EXEC_CONTROL", 0x4002),
        ("EXCEPTION_BITMAP", 0x4004),
        ("PAGE_FAULT_ERROR_CODE_MASK", 0x4006),
        ("PAGE_FAULT_ERROR_CODE_MATCH", 0x4008),
        ("CR3_TARGET_COUNT", 0x400A),
        ("VM_EXIT_CONTROLS", 0x400C),
        ("VM_EXIT_MSR_STORE_COUNT", 0x400E),
        ("VM_EXIT_MSR_LOAD_COUNT", 0x4010),
        ("VM_ENTRY_CONTROLS", 0x4012),
        ("VM_ENTRY_MSR_LOAD_COUNT", 0x4014),
        ("VM_ENTRY_INTR_INFO_FIELD", 0x4016),
        ("VM_ENTRY_EXCEPTION_ERROR_CODE", 0x4018),
        ("VM_ENTRY_INSTRUCTION_LEN", 0x401A),
        ("TPR_THRESHOLD", 0x401C),
        ("SECONDARY_VM_EXEC_CONTROL", 0x401E),
        ("PLE_GAP", 0x4020),
        ("PLE_WINDOW", 0x4022),
        ("NOTIFY_WINDOW", 0x4024),
    ]),
    ("B.3.2 32-bit read-only data fields", W32, RO, [
        ("VM_INSTRUCTION_ERROR", 0x4400),
        ("VM_EXIT_REASON", 0x4402),
        ("VM_EXIT_INTR_INFO", 0x4404),
        ("VM_EXIT_INTR_ERROR_CODE", 0x4406),
        ("IDT_VECTORING_INFO_FIELD", 0x4408),
        ("IDT_VECTORING_ERROR_CODE", 0x440A),
        ("VM_EXIT_INSTRUCTION_LEN", 0x440C),
        ("VMX_INSTRUCTION_INFO", 0x440E),
    ]),
    ("B.3.3 32-bit guest-state fields", W32, GUEST, [
        ("GUEST_ES_LIMIT", 0x4800),
        ("GUEST_CS_LIMIT", 0x4802),
        ("GUEST_SS_LIMIT", 0x4804),
        ("GUEST_DS_LIMIT", 0x4806),
        ("GUEST_FS_LIMIT", 0x4808),
        ("GUEST_GS_LIMIT", 0x480A),
        ("GUEST_LDTR_LIMIT", 0x480C),
        ("GUEST_TR_LIMIT", 0x480E),
        ("GUEST_GDTR_LIMIT", 0x4810),
        ("GUEST_IDTR_LIMIT", 0x4812),
        ("GUEST_ES_AR_BYTES", 0x4814),
        ("GUEST_CS_AR_BYTES", 0x4816),
        ("GUEST_SS_AR_BYTES", 0x4818),
        ("GUEST_DS_AR_BYTES", 0x481A),
        ("GUEST_FS_AR_BYTES", 0x481C),
        ("GUEST_GS_AR_BYTES", 0x481E),
        ("GUEST_LDTR_AR_BYTES", 0x4820),
        ("GUEST_TR_AR_BYTES", 0x4822),
        ("GUEST_INTERRUPTIBILITY_INFO", 0x4824),
        ("GUEST_ACTIVITY_STATE", 0x4826),
        ("GUEST_SMBASE", 0x4828),
        ("GUEST_SYSENTER_CS", 0x482A),
        ("VMX_PREEMPTION_TIMER_VALUE", 0x482E),
    ]),
    ("B.3.4 32-bit host-state field", W32, HOST, [
        ("HOST_IA32_SYSENTER_CS", 0x4C00),
    ]),
    ("B.4.1 natural-width control fields", WN, CTL, [
        ("CR0_GUEST_HOST_MASK", 0x6000),
        ("CR4_GUEST_HOST_MASK", 0x6002),
        ("CR0_READ_SHADOW", 0x6004),
        ("CR4_READ_SHADOW", 0x6006),
        ("CR3_TARGET_VALUE0", 0x6008),
        ("CR3_TARGET_VALUE1", 0x600A),
        ("CR3_TARGET_VALUE2", 0x600C),
        ("CR3_TARGET_VALUE3", 0x600E),
    ]),
    ("B.4.2 natural-width read-only data fields", WN, RO, [
        ("EXIT_QUALIFICATION", 0x6400),
        ("EXIT_IO_RCX", 0x6402),
        ("EXIT_IO_RSI", 0x6404),
        ("EXIT_IO_RDI", 0x6406),
        ("EXIT_IO_RIP", 0x6408),
        ("GUEST_LINEAR_ADDRESS", 0x640A),
    ]),
    ("B.4.3 natural-width guest-state fields", WN, GUEST, [
        ("GUEST_CR0", 0x6800),
        ("GUEST_CR3", 0x6802),
        ("GUEST_CR4", 0x6804),
        ("GUEST_ES_BASE", 0x6806),
        ("GUEST_CS_BASE", 0x6808),
        ("GUEST_SS_BASE", 0x680A),
        ("GUEST_DS_BASE", 0x680C),
        ("GUEST_FS_BASE", 0x680E),
        ("GUEST_GS_BASE", 0x6810),
        ("GUEST_LDTR_BASE", 0x6812),
        ("GUEST_TR_BASE", 0x6814),
        ("GUEST_GDTR_BASE", 0x6816),
        ("GUEST_IDTR_BASE", 0x6818),
        ("GUEST_DR7", 0x681A),
        ("GUEST_RSP", 0x681C),
        ("GUEST_RIP", 0x681E),
        ("GUEST_RFLAGS", 0x6820),
        ("GUEST_PENDING_DBG_EXCEPTIONS", 0x6822),
        ("GUEST_SYSENTER_ESP", 0x6824),
        ("GUEST_SYSENTER_EIP", 0x6826),
        ("GUEST_S_CET", 0x6828),
        ("GUEST_SSP", 0x682A),
        ("GUEST_INTR_SSP_TABLE", 0x682C),
    ]),
    ("B.4.4 natural-width host-state fields", WN, HOST, [
        ("HOST_CR0", 0x6C00),
        ("HOST_CR3", 0x6C02),
        ("HOST_CR4", 0x6C04),
        ("HOST_FS_BASE", 0x6C06),
        ("HOST_GS_BASE", 0x6C08),
        ("HOST_TR_BASE", 0x6C0A),
        ("HOST_GDTR_BASE", 0x6C0C),
        ("HOST_IDTR_BASE", 0x6C0E),
        ("HOST_IA32_SYSENTER_ESP", 0x6C10),
        ("HOST_IA32_SYSENTER_EIP", 0x6C12),
        ("HOST_RSP", 0x6C14),
        ("HOST_RIP", 0x6C16),
        ("HOST_S_CET", 0x6C18),
        ("HOST_SSP", 0x6C1A),
        ("HOST_INTR_SSP_TABLE", 0x6C1C),
    ]),
]

CASES = [
    pytest.param(name, encoding, width, ftype, id=name)
    for section, width, ftype, fields in APPENDIX_B
    for name, encoding in fields
]


@pytest.mark.parametrize("name, encoding, width, ftype", CASES)
def test_appendix_b_field(name: str, encoding: int, width: VmcsWidth, ftype: VmcsFieldType) -> None:
    field = VmcsField[name]
    assert field == encoding, f"{name}: {int(field):#06x} != {encoding:#06x}"
    assert encoding_width(field) is width and field.width is width
    assert encoding_type(field) is ftype and field.type is ftype
    assert encoding_access_type(field) is VmcsAccessType.FULL
    assert not encoding_reserved_bits_set(field)
    assert field.bits == {W16: 16, W32: 32, W64: 64, WN: None}[width]
    assert field.is_read_only is (ftype is RO)


def test_table_and_enum_have_the_same_fields() -> None:
    expected = [name for _, _, _, fields in APPENDIX_B for name, _ in fields]
    assert len(expected) == len(set(expected)), "duplicate name in the expectation table"
    assert set(VmcsField.__members__) == set(expected), "aliases or fields missing from one side"
    assert [f.name for f in VmcsField] == sorted(expected, key=lambda n: int(VmcsField[n]))


def test_members_are_ordered_by_encoding_and_unique() -> None:
    values = [int(f) for f in VmcsField]
    assert values == sorted(values)
    assert len(values) == len(set(values))
    assert len(VmcsField.__members__) == len(values)  # no aliases


def test_indexes_follow_the_appendix_order_within_each_section() -> None:
    """Within a (width, type) group the SDM numbers fields 0, 1, 2...: the index never repeats."""
    for section, width, ftype, fields in APPENDIX_B:
        indexes = [VmcsField[name].index for name, _ in fields]
        assert indexes == sorted(set(indexes)), section


@pytest.mark.parametrize(
    "name, encoding, width, ftype",
    [
        ("PAGE_FAULT_ERROR_CODE_MASK", 0x4006, W32, CTL),
        ("MSR_BITMAP", 0x2004, W64, CTL),
        ("CPU_BASED_VM_EXEC_CONTROL", 0x4002, W32, CTL),
        ("VMX_PREEMPTION_TIMER_VALUE", 0x482E, W32, GUEST),
        ("EXIT_QUALIFICATION", 0x6400, WN, RO),
        ("GUEST_PHYSICAL_ADDRESS", 0x2400, W64, RO),
        ("GUEST_RIP", 0x681E, WN, GUEST),
        ("HOST_RIP", 0x6C16, WN, HOST),
    ],
)
def test_anchor_encodings(name: str, encoding: int, width: VmcsWidth, ftype: VmcsFieldType) -> None:
    assert VmcsField[name] == encoding
    assert VmcsField[name].width is width and VmcsField[name].type is ftype


@pytest.mark.parametrize(
    "encoding, width, ftype, access, index",
    [
        (0x0000, W16, CTL, VmcsAccessType.FULL, 0),
        (0x2001, W64, CTL, VmcsAccessType.HIGH, 0),  # Linux IO_BITMAP_A_HIGH
        (0x2005, W64, CTL, VmcsAccessType.HIGH, 2),  # Linux MSR_BITMAP_HIGH
        (0x2401, W64, RO, VmcsAccessType.HIGH, 0),
        (0x4826, W32, GUEST, VmcsAccessType.FULL, 0x13),
        (0x6C16, WN, HOST, VmcsAccessType.FULL, 0x0B),
        (0x7FFF, WN, HOST, VmcsAccessType.HIGH, 0x1FF),
    ],
)
def test_decoding_any_raw_encoding(
    encoding: int, width: VmcsWidth, ftype: VmcsFieldType, access: VmcsAccessType, index: int
) -> None:
    assert encoding_width(encoding) is width
    assert encoding_type(encoding) is ftype
    assert encoding_access_type(encoding) is access
    assert encoding_index(encoding) == index


@pytest.mark.parametrize("encoding", [0x1000, 0x8000, 0x1_0000, 0x8000_0000, 0x1_0000_0000, 0x4000 | 0x1000])
def test_reserved_encoding_bits(encoding: int) -> None:
    assert encoding_reserved_bits_set(encoding)


@pytest.mark.parametrize("encoding", [0x0000, 0x0FFF, 0x2001, 0x6FFF])
def test_encodings_without_reserved_bits(encoding: int) -> None:
    assert not encoding_reserved_bits_set(encoding)


def test_width_bits() -> None:
    assert width_bits(W16) == 16
    assert width_bits(W32) == 32
    assert width_bits(W64) == 64
    assert width_bits(WN) is None


def test_high_encoding_of_64_bit_fields() -> None:
    assert high_encoding(VmcsField.MSR_BITMAP) == 0x2005  # Linux MSR_BITMAP_HIGH
    assert high_encoding(VmcsField.EPT_POINTER) == 0x201B  # Linux EPT_POINTER_HIGH
    assert high_encoding(VmcsField.GUEST_PHYSICAL_ADDRESS) == 0x2401
    for field in VmcsField:
        if field.width is W64:
            assert encoding_access_type(high_encoding(field)) is VmcsAccessType.HIGH
            assert encoding_index(high_encoding(field)) == field.index


@pytest.mark.parametrize(
    "field", [VmcsField.PAGE_FAULT_ERROR_CODE_MASK, VmcsField.GUEST_CS_SELECTOR, VmcsField.GUEST_RIP]
)
def test_high_encoding_rejects_other_widths(field: VmcsField) -> None:
    with pytest.raises(ValueError):
        high_encoding(field)


# --- VMCS areas ---------------------------------------------------------------------------------
EXIT_CONTROL_FIELDS = {
    "VM_EXIT_CONTROLS", "SECONDARY_VM_EXIT_CONTROLS", "VM_EXIT_MSR_STORE_COUNT",
    "VM_EXIT_MSR_STORE_ADDR", "VM_EXIT_MSR_LOAD_COUNT", "VM_EXIT_MSR_LOAD_ADDR",
}
ENTRY_CONTROL_FIELDS = {
    "VM_ENTRY_CONTROLS", "VM_ENTRY_MSR_LOAD_COUNT", "VM_ENTRY_MSR_LOAD_ADDR", "VM_ENTRY_INTR_INFO_FIELD",
    "VM_ENTRY_EXCEPTION_ERROR_CODE", "VM_ENTRY_INSTRUCTION_LEN", "INJECTED_EVENT_DATA",
}


def test_every_field_has_one_of_the_six_areas() -> None:
    assert set(FIELD_GROUPS) == set(VmcsField)
    assert set(FIELD_GROUPS.values()) == set(VMCS_AREAS)
    assert len(VMCS_AREAS) == 6


@pytest.mark.parametrize("section, width, ftype, fields", APPENDIX_B, ids=[s[0] for s in APPENDIX_B])
def test_field_areas_follow_the_sdm_grouping(
    section: str, width: VmcsWidth, ftype: VmcsFieldType, fields: list[tuple[str, int]]
) -> None:
    for name, _ in fields:
        area = field_area(VmcsField[name])
        if ftype is GUEST:
            assert area == "Guest-state area", name
        elif ftype is HOST:
            assert area == "Host-state area", name
        elif ftype is RO:
            assert area == "VM-exit information fields", name
        elif name in EXIT_CONTROL_FIELDS:
            assert area == "VM-exit control fields", name
        elif name in ENTRY_CONTROL_FIELDS:
            assert area == "VM-entry control fields", name
        else:
            assert area == "VM-execution control fields", name


def test_exit_and_entry_control_lists_name_real_control_fields() -> None:
    for name in EXIT_CONTROL_FIELDS | ENTRY_CONTROL_FIELDS:
        assert VmcsField[name].type is CTL
