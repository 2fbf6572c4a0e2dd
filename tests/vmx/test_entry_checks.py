"""The VM-entry checks of SDM 27.2 (controls and host state: VMfailValid 7/8), 27.3 (guest state:
VM-entry failure, exit reason 33) and 27.4 (MSR loading: exit reason 34), one test per rule,
through the public path: VMWRITE a valid VMCS, break one field, VMLAUNCH."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from pyvmx.arch.controls import (
    PinBasedControls as P,
    ProcBasedControls as C,
    SecondaryProcBasedControls as S,
    VmEntryControls as E,
    VmExitControls as X,
)
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4, Efer
from pyvmx.vmx import entry_checks
from pyvmx.vmx.caps import (
    EPT_CAP_AD_BITS,
    EPT_CAP_MEMTYPE_UC,
    EPT_CAP_MEMTYPE_WB,
    EPT_CAP_PAGE_WALK_4,
    EPT_CAP_PAGE_WALK_5,
    CpuProfile,
)
from pyvmx.vmx.entry_checks import CheckArea, EntryCheckFailure, eptp_is_valid
from pyvmx.vmx.entry_checks.host import host_32bit_requirements
from pyvmx.vmx.outcomes import VmxStatus
from pyvmx.vmx.vmcs import VmcsRegion

from . import rule_coverage
from .vmcs_builder import (
    AR_CODE16,
    AR_CODE32,
    AR_CODE64,
    AR_DATA16,
    AR_DATA32,
    AR_LDT,
    AR_TSS_BUSY,
    AR_UNUSABLE,
    EPT_PML4,
    GUEST_PAE_PDPT,
    HOST_RIP,
    MEMORY_SIZE,
    OTHER_VMCS,
    VIRTUAL_APIC_PAGE,
    VMCS_REGION,
    EntryHarness,
)

EXIT_INVALID_STATE = 0x80000021  # VM-entry failure | 33
EXIT_MSR_LOADING = 0x80000022  # VM-entry failure | 34

# Interruption types (SDM 25.8.3, Table 25-17).
EXT_INTR, NMI, HW_EXCEPTION, SW_INTR, PRIV_SW_EXCEPTION, SW_EXCEPTION, OTHER_EVENT = 0, 2, 3, 4, 5, 6, 7
# Activity states (SDM 25.4.2).
ACTIVE, HLT, SHUTDOWN, WAIT_SIPI = 0, 1, 2, 3
# Interruptibility state (SDM 25.4.2, Table 25-3).
BLOCK_STI, BLOCK_MOV_SS, BLOCK_SMI, BLOCK_NMI, ENCLAVE_INTR = 1, 2, 4, 8, 16
RFLAGS_TF, RFLAGS_IF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 17
PENDING_BS = 1 << 14
CANONICAL_HOLE = 0x0000800000000000  # the first non-canonical address (48-bit linear addresses)
BEYOND_PHYS_WIDTH = 1 << 46  # the default profile has a 46-bit physical-address width


# --- outcome assertions --------------------------------------------------------------------------
def _failure(h: EntryHarness) -> EntryCheckFailure:
    failure = h.processor.last_entry_failure
    assert isinstance(failure, EntryCheckFailure)
    rule_coverage.record(failure)
    return failure


def vmfail(h: EntryHarness, error: int, section: str, match: str) -> EntryCheckFailure:
    result = h.launch()
    assert result.status is VmxStatus.FAIL_VALID, result
    assert result.error == error
    assert h.read(F.VM_INSTRUCTION_ERROR) == error
    failure = _failure(h)
    assert failure.rule.startswith(f"SDM {section}:"), failure.rule
    assert match in failure.rule, failure.rule
    return failure


def controls_fail(h: EntryHarness, section: str, match: str) -> EntryCheckFailure:
    failure = vmfail(h, 7, section, match)
    assert failure.area is CheckArea.CONTROLS
    return failure


def host_fail(h: EntryHarness, section: str, match: str) -> EntryCheckFailure:
    failure = vmfail(h, 8, section, match)
    assert failure.area is CheckArea.HOST_STATE
    return failure


def guest_fail(h: EntryHarness, section: str, match: str, qualification: int = 0) -> EntryCheckFailure:
    result = h.launch()
    assert result.status is VmxStatus.VM_EXIT, result
    assert result.exit is not None
    assert result.exit.reason == EXIT_INVALID_STATE
    assert result.exit.qualification == qualification
    assert h.read(F.VM_EXIT_REASON) == EXIT_INVALID_STATE
    assert h.read(F.EXIT_QUALIFICATION) == qualification
    failure = _failure(h)
    assert failure.area is CheckArea.GUEST_STATE
    assert failure.rule.startswith(f"SDM {section}:"), failure.rule
    assert match in failure.rule, failure.rule
    return failure


def msr_fail(h: EntryHarness, entry_number: int, match: str) -> EntryCheckFailure:
    result = h.launch()
    assert result.status is VmxStatus.VM_EXIT, result
    assert result.exit is not None
    assert result.exit.reason == EXIT_MSR_LOADING
    assert result.exit.qualification == entry_number
    failure = _failure(h)
    assert failure.area is CheckArea.MSR_LOADING
    assert failure.rule.startswith("SDM 27.4:"), failure.rule
    assert match in failure.rule, failure.rule
    return failure


def passes(h: EntryHarness) -> None:
    result = h.launch()
    assert result.status is VmxStatus.SUCCEED, (result, h.processor.last_entry_failure)
    assert h.processor.last_entry_failure is None


def profile_with(**extra: int) -> CpuProfile:
    """The default profile with more controls allowed (bits or-ed into its capability fields)."""
    base = CpuProfile()
    return dataclasses.replace(base, **{k: getattr(base, k) | int(v) for k, v in extra.items()})


# --- baselines -----------------------------------------------------------------------------------
def test_baseline_64bit_guest_launches() -> None:
    passes(EntryHarness())


def test_baseline_real_mode_unrestricted_guest_launches() -> None:
    passes(EntryHarness().use_real_mode_guest())


def test_baseline_32bit_protected_mode_guest_launches() -> None:
    passes(EntryHarness().use_protected_mode_32_guest())


def test_baseline_32bit_pae_guest_with_ept_launches() -> None:
    passes(EntryHarness().use_protected_mode_32_guest(pae=True))


def test_baseline_32bit_pae_guest_without_ept_launches() -> None:
    passes(EntryHarness().use_protected_mode_32_guest(pae=True).without_ept())


def test_baseline_v8086_guest_launches() -> None:
    passes(EntryHarness().use_v8086_guest())


def test_successful_launch_marks_the_vmcs_launched() -> None:
    h = EntryHarness()
    passes(h)
    assert h.launch().error == 4  # VMLAUNCH with non-clear VMCS
    assert h.resume().succeeded


def test_checks_are_registered_in_sdm_order() -> None:
    def key(section: str) -> tuple[int, ...]:
        return tuple(int(part) for part in section.split("."))

    for checks, prefix in (
        (entry_checks.CONTROL_CHECKS, "27.2.1"),
        (entry_checks.HOST_STATE_CHECKS, "27.2."),
        (entry_checks.GUEST_STATE_CHECKS, "27.3.1"),
    ):
        sections = [key(check.section) for check in checks]
        assert sections == sorted(sections)
        assert all(check.section.startswith(prefix) for check in checks)
    names = [c.name for c in entry_checks.CONTROL_CHECKS + entry_checks.HOST_STATE_CHECKS + entry_checks.GUEST_STATE_CHECKS]
    assert len(names) == len(set(names))


# =================================================================================================
# SDM 27.2.1.1 VM-execution control fields -> VMfailValid(7)
# =================================================================================================
@pytest.mark.parametrize("change", ["set_unsupported", "clear_default1"])
def test_27_2_1_1_pin_based_reserved_bits_vmfail_7(change: str) -> None:
    h = EntryHarness()
    if change == "set_unsupported":
        h.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.POSTED_INTR)
    else:
        h.clear_bits(F.PIN_BASED_VM_EXEC_CONTROL, 1 << 1)  # a default1 bit
    controls_fail(h, "27.2.1.1", "pin-based")


@pytest.mark.parametrize("change", ["set_unsupported", "clear_default1"])
def test_27_2_1_1_primary_proc_based_reserved_bits_vmfail_7(change: str) -> None:
    h = EntryHarness()
    if change == "set_unsupported":
        h.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.TPR_SHADOW)
    else:
        h.clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, 1 << 1)  # a default1 bit
    controls_fail(h, "27.2.1.1", "primary processor-based")


def test_27_2_1_1_secondary_proc_based_reserved_bits_vmfail_7() -> None:
    h = EntryHarness()
    h.set_bits(F.SECONDARY_VM_EXEC_CONTROL, S.VIRTUALIZE_APIC_ACCESSES)
    controls_fail(h, "27.2.1.1", "secondary processor-based")


def test_27_2_1_1_secondary_controls_ignored_without_activate_secondary_controls() -> None:
    h = EntryHarness().use_protected_mode_32_guest()
    h.clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.ACTIVATE_SECONDARY_CONTROLS)
    h.write(F.SECONDARY_VM_EXEC_CONTROL, 0xFFFFFFFF)
    passes(h)


def test_27_2_1_1_cr3_target_count_vmfail_7() -> None:
    h = EntryHarness()
    h.write(F.CR3_TARGET_COUNT, h.profile.cr3_target_count)
    passes(h)
    h = EntryHarness()
    h.write(F.CR3_TARGET_COUNT, h.profile.cr3_target_count + 1)
    controls_fail(h, "27.2.1.1", "CR3-target count")


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [
        (F.IO_BITMAP_A, 0x4800, "address A"),
        (F.IO_BITMAP_B, BEYOND_PHYS_WIDTH | 0x5000, "address B"),
    ],
)
def test_27_2_1_1_io_bitmap_address_vmfail_7(field: F, value: int, name: str) -> None:
    h = EntryHarness()
    h.write(field, value)
    controls_fail(h, "27.2.1.1", f"I/O-bitmap {name}")


def test_27_2_1_1_io_bitmap_address_unchecked_without_use_io_bitmaps() -> None:
    h = EntryHarness()
    h.clear_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.USE_IO_BITMAPS)
    h.write(F.IO_BITMAP_A, 0x123)
    passes(h)


@pytest.mark.parametrize("value", [0x6010, BEYOND_PHYS_WIDTH | 0x6000])
def test_27_2_1_1_msr_bitmap_address_vmfail_7(value: int) -> None:
    h = EntryHarness()
    h.write(F.MSR_BITMAP, value)
    controls_fail(h, "27.2.1.1", "MSR-bitmap address")


def _tpr_shadow_harness(threshold: int = 0, vtpr: int = 0) -> EntryHarness:
    h = EntryHarness(profile_with(proc_based=C.TPR_SHADOW))
    h.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.TPR_SHADOW)
    h.write(F.VIRTUAL_APIC_PAGE_ADDR, VIRTUAL_APIC_PAGE)
    h.write(F.TPR_THRESHOLD, threshold)
    h.memory.write8(VIRTUAL_APIC_PAGE + 0x80, vtpr)
    return h


def test_27_2_1_1_tpr_shadow_baseline_launches() -> None:
    passes(_tpr_shadow_harness(threshold=4, vtpr=0x40))


@pytest.mark.parametrize("address", [VIRTUAL_APIC_PAGE | 0x80, BEYOND_PHYS_WIDTH])
def test_27_2_1_1_virtual_apic_address_vmfail_7(address: int) -> None:
    h = _tpr_shadow_harness()
    h.write(F.VIRTUAL_APIC_PAGE_ADDR, address)
    controls_fail(h, "27.2.1.1", "virtual-APIC address")


def test_27_2_1_1_tpr_threshold_bits_31_4_vmfail_7() -> None:
    controls_fail(_tpr_shadow_harness(threshold=0x10, vtpr=0xF0), "27.2.1.1", "bits 31:4 of the TPR threshold")


def test_27_2_1_1_tpr_threshold_above_vtpr_vmfail_7() -> None:
    controls_fail(_tpr_shadow_harness(threshold=5, vtpr=0x40), "27.2.1.1", "VTPR bits 7:4")


def test_27_2_1_1_apic_virtualization_requires_tpr_shadow_vmfail_7() -> None:
    h = EntryHarness(profile_with(secondary=S.VIRTUALIZE_X2APIC_MODE))
    h.set_bits(F.SECONDARY_VM_EXEC_CONTROL, S.VIRTUALIZE_X2APIC_MODE)
    controls_fail(h, "27.2.1.1", "\"use TPR shadow\" is 0")


def test_27_2_1_1_virtual_nmis_require_nmi_exiting_vmfail_7() -> None:
    h = EntryHarness()
    h.clear_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.NMI_EXITING)
    controls_fail(h, "27.2.1.1", "\"virtual NMIs\" must be 0 when \"NMI exiting\" is 0")


def test_27_2_1_1_nmi_window_exiting_requires_virtual_nmis_vmfail_7() -> None:
    h = EntryHarness()
    h.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.NMI_WINDOW_EXITING)
    passes(h)
    h = EntryHarness()
    h.set_bits(F.CPU_BASED_VM_EXEC_CONTROL, C.NMI_WINDOW_EXITING)
    h.clear_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VIRTUAL_NMIS)
    controls_fail(h, "27.2.1.1", "\"NMI-window exiting\" must be 0")


def test_27_2_1_1_vpid_zero_vmfail_7() -> None:
    h = EntryHarness()
    h.write(F.VIRTUAL_PROCESSOR_ID, 0)
    controls_fail(h, "27.2.1.1", "VPID must not be 0000H")


def test_27_2_1_1_vpid_zero_allowed_without_enable_vpid() -> None:
    h = EntryHarness()
    h.clear_bits(F.SECONDARY_VM_EXEC_CONTROL, S.ENABLE_VPID)
    h.write(F.VIRTUAL_PROCESSOR_ID, 0)
    passes(h)


@pytest.mark.parametrize(
    ("eptp", "match"),
    [
        (EPT_PML4 | 1 | (3 << 3), "memory type"),
        (EPT_PML4 | 6 | (2 << 3), "page-walk length"),
        (EPT_PML4 | 6 | (3 << 3) | (1 << 7), "reserved bits 11:7"),
        (BEYOND_PHYS_WIDTH | EPT_PML4 | 6 | (3 << 3), "physical-address width"),
    ],
)
def test_27_2_1_1_eptp_invalid_vmfail_7(eptp: int, match: str) -> None:
    h = EntryHarness()
    h.write(F.EPT_POINTER, eptp)
    controls_fail(h, "27.2.1.1", match)


def test_27_2_1_1_eptp_unchecked_without_enable_ept() -> None:
    h = EntryHarness().use_protected_mode_32_guest().without_ept()
    h.write(F.EPT_POINTER, 0xFFF)
    passes(h)


def test_27_2_1_1_unrestricted_guest_requires_ept_vmfail_7() -> None:
    h = EntryHarness().use_real_mode_guest()
    h.clear_bits(F.SECONDARY_VM_EXEC_CONTROL, S.ENABLE_EPT)
    controls_fail(h, "27.2.1.1", "\"unrestricted guest\" requires \"enable EPT\"")


_CAPS_ALL = EPT_CAP_MEMTYPE_UC | EPT_CAP_MEMTYPE_WB | EPT_CAP_PAGE_WALK_4 | EPT_CAP_AD_BITS


@pytest.mark.parametrize(
    ("eptp", "cap", "valid"),
    [
        (0x7000 | 6 | (3 << 3), _CAPS_ALL, True),  # WB, 4-level
        (0x7000 | 0 | (3 << 3), _CAPS_ALL, True),  # UC, 4-level
        (0x7000 | 6 | (3 << 3) | (1 << 6), _CAPS_ALL, True),  # A/D flags enabled
        (0x7000 | 6 | (3 << 3) | (1 << 6), _CAPS_ALL & ~EPT_CAP_AD_BITS, False),  # A/D not supported
        (0x7000 | 0 | (3 << 3), _CAPS_ALL & ~EPT_CAP_MEMTYPE_UC, False),  # UC not supported
        (0x7000 | 6 | (3 << 3), _CAPS_ALL & ~EPT_CAP_MEMTYPE_WB, False),  # WB not supported
        *[(0x7000 | mt | (3 << 3), _CAPS_ALL, False) for mt in (1, 2, 3, 4, 5, 7)],  # reserved types
        (0x7000 | 6 | (4 << 3), _CAPS_ALL, False),  # 5-level without cap bit 7
        (0x7000 | 6 | (4 << 3), _CAPS_ALL | EPT_CAP_PAGE_WALK_5, True),  # 5-level with cap bit 7
        (0x7000 | 6 | (3 << 3), _CAPS_ALL & ~EPT_CAP_PAGE_WALK_4, False),  # 4-level not supported
        *[(0x7000 | 6 | (pwl << 3), _CAPS_ALL, False) for pwl in (0, 1, 2, 5, 6, 7)],
        *[(0x7000 | 6 | (3 << 3) | (1 << bit), _CAPS_ALL, False) for bit in range(7, 12)],
        ((1 << 45) | 6 | (3 << 3), _CAPS_ALL, True),  # highest address bit within 46 bits
        ((1 << 46) | 6 | (3 << 3), _CAPS_ALL, False),  # beyond the physical-address width
        ((1 << 63) | 6 | (3 << 3), _CAPS_ALL, False),
    ],
)
def test_27_2_1_1_eptp_is_valid_table(eptp: int, cap: int, valid: bool) -> None:
    profile = dataclasses.replace(CpuProfile(), ept_vpid_cap=cap)
    assert eptp_is_valid(eptp, profile) is valid


def test_eptp_is_valid_is_what_invept_single_context_uses() -> None:
    h = EntryHarness()
    assert h.processor.invept(1, 0x7000 | 6 | (3 << 3)).succeeded
    assert h.processor.invept(1, 0x7000 | 6 | (2 << 3)).error == 28  # invalid operand to INVEPT


# =================================================================================================
# SDM 27.2.1.2 VM-exit control fields -> VMfailValid(7)
# =================================================================================================
def test_27_2_1_2_exit_controls_reserved_bits_vmfail_7() -> None:
    h = EntryHarness()
    h.set_bits(F.VM_EXIT_CONTROLS, X.LOAD_IA32_PERF_GLOBAL_CTRL)
    controls_fail(h, "27.2.1.2", "VM-exit controls")


def test_27_2_1_2_save_preemption_timer_requires_timer_vmfail_7() -> None:
    h = EntryHarness()
    h.set_bits(F.VM_EXIT_CONTROLS, X.SAVE_VMX_PREEMPTION_TIMER)
    controls_fail(h, "27.2.1.2", "\"save VMX-preemption timer value\" must be 0")
    h = EntryHarness()
    h.set_bits(F.VM_EXIT_CONTROLS, X.SAVE_VMX_PREEMPTION_TIMER)
    h.set_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VMX_PREEMPTION_TIMER)
    passes(h)


_MSR_AREAS = [
    ("VM-exit MSR-store", F.VM_EXIT_MSR_STORE_COUNT, F.VM_EXIT_MSR_STORE_ADDR, "27.2.1.2"),
    ("VM-exit MSR-load", F.VM_EXIT_MSR_LOAD_COUNT, F.VM_EXIT_MSR_LOAD_ADDR, "27.2.1.2"),
    ("VM-entry MSR-load", F.VM_ENTRY_MSR_LOAD_COUNT, F.VM_ENTRY_MSR_LOAD_ADDR, "27.2.1.3"),
]


@pytest.mark.parametrize(("name", "count_field", "addr_field", "section"), _MSR_AREAS)
@pytest.mark.parametrize(
    ("count", "address", "match"),
    [
        (1, 0x9008, "16-byte aligned"),
        (1, BEYOND_PHYS_WIDTH, "address must be within the physical-address width"),
        (2, BEYOND_PHYS_WIDTH - 16, "last byte"),
    ],
)
def test_27_2_1_2_and_27_2_1_3_msr_area_addresses_vmfail_7(
    name: str, count_field: F, addr_field: F, section: str, count: int, address: int, match: str
) -> None:
    h = EntryHarness()
    h.write(count_field, count)
    h.write(addr_field, address)
    failure = controls_fail(h, section, match)
    assert name in failure.rule


@pytest.mark.parametrize(("name", "count_field", "addr_field", "section"), _MSR_AREAS)
def test_27_2_1_2_msr_area_address_unchecked_when_count_is_zero(
    name: str, count_field: F, addr_field: F, section: str
) -> None:
    h = EntryHarness()
    h.write(count_field, 0)
    h.write(addr_field, 0x9003 | BEYOND_PHYS_WIDTH)
    passes(h)


# =================================================================================================
# SDM 27.2.1.3 VM-entry control fields -> VMfailValid(7)
# =================================================================================================
def test_27_2_1_3_entry_controls_reserved_bits_vmfail_7() -> None:
    h = EntryHarness()
    h.set_bits(F.VM_ENTRY_CONTROLS, E.LOAD_IA32_PERF_GLOBAL_CTRL)
    controls_fail(h, "27.2.1.3", "VM-entry controls")


def test_27_2_1_3_injection_type_1_reserved_vmfail_7() -> None:
    h = EntryHarness()
    h.inject(1, 32)
    controls_fail(h, "27.2.1.3", "interruption type 1 is reserved")


def test_27_2_1_3_injection_other_event_needs_mtf_support_vmfail_7() -> None:
    h = EntryHarness()
    h.inject(OTHER_EVENT, 0)
    passes(h)
    h = EntryHarness(CpuProfile().without(C.MONITOR_TRAP_FLAG))
    h.inject(OTHER_EVENT, 0)
    controls_fail(h, "27.2.1.3", "interruption type 7 (other event) is reserved")


@pytest.mark.parametrize(
    ("kind", "vector", "match"),
    [
        (NMI, 3, "an NMI must have vector 2"),
        (HW_EXCEPTION, 32, "at most 31"),
        (OTHER_EVENT, 1, "other event must have vector 0"),
    ],
)
def test_27_2_1_3_injection_vector_vmfail_7(kind: int, vector: int, match: str) -> None:
    h = EntryHarness()
    h.inject(kind, vector)
    controls_fail(h, "27.2.1.3", match)


@pytest.mark.parametrize(
    ("guest", "kind", "vector", "error_code", "ok"),
    [
        ("64", HW_EXCEPTION, 13, 0, True),  # #GP with an error code
        ("64", HW_EXCEPTION, 13, None, False),  # #GP without one
        ("64", HW_EXCEPTION, 14, None, False),  # #PF without one
        ("64", HW_EXCEPTION, 21, None, False),  # #CP without one
        ("64", HW_EXCEPTION, 6, 0, False),  # #UD with one
        ("64", HW_EXCEPTION, 6, None, True),
        ("64", EXT_INTR, 32, 0, False),  # an interrupt never has one
        ("64", NMI, 2, 0, False),
        ("64", SW_EXCEPTION, 3, 0, False),
        ("real", HW_EXCEPTION, 13, 0, False),  # real mode: no error codes
        ("real", HW_EXCEPTION, 13, None, True),
    ],
)
def test_27_2_1_3_injection_deliver_error_code_vmfail_7(
    guest: str, kind: int, vector: int, error_code: int | None, ok: bool
) -> None:
    h = EntryHarness()
    if guest == "real":
        h.use_real_mode_guest()
    h.inject(kind, vector, error_code, length=2)
    if ok:
        passes(h)
    else:
        controls_fail(h, "27.2.1.3", "deliver-error-code")


def test_27_2_1_3_injection_reserved_bits_30_12_vmfail_7() -> None:
    h = EntryHarness()
    h.inject(EXT_INTR, 32)
    h.set_bits(F.VM_ENTRY_INTR_INFO_FIELD, 1 << 12)
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF)
    controls_fail(h, "27.2.1.3", "reserved bits 30:12")


def test_27_2_1_3_injection_error_code_bits_31_16_vmfail_7() -> None:
    h = EntryHarness()
    h.inject(HW_EXCEPTION, 13, error_code=0x10000)
    controls_fail(h, "27.2.1.3", "bits 31:16 must be 0")


@pytest.mark.parametrize("kind", [SW_INTR, PRIV_SW_EXCEPTION, SW_EXCEPTION])
def test_27_2_1_3_injection_instruction_length_above_15_vmfail_7(kind: int) -> None:
    h = EntryHarness()
    h.inject(kind, 3, length=16)
    controls_fail(h, "27.2.1.3", "instruction length must be 0-15")


def test_27_2_1_3_injection_instruction_length_0_needs_vmx_misc_30_vmfail_7() -> None:
    h = EntryHarness()
    h.inject(SW_INTR, 0x80, length=0)
    passes(h)  # IA32_VMX_MISC[30] = 1 in the default profile
    h = EntryHarness(dataclasses.replace(CpuProfile(), zero_length_injection=False))
    h.inject(SW_INTR, 0x80, length=0)
    controls_fail(h, "27.2.1.3", "instruction length 0 is allowed only if IA32_VMX_MISC[30]")


@pytest.mark.parametrize("control", [E.SMM, E.DEACT_DUAL_MONITOR])
def test_27_2_1_3_smm_entry_controls_outside_smm_vmfail_7(control: E) -> None:
    h = EntryHarness(profile_with(entry_controls=E.SMM | E.DEACT_DUAL_MONITOR))
    h.set_bits(F.VM_ENTRY_CONTROLS, control)
    controls_fail(h, "27.2.1.3", "outside SMM")


# =================================================================================================
# SDM 27.2.2-27.2.4 Host-state area -> VMfailValid(8)
# =================================================================================================
@pytest.mark.parametrize(
    "cr0", [pytest.param(0x80050033 & ~int(Cr0.NE), id="NE=0"), pytest.param(0x80050033 | (1 << 32), id="bit32")]
)
def test_27_2_2_host_cr0_fixed_bits_vmfail_8(cr0: int) -> None:
    h = EntryHarness()
    h.write(F.HOST_CR0, cr0)
    host_fail(h, "27.2.2", "host CR0")


@pytest.mark.parametrize(
    "cr4", [pytest.param(int(Cr4.PAE), id="VMXE=0"), pytest.param(int(Cr4.PAE | Cr4.VMXE) | (1 << 12), id="LA57")]
)
def test_27_2_2_host_cr4_fixed_bits_vmfail_8(cr4: int) -> None:
    h = EntryHarness()
    h.write(F.HOST_CR4, cr4)
    host_fail(h, "27.2.2", "host CR4")


def test_27_2_2_host_cr3_beyond_physical_address_width_vmfail_8() -> None:
    h = EntryHarness()
    h.write(F.HOST_CR3, BEYOND_PHYS_WIDTH)
    host_fail(h, "27.2.2", "host CR3")


@pytest.mark.parametrize(("field", "name"), [(F.HOST_IA32_SYSENTER_ESP, "ESP"), (F.HOST_IA32_SYSENTER_EIP, "EIP")])
def test_27_2_2_host_sysenter_canonical_vmfail_8(field: F, name: str) -> None:
    h = EntryHarness()
    h.write(field, CANONICAL_HOLE)
    host_fail(h, "27.2.2", f"host IA32_SYSENTER_{name}")


@pytest.mark.parametrize("bad_type", [2, 3, 8, 0xFF])
def test_27_2_2_host_pat_memory_types_vmfail_8(bad_type: int) -> None:
    h = EntryHarness()
    h.write(F.HOST_IA32_PAT, (0x0007040600070406 & ~(0xFF << 56)) | (bad_type << 56))
    host_fail(h, "27.2.2", "host IA32_PAT")


def test_27_2_2_host_pat_unchecked_without_load_ia32_pat() -> None:
    h = EntryHarness()
    h.clear_bits(F.VM_EXIT_CONTROLS, X.LOAD_IA32_PAT)
    h.write(F.HOST_IA32_PAT, 0x0202020202020202)
    passes(h)


def test_27_2_2_host_efer_reserved_bits_vmfail_8() -> None:
    h = EntryHarness()
    h.set_bits(F.HOST_IA32_EFER, 1 << 1)
    host_fail(h, "27.2.2", "host IA32_EFER: reserved bits")


@pytest.mark.parametrize("clear", [Efer.LMA, Efer.LME])
def test_27_2_2_host_efer_lma_lme_equal_host_address_space_size_vmfail_8(clear: Efer) -> None:
    h = EntryHarness()
    h.clear_bits(F.HOST_IA32_EFER, clear)
    host_fail(h, "27.2.2", "LMA and LME must each equal")


@pytest.mark.parametrize("seg", ["CS", "SS", "DS", "ES", "FS", "GS", "TR"])
@pytest.mark.parametrize("bits", [1, 3, 4])
def test_27_2_3_host_selector_rpl_ti_vmfail_8(seg: str, bits: int) -> None:
    h = EntryHarness()
    h.write(F[f"HOST_{seg}_SELECTOR"], 0x40 | bits)
    host_fail(h, "27.2.3", f"host {seg} selector: RPL")


@pytest.mark.parametrize("seg", ["CS", "TR"])
def test_27_2_3_host_cs_tr_selector_nonzero_vmfail_8(seg: str) -> None:
    h = EntryHarness()
    h.write(F[f"HOST_{seg}_SELECTOR"], 0)
    host_fail(h, "27.2.3", f"host {seg} selector must not be 0000H")


def test_27_2_3_host_ss_selector_zero_allowed_for_64bit_host() -> None:
    h = EntryHarness()
    h.write(F.HOST_SS_SELECTOR, 0)
    passes(h)


def test_27_2_3_host_ss_selector_nonzero_for_32bit_host_vmfail_8() -> None:
    h = EntryHarness().use_protected_mode_32_guest()
    h.clear_bits(F.VM_EXIT_CONTROLS, X.HOST_ADDR_SPACE_SIZE | X.LOAD_IA32_EFER)
    h.write(F.HOST_SS_SELECTOR, 0)
    host_fail(h, "27.2.3", "host SS selector")


@pytest.mark.parametrize("name", ["FS", "GS", "GDTR", "IDTR", "TR"])
def test_27_2_3_host_bases_canonical_vmfail_8(name: str) -> None:
    h = EntryHarness()
    h.write(F[f"HOST_{name}_BASE"], 0x0000900000000000)
    host_fail(h, "27.2.3", f"host {name} base")


def test_27_2_4_host_address_space_size_must_be_1_in_ia32e_mode_vmfail_8() -> None:
    h = EntryHarness().use_protected_mode_32_guest()
    h.clear_bits(F.VM_EXIT_CONTROLS, X.HOST_ADDR_SPACE_SIZE | X.LOAD_IA32_EFER)
    host_fail(h, "27.2.4", "must be 1 on a processor in IA-32e mode")


def test_27_2_4_ia32e_guest_needs_64bit_host_vmfail_8() -> None:
    # The processor is in IA-32e mode, so "host address-space size" = 0 fails first.
    h = EntryHarness()
    h.clear_bits(F.VM_EXIT_CONTROLS, X.HOST_ADDR_SPACE_SIZE | X.LOAD_IA32_EFER)
    host_fail(h, "27.2.4", "\"host address-space size\" must be 1")


def test_27_2_4_32bit_host_outside_ia32e_mode_passes() -> None:
    """SDM 27.2.4: a processor outside IA-32e mode (IA32_EFER.LMA = 0) enters a 32-bit guest with
    "host address-space size" = 0."""
    passes(EntryHarness().use_protected_mode_32_guest().use_32bit_host())


def test_27_2_4_64bit_host_fields_on_a_processor_outside_ia32e_mode_vmfail_8() -> None:
    """SDM 27.2.4: outside IA-32e mode, "host address-space size" must be 0."""
    h = EntryHarness().use_protected_mode_32_guest().use_32bit_host()
    h.clear_bits(F.VM_EXIT_CONTROLS, X.LOAD_IA32_EFER)  # else 27.2.2's EFER.LMA rule fails first
    h.set_bits(F.VM_EXIT_CONTROLS, X.HOST_ADDR_SPACE_SIZE)
    host_fail(h, "27.2.4", "outside IA-32e mode")


def test_27_2_4_ia32e_mode_guest_on_a_processor_outside_ia32e_mode_vmfail_8() -> None:
    """SDM 27.2.4: outside IA-32e mode, "IA-32e mode guest" must be 0."""
    h = EntryHarness().use_32bit_host()
    host_fail(h, "27.2.4", "outside IA-32e mode")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("pcide", "host CR4.PCIDE must be 0"),
        ("rip", "host RIP bits 63:32 must be 0"),
    ],
)
def test_27_2_4_host_32bit_requirements_vmfail_8(change: str, match: str) -> None:
    """SDM 27.2.4: with "host address-space size" = 0, host CR4.PCIDE and RIP bits 63:32 are 0."""
    h = EntryHarness().use_protected_mode_32_guest().use_32bit_host()
    if change == "pcide":
        h.set_bits(F.HOST_CR4, Cr4.PCIDE)
    else:
        h.write(F.HOST_RIP, 1 << 32)
    host_fail(h, "27.2.4", match)


def test_27_2_4_host_32bit_requirements_ia32e_guest_clause() -> None:
    """SDM 27.2.4: "IA-32e mode guest" must be 0 when "host address-space size" is 0.  Through
    VMLAUNCH an earlier rule of 27.2.4 always reports it first (a processor in IA-32e mode needs
    the control 1, one outside needs the guest control 0), so the rule itself is called."""
    h = EntryHarness().use_protected_mode_32_guest().use_32bit_host()
    h.set_bits(F.VM_ENTRY_CONTROLS, E.IA32E_MODE)
    entry = entry_checks.EntryContext(VmcsRegion(h.memory, VMCS_REGION), h.profile, host_ia32e_mode=True)
    broken = host_32bit_requirements(entry)
    assert broken is not None and "\"IA-32e mode guest\" must be 0" in broken


def test_27_2_4_64bit_host_requires_cr4_pae_vmfail_8() -> None:
    h = EntryHarness()
    h.clear_bits(F.HOST_CR4, Cr4.PAE)
    host_fail(h, "27.2.4", "host CR4.PAE must be 1")


def test_27_2_4_64bit_host_rip_canonical_vmfail_8() -> None:
    h = EntryHarness()
    h.write(F.HOST_RIP, CANONICAL_HOLE)
    host_fail(h, "27.2.4", "host RIP must be canonical")


# =================================================================================================
# SDM 27.3.1.1 Guest control registers, debug registers and MSRs -> exit reason 33
# =================================================================================================
@pytest.mark.parametrize(
    ("guest", "cr0"),
    [
        pytest.param("64", 0x80050033 & ~int(Cr0.NE), id="NE=0"),
        pytest.param("64", 0x80050033 | (1 << 32), id="bit32"),
        pytest.param("64", 0x80050033 & ~int(Cr0.PE | Cr0.PG), id="PE=PG=0-without-unrestricted-guest"),
        pytest.param("real", 0x10, id="NE=0-unrestricted-guest"),
    ],
)
def test_27_3_1_1_guest_cr0_fixed_bits_exit_33(guest: str, cr0: int) -> None:
    h = EntryHarness()
    if guest == "real":
        h.use_real_mode_guest()
    h.write(F.GUEST_CR0, cr0)
    guest_fail(h, "27.3.1.1", "guest CR0 must not set any bit")


def test_27_3_1_1_guest_cr0_nw_cd_never_checked() -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_CR0, Cr0.NW | Cr0.CD)
    passes(h)


def test_27_3_1_1_guest_cr0_pg_requires_pe_exit_33() -> None:
    h = EntryHarness().use_real_mode_guest()
    h.set_bits(F.GUEST_CR0, Cr0.PG)
    guest_fail(h, "27.3.1.1", "guest CR0.PE must be 1 when CR0.PG is 1")


@pytest.mark.parametrize(
    "cr4", [pytest.param(int(Cr4.PAE), id="VMXE=0"), pytest.param(int(Cr4.PAE | Cr4.VMXE) | (1 << 12), id="LA57")]
)
def test_27_3_1_1_guest_cr4_fixed_bits_exit_33(cr4: int) -> None:
    h = EntryHarness()
    h.write(F.GUEST_CR4, cr4)
    guest_fail(h, "27.3.1.1", "guest CR4 must not set any bit")


def test_27_3_1_1_guest_debugctl_reserved_bits_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_IA32_DEBUGCTL, 1 << 3)
    guest_fail(h, "27.3.1.1", "IA32_DEBUGCTL: reserved bits")
    h = EntryHarness()
    h.clear_bits(F.VM_ENTRY_CONTROLS, E.LOAD_DEBUG_CONTROLS)
    h.write(F.GUEST_IA32_DEBUGCTL, 1 << 3)
    passes(h)


@pytest.mark.parametrize("clear", ["PG", "PAE"])
def test_27_3_1_1_ia32e_guest_requires_pg_and_pae_exit_33(clear: str) -> None:
    h = EntryHarness()
    if clear == "PAE":
        h.clear_bits(F.GUEST_CR4, Cr4.PAE)
    else:
        h.set_bits(F.SECONDARY_VM_EXEC_CONTROL, S.UNRESTRICTED_GUEST)  # else PG is a fixed bit
        h.clear_bits(F.GUEST_CR0, Cr0.PG)
    guest_fail(h, "27.3.1.1", "guest CR0.PG and CR4.PAE must each be 1")


def test_27_3_1_1_non_ia32e_guest_pcide_exit_33() -> None:
    h = EntryHarness().use_protected_mode_32_guest()
    h.set_bits(F.GUEST_CR4, Cr4.PCIDE)
    guest_fail(h, "27.3.1.1", "guest CR4.PCIDE must be 0")


def test_27_3_1_1_guest_cr3_beyond_physical_address_width_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_CR3, BEYOND_PHYS_WIDTH)
    guest_fail(h, "27.3.1.1", "guest CR3")


def test_27_3_1_1_guest_dr7_upper_bits_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_DR7, 0x400 | (1 << 32))
    guest_fail(h, "27.3.1.1", "guest DR7 bits 63:32")
    h = EntryHarness()
    h.clear_bits(F.VM_ENTRY_CONTROLS, E.LOAD_DEBUG_CONTROLS)
    h.write(F.GUEST_DR7, 0x400 | (1 << 32))
    passes(h)


@pytest.mark.parametrize(("field", "name"), [(F.GUEST_SYSENTER_ESP, "ESP"), (F.GUEST_SYSENTER_EIP, "EIP")])
def test_27_3_1_1_guest_sysenter_canonical_exit_33(field: F, name: str) -> None:
    h = EntryHarness()
    h.write(field, CANONICAL_HOLE)
    guest_fail(h, "27.3.1.1", f"guest IA32_SYSENTER_{name}")


@pytest.mark.parametrize("bad_type", [2, 3, 8])
def test_27_3_1_1_guest_pat_memory_types_exit_33(bad_type: int) -> None:
    h = EntryHarness()
    h.write(F.GUEST_IA32_PAT, (0x0007040600070406 & ~0xFF00) | (bad_type << 8))
    guest_fail(h, "27.3.1.1", "guest IA32_PAT")


def test_27_3_1_1_guest_efer_reserved_bits_exit_33() -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_IA32_EFER, 1 << 9)
    guest_fail(h, "27.3.1.1", "guest IA32_EFER: reserved bits")


def test_27_3_1_1_guest_efer_lma_equals_ia32e_mode_guest_exit_33() -> None:
    h = EntryHarness()
    h.clear_bits(F.GUEST_IA32_EFER, Efer.LMA)
    guest_fail(h, "27.3.1.1", "IA32_EFER.LMA must equal")
    h = EntryHarness().use_protected_mode_32_guest()
    h.write(F.GUEST_IA32_EFER, int(Efer.LMA | Efer.LME))
    guest_fail(h, "27.3.1.1", "IA32_EFER.LMA must equal")


def test_27_3_1_1_guest_efer_lme_equals_lma_with_paging_exit_33() -> None:
    h = EntryHarness().use_protected_mode_32_guest()
    h.write(F.GUEST_IA32_EFER, int(Efer.LME))
    guest_fail(h, "27.3.1.1", "IA32_EFER.LME must equal IA32_EFER.LMA")
    h = EntryHarness().use_real_mode_guest()  # CR0.PG = 0: LME is free
    h.write(F.GUEST_IA32_EFER, int(Efer.LME))
    passes(h)


# =================================================================================================
# SDM 27.3.1.2 Guest segment registers (table-driven) -> exit reason 33
# =================================================================================================
Mutation = Callable[[EntryHarness], object]


def _seg(name: str, **values: int) -> Mutation:
    def mutate(h: EntryHarness) -> None:
        for part, value in values.items():
            field = {"selector": "SELECTOR", "base": "BASE", "limit": "LIMIT", "ar": "AR_BYTES"}[part]
            h.write(F[f"GUEST_{name}_{field}"], value)

    return mutate


def _all(*mutations: Mutation) -> Mutation:
    def mutate(h: EntryHarness) -> None:
        for m in mutations:
            m(h)

    return mutate


def _guest(kind: str) -> EntryHarness:
    h = EntryHarness()
    if kind == "real":
        h.use_real_mode_guest()
    elif kind == "pm32":
        h.use_protected_mode_32_guest()
    elif kind == "v8086":
        h.use_v8086_guest()
    return h


_LDTR_USABLE = _seg("LDTR", selector=0x28, base=0xFFFFFE0000004000, limit=0xFFF, ar=AR_LDT)
_USER_CS64 = _seg("CS", selector=0x33, ar=AR_CODE64 | (3 << 5))
_USER_SS64 = _seg("SS", selector=0x2B, ar=AR_DATA32 | (3 << 5))

# (id, guest, mutation, expected rule text or None for "passes")
SEGMENT_CASES: list[tuple[str, str, Mutation, str | None]] = [
    # Selector fields.
    ("tr_ti", "64", _seg("TR", selector=0x44), "guest TR selector: TI"),
    ("ldtr_ti", "64", _all(_LDTR_USABLE, _seg("LDTR", selector=0x2C)), "guest LDTR selector: TI"),
    ("ldtr_ti_unusable_ok", "64", _seg("LDTR", selector=0x2C), None),
    ("ss_rpl_ne_cs_rpl", "64", _seg("SS", selector=0x1B), "SS selector RPL must equal CS selector RPL"),
    ("ss_rpl_ne_cs_rpl_unrestricted_ok", "real", _seg("SS", selector=0x3), None),
    ("user_mode_64_ok", "64", _all(_USER_CS64, _USER_SS64), None),
    # Base-address fields.
    ("v8086_cs_base", "v8086", _seg("CS", base=0x10001), "guest CS base must be the selector shifted left 4 bits"),
    ("v8086_gs_base", "v8086", _seg("GS", base=0x10), "guest GS base must be the selector shifted left 4 bits"),
    ("tr_base_canonical", "64", _seg("TR", base=CANONICAL_HOLE), "guest TR base must be canonical"),
    ("fs_base_canonical", "64", _seg("FS", base=CANONICAL_HOLE), "guest FS base must be canonical"),
    ("gs_base_canonical", "64", _seg("GS", base=CANONICAL_HOLE), "guest GS base must be canonical"),
    ("gs_base_canonical_even_unusable", "64", _seg("GS", base=CANONICAL_HOLE, ar=AR_UNUSABLE), "guest GS base must be canonical"),
    ("ldtr_base_canonical", "64", _all(_LDTR_USABLE, _seg("LDTR", base=CANONICAL_HOLE)), "guest LDTR base must be canonical"),
    ("ldtr_base_unusable_ok", "64", _seg("LDTR", base=CANONICAL_HOLE), None),
    ("cs_base_upper", "64", _seg("CS", base=1 << 32), "guest CS base bits 63:32"),
    ("ss_base_upper", "64", _seg("SS", base=1 << 32), "guest SS base bits 63:32"),
    ("ds_base_upper", "64", _seg("DS", base=1 << 32), "guest DS base bits 63:32"),
    ("es_base_upper", "64", _seg("ES", base=1 << 32), "guest ES base bits 63:32"),
    ("ds_base_upper_unusable_ok", "64", _seg("DS", base=1 << 32, ar=AR_UNUSABLE), None),
    # Limit fields.
    ("v8086_ss_limit", "v8086", _seg("SS", limit=0xFFFFF), "guest SS limit must be 0000FFFFH"),
    # Access rights: virtual-8086.
    ("v8086_ds_ar", "v8086", _seg("DS", ar=0xF2), "guest DS access rights must be 000000F3H"),
    ("v8086_cs_ar", "v8086", _seg("CS", ar=0xFB), "guest CS access rights must be 000000F3H"),
    # Access rights: type.
    ("cs_type_data", "64", _seg("CS", ar=AR_DATA32), "guest CS type must be 9, 11, 13 or 15"),
    ("cs_type_unaccessed", "64", _seg("CS", ar=AR_CODE64 & ~1), "guest CS type must be 9, 11, 13 or 15"),
    ("cs_type_3_unrestricted_ok", "real", _seg("CS", ar=AR_DATA16), None),
    ("cs_type_conforming_ok", "64", _seg("CS", ar=AR_CODE64 | 4), None),
    ("ss_type_code", "64", _seg("SS", ar=AR_DATA32 | 8), "guest SS type must be 3 or 7"),
    ("ss_type_read_only", "64", _seg("SS", ar=AR_DATA32 & ~2), "guest SS type must be 3 or 7"),
    ("ss_type_expand_down_ok", "64", _seg("SS", ar=AR_DATA32 | 4), None),
    ("ss_unusable_ok", "64", _seg("SS", selector=0, ar=AR_UNUSABLE), None),
    ("ds_unaccessed", "64", _seg("DS", ar=AR_DATA32 & ~1), "guest DS type bit 0 (accessed)"),
    ("fs_unaccessed", "64", _seg("FS", ar=AR_DATA32 & ~1), "guest FS type bit 0 (accessed)"),
    ("es_exec_only_code", "64", _seg("ES", ar=(AR_DATA32 & ~0xF) | 9), "guest ES: a code segment must be readable"),
    ("gs_readable_code_ok", "64", _seg("GS", ar=(AR_DATA32 & ~0xF) | 11), None),
    ("ds_unusable_garbage_ok", "64", _seg("DS", ar=AR_UNUSABLE | 0x0F00 | 0x2), None),
    # Access rights: S.
    ("cs_s_clear", "64", _seg("CS", ar=AR_CODE64 & ~0x10), "guest CS access rights: S (bit 4)"),
    ("gs_s_clear", "64", _seg("GS", ar=AR_DATA32 & ~0x10), "guest GS access rights: S (bit 4)"),
    # Access rights: DPL.
    ("cs_type3_dpl", "real", _seg("CS", ar=AR_DATA16 | (1 << 5)), "guest CS DPL must be 0 when CS type is 3"),
    ("cs_nonconforming_dpl", "64", _seg("CS", ar=AR_CODE64 | (3 << 5)), "guest CS DPL must equal SS DPL"),
    ("cs_conforming_dpl", "64", _all(_USER_CS64, _USER_SS64, _seg("CS", selector=0x33, ar=AR_CODE64 | 4 | (3 << 5)), _seg("SS", ar=AR_DATA32 | (2 << 5), selector=0x2B)), "guest CS DPL must not be greater than SS DPL"),
    ("cs_conforming_lower_dpl_ok", "64", _all(_USER_SS64, _seg("CS", selector=0x33, ar=AR_CODE64 | 4)), None),
    ("ss_dpl_ne_rpl", "64", _all(_seg("CS", ar=AR_CODE64 | 4), _seg("SS", ar=AR_DATA32 | (3 << 5))), "guest SS DPL must equal SS selector RPL"),
    ("ss_dpl_real_mode", "real", _all(_seg("CS", ar=AR_CODE16 | 4), _seg("SS", ar=AR_DATA16 | (3 << 5))), "guest SS DPL must be 0 when CS type is 3 or CR0.PE is 0"),
    ("ss_dpl_cs_type3", "real", _all(lambda h: h.set_bits(F.GUEST_CR0, Cr0.PE), _seg("CS", ar=AR_DATA16), _seg("SS", selector=3, ar=AR_DATA16 | (3 << 5))), "guest SS DPL must be 0 when CS type is 3"),
    ("ss_dpl_ne_rpl_unrestricted_ok", "real", _all(lambda h: h.set_bits(F.GUEST_CR0, Cr0.PE), _seg("CS", ar=AR_CODE16 | (3 << 5)), _seg("SS", ar=AR_DATA16 | (3 << 5))), None),
    ("ds_dpl_below_rpl", "64", _seg("DS", selector=0x1B), "guest DS DPL must not be less than its selector RPL"),
    ("fs_dpl_below_rpl_conforming_ok", "64", _seg("FS", selector=0x1B, ar=(AR_DATA32 & ~0xF) | 15), None),
    ("ds_dpl_below_rpl_unrestricted_ok", "real", _seg("DS", selector=0x3), None),
    # Access rights: P.
    ("cs_not_present", "64", _seg("CS", ar=AR_CODE64 & ~0x80), "guest CS access rights: P (bit 7)"),
    ("es_not_present", "64", _seg("ES", ar=AR_DATA32 & ~0x80), "guest ES access rights: P (bit 7)"),
    # Access rights: reserved bits 11:8.
    ("ss_reserved_11_8", "64", _seg("SS", ar=AR_DATA32 | 0x100), "guest SS access rights: reserved bits 11:8"),
    ("cs_reserved_11_8", "64", _seg("CS", ar=AR_CODE64 | 0x800), "guest CS access rights: reserved bits 11:8"),
    # Access rights: D/B with L.
    ("cs_l_and_db", "64", _seg("CS", ar=AR_CODE64 | 0x4000), "guest CS D/B must be 0 when CS.L is 1"),
    ("cs_l_and_db_outside_ia32e_ok", "pm32", _seg("CS", ar=AR_CODE32 | 0x2000), None),
    # Access rights: G vs limit.
    ("ds_g_with_low_limit", "64", _seg("DS", limit=0xFFFFF000), "guest DS limit and G are inconsistent"),
    ("cs_no_g_with_high_limit", "pm32", _seg("CS", ar=AR_CODE32 & ~0x8000), "guest CS limit and G are inconsistent"),
    ("ss_byte_granular_ok", "pm32", _seg("SS", limit=0xFFFFF, ar=AR_DATA32 & ~0x8000), None),
    # Access rights: reserved bits 31:17.
    ("gs_reserved_31_17", "64", _seg("GS", ar=AR_DATA32 | (1 << 17)), "guest GS access rights: reserved bits 31:17"),
    ("cs_reserved_31_17", "64", _seg("CS", ar=AR_CODE64 | (1 << 31)), "guest CS access rights: reserved bits 31:17"),
    # TR.
    ("tr_type_16bit_in_ia32e", "64", _seg("TR", ar=(AR_TSS_BUSY & ~0xF) | 3), "guest TR type must be 11 (busy 64-bit TSS) in IA-32e mode"),
    ("tr_type_16bit_outside_ia32e_ok", "pm32", _seg("TR", ar=(AR_TSS_BUSY & ~0xF) | 3), None),
    ("tr_type_available", "pm32", _seg("TR", ar=(AR_TSS_BUSY & ~0xF) | 9), "guest TR type must be 3 (busy 16-bit TSS) or 11"),
    ("tr_s_set", "64", _seg("TR", ar=AR_TSS_BUSY | 0x10), "guest TR access rights: S (bit 4) must be 0"),
    ("tr_not_present", "64", _seg("TR", ar=AR_TSS_BUSY & ~0x80), "guest TR access rights: P (bit 7) must be 1"),
    ("tr_reserved_11_8", "64", _seg("TR", ar=AR_TSS_BUSY | 0x200), "guest TR access rights: reserved bits 11:8"),
    ("tr_limit_g", "64", _seg("TR", ar=AR_TSS_BUSY | 0x8000), "guest TR limit and G are inconsistent"),
    ("tr_unusable", "64", _seg("TR", ar=AR_TSS_BUSY | AR_UNUSABLE), "guest TR must be usable"),
    ("tr_reserved_31_17", "64", _seg("TR", ar=AR_TSS_BUSY | (1 << 20)), "guest TR access rights: reserved bits 31:17"),
    # LDTR.
    ("ldtr_usable_ok", "64", _LDTR_USABLE, None),
    ("ldtr_type", "64", _all(_LDTR_USABLE, _seg("LDTR", ar=(AR_LDT & ~0xF) | 3)), "guest LDTR type must be 2"),
    ("ldtr_s_set", "64", _all(_LDTR_USABLE, _seg("LDTR", ar=AR_LDT | 0x10)), "guest LDTR access rights: S (bit 4)"),
    ("ldtr_not_present", "64", _all(_LDTR_USABLE, _seg("LDTR", ar=AR_LDT & ~0x80)), "guest LDTR access rights: P (bit 7)"),
    ("ldtr_reserved_11_8", "64", _all(_LDTR_USABLE, _seg("LDTR", ar=AR_LDT | 0x400)), "guest LDTR access rights: reserved bits 11:8"),
    ("ldtr_limit_g", "64", _all(_LDTR_USABLE, _seg("LDTR", limit=0x100000)), "guest LDTR limit and G are inconsistent"),
    ("ldtr_reserved_31_17", "64", _all(_LDTR_USABLE, _seg("LDTR", ar=AR_LDT | (1 << 17))), "guest LDTR access rights: reserved bits 31:17"),
    ("ldtr_unusable_garbage_ok", "64", _seg("LDTR", ar=AR_UNUSABLE | 0x1F | 0xF00), None),
]


@pytest.mark.parametrize(("guest", "mutate", "rule"), [c[1:] for c in SEGMENT_CASES], ids=[c[0] for c in SEGMENT_CASES])
def test_27_3_1_2_guest_segment_registers(guest: str, mutate: Mutation, rule: str | None) -> None:
    h = _guest(guest)
    mutate(h)
    if rule is None:
        passes(h)
    else:
        guest_fail(h, "27.3.1.2", rule)


@pytest.mark.parametrize("name", ["ES", "CS", "SS", "DS", "FS", "GS"])
@pytest.mark.parametrize("part", ["base", "limit", "ar"])
def test_27_3_1_2_v8086_segment_fields_exit_33(name: str, part: str) -> None:
    h = EntryHarness().use_v8086_guest()
    value = {"base": 0x123450, "limit": 0xFFFE, "ar": 0x93}[part]
    _seg(name, **{part: value})(h)
    match = {"base": "base must be the selector shifted", "limit": "limit must be 0000FFFFH", "ar": "access rights must be 000000F3H"}[part]
    guest_fail(h, "27.3.1.2", f"guest {name} {match}")


# =================================================================================================
# SDM 27.3.1.3 Guest descriptor-table registers -> exit reason 33
# =================================================================================================
@pytest.mark.parametrize("name", ["GDTR", "IDTR"])
def test_27_3_1_3_descriptor_table_bases_canonical_exit_33(name: str) -> None:
    h = EntryHarness()
    h.write(F[f"GUEST_{name}_BASE"], CANONICAL_HOLE)
    guest_fail(h, "27.3.1.3", f"guest {name} base must be canonical")


@pytest.mark.parametrize("name", ["GDTR", "IDTR"])
def test_27_3_1_3_descriptor_table_limits_bits_31_16_exit_33(name: str) -> None:
    h = EntryHarness()
    h.write(F[f"GUEST_{name}_LIMIT"], 0x10000)
    guest_fail(h, "27.3.1.3", f"guest {name} limit bits 31:16")


# =================================================================================================
# SDM 27.3.1.4 Guest RIP and RFLAGS -> exit reason 33
# =================================================================================================
def test_27_3_1_4_rip_upper_bits_outside_64bit_code_exit_33() -> None:
    h = EntryHarness().use_protected_mode_32_guest()
    h.write(F.GUEST_RIP, 1 << 32)
    guest_fail(h, "27.3.1.4", "guest RIP bits 63:32")
    h = EntryHarness()  # compatibility mode: IA-32e mode guest, CS.L = 0
    _seg("CS", ar=AR_CODE32)(h)
    guest_fail(h, "27.3.1.4", "guest RIP bits 63:32")


@pytest.mark.parametrize("rip", [CANONICAL_HOLE, 0xFFFF7FFFFFFFFFFF, 0x0000FFFFFFFFFFFF, 0xFFFF000000000000])
def test_27_3_1_4_rip_linear_address_width_bits_63_48_identical_passes(rip: int) -> None:
    """SDM 27.3.1.4: with N = 48 linear-address bits, RIP bits 63:N (not 63:N-1) must be identical
    in 64-bit code: 0000_8000_0000_0000H is not canonical but is a valid entry state (the guest
    faults on its first fetch; kvm-unit-tests' hypercall test relies on it)."""
    h = EntryHarness()
    h.write(F.GUEST_RIP, rip)
    passes(h)


@pytest.mark.parametrize("rip", [1 << 48, 0x8000000000000000, 0xFFFE000000000000, 0x7FFF800000000000])
def test_27_3_1_4_rip_linear_address_width_bits_63_48_differ_exit_33(rip: int) -> None:
    """SDM 27.3.1.4: RIP bits 63:48 not all equal in 64-bit code fails the entry."""
    h = EntryHarness()
    h.write(F.GUEST_RIP, rip)
    guest_fail(h, "27.3.1.4", "guest RIP bits 63:N")


def test_27_3_1_4_rip_linear_address_width_follows_the_profile() -> None:
    """SDM 27.3.1.4 with N = 57 (5-level paging): bits 63:57 must be identical; bit 56 may differ."""
    h = EntryHarness(dataclasses.replace(CpuProfile(), linear_address_width=57))
    h.write(F.GUEST_RIP, 1 << 56)
    passes(h)
    h = EntryHarness(dataclasses.replace(CpuProfile(), linear_address_width=57))
    h.write(F.GUEST_RIP, 1 << 57)
    guest_fail(h, "27.3.1.4", "guest RIP bits 63:N")


def test_27_3_1_4_rip_upper_bits_not_checked_in_compatibility_mode_beyond_bit_32() -> None:
    """SDM 27.3.1.4: outside 64-bit code only bits 63:32 are checked (0 required)."""
    h = EntryHarness()
    _seg("CS", ar=AR_CODE32)(h)
    h.write(F.GUEST_RIP, 0xFFFFFFFF)
    passes(h)


@pytest.mark.parametrize("bit", [3, 5, 15, 22, 31, 63])
def test_27_3_1_4_rflags_reserved_bits_exit_33(bit: int) -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, 1 << bit)
    guest_fail(h, "27.3.1.4", "guest RFLAGS reserved bits")


def test_27_3_1_4_rflags_bit_1_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_RFLAGS, 0)
    guest_fail(h, "27.3.1.4", "guest RFLAGS reserved bit 1 must be 1")


def test_27_3_1_4_rflags_vm_in_ia32e_mode_exit_33() -> None:
    h = EntryHarness()
    for name in ("ES", "CS", "SS", "DS", "FS", "GS"):
        _seg(name, selector=0, base=0, limit=0xFFFF, ar=0xF3)(h)
    h.write(F.GUEST_RIP, 0x100)
    h.write(F.GUEST_RFLAGS, 0x2 | RFLAGS_VM)
    guest_fail(h, "27.3.1.4", "guest RFLAGS.VM must be 0")


def test_27_3_1_4_rflags_vm_with_cr0_pe_0_exit_33() -> None:
    h = EntryHarness().use_real_mode_guest()
    for name in ("ES", "CS", "SS", "DS", "FS", "GS"):
        _seg(name, selector=0, base=0, limit=0xFFFF, ar=0xF3)(h)
    h.write(F.GUEST_RFLAGS, 0x2 | RFLAGS_VM)
    guest_fail(h, "27.3.1.4", "guest RFLAGS.VM must be 0")


def test_27_3_1_4_rflags_if_for_external_interrupt_injection_exit_33() -> None:
    h = EntryHarness()
    h.inject(EXT_INTR, 0x20)
    guest_fail(h, "27.3.1.4", "guest RFLAGS.IF must be 1 when injecting an external interrupt")
    h = EntryHarness()
    h.inject(EXT_INTR, 0x20)
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF)
    passes(h)


# =================================================================================================
# SDM 27.3.1.5 Guest non-register state -> exit reason 33
# =================================================================================================
def test_27_3_1_5_activity_state_out_of_range_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_ACTIVITY_STATE, 4)
    guest_fail(h, "27.3.1.5", "activity state must be 0-3")


@pytest.mark.parametrize("state", [HLT, SHUTDOWN, WAIT_SIPI])
def test_27_3_1_5_activity_state_not_supported_exit_33(state: int) -> None:
    h = EntryHarness(dataclasses.replace(CpuProfile(), activity_states=0))
    h.write(F.GUEST_ACTIVITY_STATE, state)
    guest_fail(h, "27.3.1.5", "supported by IA32_VMX_MISC")


@pytest.mark.parametrize("state", [HLT, SHUTDOWN, WAIT_SIPI])
def test_27_3_1_5_supported_activity_states_launch(state: int) -> None:
    h = EntryHarness()
    h.write(F.GUEST_ACTIVITY_STATE, state)
    passes(h)


def test_27_3_1_5_hlt_requires_ss_dpl_0_exit_33() -> None:
    h = EntryHarness()
    _all(_USER_CS64, _USER_SS64)(h)
    h.write(F.GUEST_ACTIVITY_STATE, HLT)
    guest_fail(h, "27.3.1.5", "must not be HLT when SS DPL is not 0")


@pytest.mark.parametrize("blocking", [BLOCK_STI, BLOCK_MOV_SS])
@pytest.mark.parametrize("state", [HLT, SHUTDOWN])
def test_27_3_1_5_active_state_required_with_sti_or_mov_ss_blocking_exit_33(blocking: int, state: int) -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF)
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, blocking)
    h.write(F.GUEST_ACTIVITY_STATE, state)
    guest_fail(h, "27.3.1.5", "activity state must be active when there is blocking by STI or by MOV SS")


@pytest.mark.parametrize(
    ("state", "kind", "vector", "error_code", "allowed"),
    [
        (HLT, EXT_INTR, 0x20, None, True),
        (HLT, NMI, 2, None, True),
        (HLT, HW_EXCEPTION, 1, None, True),  # #DB
        (HLT, HW_EXCEPTION, 18, None, True),  # #MC
        (HLT, OTHER_EVENT, 0, None, True),  # pending MTF VM exit
        (HLT, HW_EXCEPTION, 6, None, False),  # #UD
        (HLT, HW_EXCEPTION, 13, 0, False),  # #GP
        (HLT, SW_INTR, 0x80, None, False),
        (HLT, SW_EXCEPTION, 3, None, False),
        (SHUTDOWN, NMI, 2, None, True),
        (SHUTDOWN, HW_EXCEPTION, 18, None, True),
        (SHUTDOWN, EXT_INTR, 0x20, None, False),
        (SHUTDOWN, HW_EXCEPTION, 1, None, False),
        (SHUTDOWN, OTHER_EVENT, 0, None, False),
        (WAIT_SIPI, NMI, 2, None, False),
        (WAIT_SIPI, HW_EXCEPTION, 18, None, False),
        (WAIT_SIPI, EXT_INTR, 0x20, None, False),
    ],
)
def test_27_3_1_5_injection_allowed_by_activity_state_exit_33(
    state: int, kind: int, vector: int, error_code: int | None, allowed: bool
) -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF)
    h.write(F.GUEST_ACTIVITY_STATE, state)
    h.inject(kind, vector, error_code, length=2)
    if allowed:
        passes(h)
    else:
        guest_fail(h, "27.3.1.5", "the injected event must be one the")


@pytest.mark.parametrize("bit", [5, 8, 31])
def test_27_3_1_5_interruptibility_reserved_bits_exit_33(bit: int) -> None:
    h = EntryHarness()
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, 1 << bit)
    guest_fail(h, "27.3.1.5", "interruptibility state: reserved bits 31:5")


def test_27_3_1_5_interruptibility_sti_and_mov_ss_exit_33() -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF)
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, BLOCK_STI | BLOCK_MOV_SS)
    guest_fail(h, "27.3.1.5", "blocking by STI and by MOV SS cannot both be 1")


def test_27_3_1_5_interruptibility_sti_requires_if_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, BLOCK_STI)
    guest_fail(h, "27.3.1.5", "blocking by STI must be 0 when RFLAGS.IF is 0")
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF)
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, BLOCK_STI)
    passes(h)


@pytest.mark.parametrize("blocking", [BLOCK_STI, BLOCK_MOV_SS])
def test_27_3_1_5_interruptibility_external_interrupt_injection_exit_33(blocking: int) -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF)
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, blocking)
    h.inject(EXT_INTR, 0x20)
    guest_fail(h, "27.3.1.5", "must be 0 when injecting an external interrupt")


def test_27_3_1_5_interruptibility_nmi_injection_mov_ss_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, BLOCK_MOV_SS)
    h.inject(NMI, 2)
    guest_fail(h, "27.3.1.5", "blocking by MOV SS must be 0 when injecting an NMI")


def test_27_3_1_5_interruptibility_smi_blocking_outside_smm_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, BLOCK_SMI)
    guest_fail(h, "27.3.1.5", "blocking by SMI must be 0 outside SMM")


def test_27_3_1_5_interruptibility_nmi_injection_sti_blocking_exit_33_qualification_3() -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF)
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, BLOCK_STI)
    h.inject(NMI, 2)
    guest_fail(h, "27.3.1.5", "blocking by STI must be 0 when injecting an NMI", qualification=3)


def test_27_3_1_5_interruptibility_nmi_injection_virtual_nmi_blocking_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, BLOCK_NMI)
    h.inject(NMI, 2)
    guest_fail(h, "27.3.1.5", "blocking by NMI must be 0 when injecting an NMI")


def test_27_3_1_5_interruptibility_nmi_blocking_allowed_without_virtual_nmis() -> None:
    h = EntryHarness()
    h.clear_bits(F.PIN_BASED_VM_EXEC_CONTROL, P.VIRTUAL_NMIS)
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, BLOCK_NMI)
    h.inject(NMI, 2)
    passes(h)


def test_27_3_1_5_interruptibility_enclave_interruption_exit_33() -> None:
    h = EntryHarness()
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, ENCLAVE_INTR)
    guest_fail(h, "27.3.1.5", "enclave interruption (bit 4)")


@pytest.mark.parametrize("bit", [4, 11, 13, 15, 16, 63])
def test_27_3_1_5_pending_debug_exceptions_reserved_bits_exit_33(bit: int) -> None:
    h = EntryHarness()
    h.write(F.GUEST_PENDING_DBG_EXCEPTIONS, 1 << bit)
    guest_fail(h, "27.3.1.5", "pending debug exceptions: bits 11:4, 13, 15 and 63:16")


def test_27_3_1_5_pending_debug_exceptions_b0_b3_and_enabled_breakpoint_ok() -> None:
    h = EntryHarness()
    h.write(F.GUEST_PENDING_DBG_EXCEPTIONS, 0xF | (1 << 12))
    passes(h)


@pytest.mark.parametrize(("blocking", "state"), [(BLOCK_STI, ACTIVE), (BLOCK_MOV_SS, ACTIVE), (0, HLT)])
def test_27_3_1_5_pending_debug_bs_must_be_set_for_single_step_exit_33(blocking: int, state: int) -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF | RFLAGS_TF)
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, blocking)
    h.write(F.GUEST_ACTIVITY_STATE, state)
    guest_fail(h, "27.3.1.5", "BS must be 1 when RFLAGS.TF = 1 and IA32_DEBUGCTL.BTF = 0")
    h.write(F.GUEST_PENDING_DBG_EXCEPTIONS, PENDING_BS)
    passes(h)


@pytest.mark.parametrize("case", ["tf_clear", "btf_set"])
def test_27_3_1_5_pending_debug_bs_must_be_clear_exit_33(case: str) -> None:
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_IF)
    if case == "btf_set":
        h.set_bits(F.GUEST_RFLAGS, RFLAGS_TF)
        h.write(F.GUEST_IA32_DEBUGCTL, 1 << 1)
    h.write(F.GUEST_INTERRUPTIBILITY_INFO, BLOCK_STI)
    h.write(F.GUEST_PENDING_DBG_EXCEPTIONS, PENDING_BS)
    guest_fail(h, "27.3.1.5", "BS must be 0 when RFLAGS.TF = 0 or IA32_DEBUGCTL.BTF = 1")


def test_27_3_1_5_pending_debug_bs_unchecked_without_blocking_or_hlt() -> None:
    h = EntryHarness()
    h.write(F.GUEST_PENDING_DBG_EXCEPTIONS, PENDING_BS)
    passes(h)
    h = EntryHarness()
    h.set_bits(F.GUEST_RFLAGS, RFLAGS_TF)
    passes(h)


@pytest.mark.parametrize(
    ("link", "prepare", "match"),
    [
        (OTHER_VMCS | 0x800, None, "bits 11:0 must be 0"),
        (BEYOND_PHYS_WIDTH | OTHER_VMCS, None, "bits beyond the physical-address width"),
        (0x20000, None, "VMCS revision identifier"),  # zeroed memory: revision 0
        (MEMORY_SIZE, None, "VMCS revision identifier"),  # no memory there: reads all ones
        (OTHER_VMCS, "shadow", "bit 31 of the referenced VMCS"),
        (VMCS_REGION, None, "must not be the current-VMCS pointer"),
    ],
)
def test_27_3_1_5_vmcs_link_pointer_exit_33_qualification_4(link: int, prepare: str | None, match: str) -> None:
    h = EntryHarness()
    if prepare == "shadow":
        h.memory.write32(OTHER_VMCS, h.profile.revision_id | (1 << 31))
    h.write(F.VMCS_LINK_POINTER, link)
    failure = guest_fail(h, "27.3.1.5", match, qualification=4)
    assert "VMCS link pointer" in failure.rule


def test_27_3_1_5_vmcs_link_pointer_to_another_valid_vmcs_launches() -> None:
    h = EntryHarness()
    h.write(F.VMCS_LINK_POINTER, OTHER_VMCS)
    passes(h)


# =================================================================================================
# SDM 27.3.1.6 Guest PDPTEs -> exit reason 33, qualification 2
# =================================================================================================
@pytest.mark.parametrize("bad", [1 << 1, 1 << 2, 1 << 5, 1 << 8, 1 << 46, 1 << 63])
@pytest.mark.parametrize("pdpte", [0, 3])
def test_27_3_1_6_pdpte_fields_with_ept_exit_33_qualification_2(bad: int, pdpte: int) -> None:
    h = EntryHarness().use_protected_mode_32_guest(pae=True)
    h.write(F[f"GUEST_PDPTR{pdpte}"], 0x102000 | 1 | bad)
    guest_fail(h, "27.3.1.6", f"guest PDPTE{pdpte} field", qualification=2)


def test_27_3_1_6_pdpte_fields_not_present_are_not_checked() -> None:
    h = EntryHarness().use_protected_mode_32_guest(pae=True)
    h.write(F.GUEST_PDPTR1, 0xFFFFFFFFFFFFFFFE)
    passes(h)


@pytest.mark.parametrize("bad", [1 << 1, 1 << 6, 1 << 46, 1 << 63])
def test_27_3_1_6_pdptes_from_memory_without_ept_exit_33_qualification_2(bad: int) -> None:
    h = EntryHarness().use_protected_mode_32_guest(pae=True).without_ept()
    h.memory.write64(GUEST_PAE_PDPT + 16, 0x103000 | 1 | bad)
    guest_fail(h, "27.3.1.6", "PDPTE2 loaded from guest CR3", qualification=2)


def test_27_3_1_6_pdpte_table_address_is_cr3_bits_31_5() -> None:
    h = EntryHarness().use_protected_mode_32_guest(pae=True).without_ept()
    h.memory.write64(GUEST_PAE_PDPT + 0x20, 0x103000 | 1 | (1 << 2))  # a bad PDPT 32 bytes on
    h.write(F.GUEST_CR3, GUEST_PAE_PDPT + 0x20 + 0x18)  # bits 4:0 ignored
    guest_fail(h, "27.3.1.6", "PDPTE0 loaded from guest CR3", qualification=2)


def test_27_3_1_6_pdptes_beyond_memory_read_as_all_ones() -> None:
    h = EntryHarness().use_protected_mode_32_guest(pae=True).without_ept()
    h.write(F.GUEST_CR3, MEMORY_SIZE)
    guest_fail(h, "27.3.1.6", "PDPTE0 loaded from guest CR3", qualification=2)


def test_27_3_1_6_pdptes_unchecked_outside_pae_paging() -> None:
    h = EntryHarness().use_protected_mode_32_guest().without_ept()  # 2-level paging
    h.memory.write64(GUEST_PAE_PDPT, 0xFFFFFFFFFFFFFFFF)
    h.write(F.GUEST_CR3, GUEST_PAE_PDPT)
    passes(h)
    h = EntryHarness()  # 4-level paging: the PDPTE fields are not used
    h.write(F.GUEST_PDPTR0, 0xFFFFFFFFFFFFFFFF)
    passes(h)


# =================================================================================================
# SDM 27.4 Loading MSRs -> exit reason 34, qualification = entry number
# =================================================================================================
def test_27_4_msr_load_list_is_handed_to_the_engine() -> None:
    h = EntryHarness()
    h.write_msr_load_list([(Msr.IA32_SYSENTER_CS, 0, 0x10), (Msr.EFER, 0, 0xD01), (Msr.KERNEL_GS_BASE, 0, 0x1234)])
    passes(h)
    assert h.processor.entry_msr_loads == [(Msr.IA32_SYSENTER_CS, 0x10), (Msr.EFER, 0xD01), (Msr.KERNEL_GS_BASE, 0x1234)]


def test_27_4_msr_load_list_is_replaced_on_every_entry() -> None:
    h = EntryHarness()
    h.write_msr_load_list([(Msr.IA32_SYSENTER_CS, 0, 0x10)])
    passes(h)
    first = h.processor.entry_msr_loads
    assert h.processor.vmclear(VMCS_REGION).succeeded and h.processor.vmptrld(VMCS_REGION).succeeded
    h.write(F.VM_ENTRY_MSR_LOAD_COUNT, 0)
    passes(h)
    assert h.processor.entry_msr_loads == [] and first == [(Msr.IA32_SYSENTER_CS, 0x10)]


@pytest.mark.parametrize("index", [Msr.FS_BASE, Msr.GS_BASE])
def test_27_4_fs_gs_base_cannot_be_loaded_exit_34(index: int) -> None:
    h = EntryHarness()
    h.write_msr_load_list([(Msr.IA32_SYSENTER_CS, 0, 0), (index, 0, 0)])
    msr_fail(h, 2, "IA32_FS_BASE and IA32_GS_BASE")
    assert h.processor.entry_msr_loads == [(Msr.IA32_SYSENTER_CS, 0)]


@pytest.mark.parametrize("index", [0x800, 0x808, 0x830, 0x8FF])
def test_27_4_x2apic_msrs_cannot_be_loaded_exit_34(index: int) -> None:
    h = EntryHarness()
    h.write_msr_load_list([(index, 0, 0)])
    msr_fail(h, 1, "x2APIC MSRs")


def test_27_4_smm_monitor_ctl_cannot_be_loaded_exit_34() -> None:
    h = EntryHarness()
    h.write_msr_load_list([(Msr.IA32_SYSENTER_CS, 0, 0)] * 2 + [(0x9B, 0, 0)])
    msr_fail(h, 3, "IA32_SMM_MONITOR_CTL")


def test_27_4_reserved_bits_63_32_exit_34() -> None:
    h = EntryHarness()
    h.write_msr_load_list([(Msr.IA32_SYSENTER_CS, 1, 0)])
    msr_fail(h, 1, "bits 63:32")


def test_27_4_efer_reserved_bits_would_gp_exit_34() -> None:
    h = EntryHarness()
    h.write_msr_load_list([(Msr.EFER, 0, 0xD01 | (1 << 12))])
    msr_fail(h, 1, "IA32_EFER")


def test_27_4_msr_count_beyond_recommended_maximum_exit_34() -> None:
    h = EntryHarness()
    limit = entry_checks.max_msr_list_entries(h.profile)
    assert limit == 512  # IA32_VMX_MISC[27:25] = 0
    h.write_msr_load_list([(Msr.IA32_SYSENTER_CS, 0, 0)] * (limit + 1))
    msr_fail(h, limit + 1, "512 * (IA32_VMX_MISC[27:25] + 1)")
    assert len(h.processor.entry_msr_loads) == limit


def test_27_4_msr_entry_beyond_memory_exit_34() -> None:
    h = EntryHarness()
    h.memory.write64(MEMORY_SIZE - 16, Msr.IA32_SYSENTER_CS)
    h.write(F.VM_ENTRY_MSR_LOAD_ADDR, MEMORY_SIZE - 16)
    h.write(F.VM_ENTRY_MSR_LOAD_COUNT, 2)
    msr_fail(h, 2, "outside physical memory")


# =================================================================================================
# What a failed VM entry leaves behind (SDM 27.8, 31.3)
# =================================================================================================
def _break_guest_state(h: EntryHarness) -> None:
    h.write(F.GUEST_RFLAGS, 0)


def _break_msr_loading(h: EntryHarness) -> None:
    h.write_msr_load_list([(Msr.FS_BASE, 0, 0)])


@pytest.mark.parametrize("breaker", [_break_guest_state, _break_msr_loading], ids=["guest-state", "msr-loading"])
def test_27_8_failed_entry_loads_host_state_and_leaves_launch_state_clear(breaker: Callable[[EntryHarness], None]) -> None:
    h = EntryHarness()
    breaker(h)
    h.processor.host.rip = 0
    result = h.launch()
    assert result.status is VmxStatus.VM_EXIT and result.exit is not None and result.exit.failed_vmentry
    assert h.processor.host.rip == HOST_RIP
    assert h.processor.host.rsp == h.read(F.HOST_RSP)
    assert h.processor.host.cr3 == h.read(F.HOST_CR3)
    # The launch state is still "clear": VMRESUME refuses it, VMLAUNCH fails the same way again.
    assert h.resume().error == 5  # VMRESUME with non-launched VMCS
    again = h.launch()
    assert again.status is VmxStatus.VM_EXIT and again.exit == result.exit


@pytest.mark.parametrize(
    ("breaker", "error"),
    [
        (lambda h: h.write(F.VIRTUAL_PROCESSOR_ID, 0), 7),
        (lambda h: h.write(F.HOST_CR3, BEYOND_PHYS_WIDTH), 8),
    ],
    ids=["controls", "host-state"],
)
def test_27_2_vmfail_leaves_host_state_and_launch_state_alone(breaker: Mutation, error: int) -> None:
    h = EntryHarness()
    breaker(h)
    h.processor.host.rip = 0x1234
    result = h.launch()
    assert result.status is VmxStatus.FAIL_VALID and result.error == error
    assert h.processor.host.rip == 0x1234
    assert h.resume().error == 5


def test_entry_check_failure_is_cleared_by_a_successful_entry() -> None:
    h = EntryHarness()
    h.write(F.GUEST_RFLAGS, 0)
    h.launch()
    assert h.processor.last_entry_failure is not None
    h.write(F.GUEST_RFLAGS, 2)
    passes(h)
