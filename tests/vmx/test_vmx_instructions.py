"""The VMX instructions (SDM 31.3) and their outcomes: VMsucceed, VMfailInvalid, VMfailValid with
the VM-instruction error number (SDM 31.4), #UD and #GP."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmx.arch.controls import FEAT_CTL_LOCKED, FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX
from pyvmx.arch.msr import Msr
from pyvmx.arch.vm_instruction_errors import VmInstructionError as Err
from pyvmx.arch.vmcs_fields import VmcsField, VmcsWidth, high_encoding
from pyvmx.arch.x86 import Cr4, ExceptionVector
from pyvmx.vmx.memory import PhysicalMemory
from pyvmx.vmx.outcomes import VmcsWidthError, VmxInstructionFailed, VmxStatus
from pyvmx.vmx.processor import INVALID_VMCS_POINTER, Processor

VMXON_REGION = 0x1000
VMCS_A = 0x2000
VMCS_B = 0x3000


def make_cpu(**kwargs: object) -> Processor:
    cpu = Processor(PhysicalMemory(1 << 20), **kwargs)  # type: ignore[arg-type]
    cpu.host.cr4 |= Cr4.VMXE
    rev = cpu.rdmsr(Msr.IA32_VMX_BASIC) & 0x7FFFFFFF
    for region in (VMXON_REGION, VMCS_A, VMCS_B):
        cpu.memory.write32(region, rev)
    return cpu


def vmx_cpu() -> Processor:
    cpu = make_cpu()
    assert cpu.vmxon(VMXON_REGION).succeeded
    return cpu


def current(cpu: Processor, region: int = VMCS_A) -> Processor:
    assert cpu.vmclear(region).succeeded
    assert cpu.vmptrld(region).succeeded
    return cpu


# --- VMXON -------------------------------------------------------------------------------------
def test_vmxon_ud_when_cr4_vmxe_clear() -> None:
    cpu = make_cpu()
    cpu.host.cr4 &= ~Cr4.VMXE
    assert cpu.vmxon(VMXON_REGION).fault is ExceptionVector.UD


def test_vmxon_gp_when_feature_control_unlocked() -> None:
    cpu = make_cpu(feature_control=FEAT_CTL_VMX_ENABLED_OUTSIDE_SMX)
    assert cpu.vmxon(VMXON_REGION).fault is ExceptionVector.GP


def test_vmxon_gp_when_vmx_outside_smx_disabled() -> None:
    cpu = make_cpu(feature_control=FEAT_CTL_LOCKED)
    assert cpu.vmxon(VMXON_REGION).fault is ExceptionVector.GP


def test_vmxon_gp_when_cr0_violates_fixed0() -> None:
    cpu = make_cpu()
    cpu.host.cr0 &= ~(1 << 5)  # CR0.NE is fixed to 1 in VMX operation (SDM 24.8, A.7)
    assert cpu.vmxon(VMXON_REGION).fault is ExceptionVector.GP


def test_vmxon_gp_at_cpl3() -> None:
    cpu = make_cpu()
    cpu.host.cpl = 3
    assert cpu.vmxon(VMXON_REGION).fault is ExceptionVector.GP


@pytest.mark.parametrize("address", [0x1001, 0x1800, 1 << 50])
def test_vmxon_unaligned_or_too_wide_pointer_vmfail_invalid(address: int) -> None:
    assert make_cpu().vmxon(address).status is VmxStatus.FAIL_INVALID


def test_vmxon_bad_revision_vmfail_invalid() -> None:
    cpu = make_cpu()
    cpu.memory.write32(VMXON_REGION, 0x7)
    assert cpu.vmxon(VMXON_REGION).status is VmxStatus.FAIL_INVALID


def test_vmxon_in_vmx_root_without_current_vmcs_is_vmfail_invalid() -> None:
    cpu = vmx_cpu()
    assert cpu.vmxon(VMXON_REGION).status is VmxStatus.FAIL_INVALID


def test_vmxon_in_vmx_root_error_15() -> None:
    cpu = current(vmx_cpu())
    result = cpu.vmxon(VMXON_REGION)
    assert result.status is VmxStatus.FAIL_VALID and result.error is Err.VMXON_IN_VMX_ROOT_OPERATION
    assert cpu.vmcs.read(VmcsField.VM_INSTRUCTION_ERROR) == 15


def test_vmx_instructions_ud_outside_vmx_operation() -> None:
    cpu = make_cpu()
    for result in (cpu.vmclear(VMCS_A), cpu.vmptrld(VMCS_A), cpu.vmread(VmcsField.GUEST_RIP), cpu.vmlaunch(), cpu.vmxoff()):
        assert result.fault is ExceptionVector.UD


def test_vmx_instructions_ud_in_compatibility_mode() -> None:
    cpu = vmx_cpu()
    cpu.host.cs_l = False  # IA32_EFER.LMA = 1 and CS.L = 0
    assert cpu.vmclear(VMCS_A).fault is ExceptionVector.UD


# --- VMCLEAR / VMPTRLD / VMPTRST ------------------------------------------------------------
def test_vmclear_invalid_address_error_2() -> None:
    result = current(vmx_cpu()).vmclear(0x2004)
    assert result.error is Err.VMCLEAR_INVALID_ADDRESS


def test_vmclear_vmxon_pointer_error_3() -> None:
    result = current(vmx_cpu()).vmclear(VMXON_REGION)
    assert result.error is Err.VMCLEAR_VMXON_POINTER


def test_vmclear_without_current_vmcs_fails_invalid() -> None:
    assert vmx_cpu().vmclear(VMXON_REGION).status is VmxStatus.FAIL_INVALID


def test_vmptrld_invalid_address_error_9() -> None:
    assert current(vmx_cpu()).vmptrld(0x3010).error is Err.VMPTRLD_INVALID_ADDRESS


def test_vmptrld_vmxon_pointer_error_10() -> None:
    assert current(vmx_cpu()).vmptrld(VMXON_REGION).error is Err.VMPTRLD_VMXON_POINTER


def test_vmptrld_bad_revision_error_11() -> None:
    cpu = current(vmx_cpu())
    cpu.memory.write32(VMCS_B, 0x55)
    assert cpu.vmptrld(VMCS_B).error is Err.VMPTRLD_INCORRECT_VMCS_REVISION_ID


def test_vmptrld_shadow_indicator_rejected_error_11() -> None:
    cpu = current(vmx_cpu())
    cpu.memory.write32(VMCS_B, cpu.memory.read32(VMCS_B) | (1 << 31))
    assert cpu.vmptrld(VMCS_B).error is Err.VMPTRLD_INCORRECT_VMCS_REVISION_ID


def test_vmptrst_reports_current_pointer_and_invalid_after_vmclear() -> None:
    cpu = current(vmx_cpu())
    assert cpu.vmptrst().value == VMCS_A
    assert cpu.vmclear(VMCS_A).succeeded
    assert cpu.vmptrst().value == INVALID_VMCS_POINTER


def test_vmptrld_switches_vmcs_without_copying_fields() -> None:
    cpu = current(vmx_cpu())
    cpu.vmwrite(VmcsField.GUEST_RIP, 0xAAAA)
    current(cpu, VMCS_B)
    cpu.vmwrite(VmcsField.GUEST_RIP, 0xBBBB)
    assert cpu.vmptrld(VMCS_A).succeeded
    assert cpu.vmread(VmcsField.GUEST_RIP).value == 0xAAAA
    assert cpu.vmptrld(VMCS_B).succeeded
    assert cpu.vmread(VmcsField.GUEST_RIP).value == 0xBBBB


# --- VMREAD / VMWRITE -------------------------------------------------------------------------
def test_vmread_without_current_vmcs_fails_invalid() -> None:
    assert vmx_cpu().vmread(VmcsField.GUEST_RIP).status is VmxStatus.FAIL_INVALID


@pytest.mark.parametrize("encoding", [0x0001 << 15, 0x6C40, 0x4FFE, 0x1_0000_0000 | 0x681E, 0x4001])
def test_vmread_unsupported_component_error_12(encoding: int) -> None:
    cpu = current(vmx_cpu())
    result = cpu.vmread(encoding)
    assert result.error is Err.UNSUPPORTED_VMCS_COMPONENT
    assert cpu.vmcs.read(VmcsField.VM_INSTRUCTION_ERROR) == 12


def test_vmwrite_read_only_field_error_13_without_misc_bit_29() -> None:
    from pyvmx.vmx.caps import CpuProfile

    cpu = make_cpu(profile=CpuProfile(vmwrite_any_field=False))
    assert cpu.vmxon(VMXON_REGION).succeeded
    current(cpu)
    assert cpu.vmwrite(VmcsField.EXIT_QUALIFICATION, 1).error is Err.VMWRITE_READ_ONLY_VMCS_COMPONENT


def test_vmwrite_read_only_field_allowed_with_misc_bit_29() -> None:
    cpu = current(vmx_cpu())
    assert cpu.rdmsr(Msr.IA32_VMX_MISC) & (1 << 29)
    assert cpu.vmwrite(VmcsField.EXIT_QUALIFICATION, 0x1234).succeeded
    assert cpu.vmread(VmcsField.EXIT_QUALIFICATION).value == 0x1234


def test_vmwrite_truncates_to_field_width() -> None:
    cpu = current(vmx_cpu())
    cpu.vmwrite(VmcsField.GUEST_ES_SELECTOR, 0x12345)
    cpu.vmwrite(VmcsField.PAGE_FAULT_ERROR_CODE_MASK, 0x1_2345_6789)
    assert cpu.vmread(VmcsField.GUEST_ES_SELECTOR).value == 0x2345
    assert cpu.vmread(VmcsField.PAGE_FAULT_ERROR_CODE_MASK).value == 0x2345_6789


def test_vmread_vmwrite_high_access_of_64_bit_field() -> None:
    """SDM 25.11.2: access type 1 reads/writes bits 63:32 of a 64-bit field."""
    cpu = current(vmx_cpu())
    cpu.vmwrite(VmcsField.MSR_BITMAP, 0x1111_2222_3333_4000)
    assert cpu.vmread(high_encoding(VmcsField.MSR_BITMAP)).value == 0x1111_2222
    cpu.vmwrite(high_encoding(VmcsField.MSR_BITMAP), 0xAAAA_BBBB_CCCC)
    assert cpu.vmread(VmcsField.MSR_BITMAP).value == 0xBBBB_CCCC_3333_4000


def test_high_access_of_natural_width_field_is_unsupported() -> None:
    cpu = current(vmx_cpu())
    assert cpu.vmread(int(VmcsField.GUEST_RIP) | 1).error is Err.UNSUPPORTED_VMCS_COMPONENT


def _value_for(width: VmcsWidth) -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(field=st.sampled_from(list(VmcsField)), value=st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_vmwrite_vmread_round_trip_every_field(field: VmcsField, value: int) -> None:
    """Property: VMREAD returns what VMWRITE stored, truncated to the field's width."""
    cpu = current(vmx_cpu())
    assert cpu.vmwrite(field, value).succeeded
    bits = {VmcsWidth.BITS16: 16, VmcsWidth.BITS32: 32, VmcsWidth.BITS64: 64, VmcsWidth.NATURAL: 64}[field.width]
    assert cpu.vmread(field).value == value & ((1 << bits) - 1)


@given(
    fields=st.lists(st.tuples(st.sampled_from(list(VmcsField)), st.integers(0, (1 << 64) - 1)), max_size=30)
)
def test_vmcs_fields_are_independent(fields: list[tuple[VmcsField, int]]) -> None:
    """Property: writes to one field never change another (a dict model of the VMCS)."""
    cpu = current(vmx_cpu())
    model: dict[VmcsField, int] = {}
    for field, value in fields:
        cpu.vmwrite(field, value)
        bits = 16 if field.width is VmcsWidth.BITS16 else 32 if field.width is VmcsWidth.BITS32 else 64
        model[field] = value & ((1 << bits) - 1)
    for field, value in model.items():
        assert cpu.vmread(field).value == value


# --- width-checked accessors (Linux vmx_ops.h) --------------------------------------------------
def test_vmcs_read32_on_32_bit_field() -> None:
    cpu = current(vmx_cpu())
    cpu.vmcs.write32(VmcsField.PAGE_FAULT_ERROR_CODE_MASK, 1)
    assert cpu.vmcs.read32(VmcsField.PAGE_FAULT_ERROR_CODE_MASK) == 1


@pytest.mark.parametrize(
    "accessor, field",
    [
        ("read32", VmcsField.MSR_BITMAP),
        ("read64", VmcsField.PAGE_FAULT_ERROR_CODE_MASK),
        ("read16", VmcsField.GUEST_RIP),
        ("readl", VmcsField.GUEST_ES_SELECTOR),
    ],
)
def test_wrong_width_read_is_an_error(accessor: str, field: VmcsField) -> None:
    cpu = current(vmx_cpu())
    with pytest.raises(VmcsWidthError):
        getattr(cpu.vmcs, accessor)(field)


def test_vmcs_write64_on_32_bit_field_is_an_error() -> None:
    """The seed's point: PAGE_FAULT_ERROR_CODE_MASK is 32-bit, so vmcs_write64 is wrong."""
    cpu = current(vmx_cpu())
    with pytest.raises(VmcsWidthError):
        cpu.vmcs.write64(VmcsField.PAGE_FAULT_ERROR_CODE_MASK, 1)
    cpu.vmcs.write64(VmcsField.MSR_BITMAP, 0x5000)
    assert cpu.vmcs.read64(VmcsField.MSR_BITMAP) == 0x5000


def test_accessor_without_current_vmcs_raises() -> None:
    with pytest.raises(VmxInstructionFailed):
        vmx_cpu().vmcs.readl(VmcsField.GUEST_RIP)


# --- VMLAUNCH / VMRESUME launch-state rules ------------------------------------------------------
def test_vmlaunch_without_current_vmcs_fails_invalid() -> None:
    assert vmx_cpu().vmlaunch().status is VmxStatus.FAIL_INVALID


def test_vmresume_non_launched_vmcs_error_5() -> None:
    assert current(vmx_cpu()).vmresume().error is Err.VMRESUME_NONLAUNCHED_VMCS


def test_vmlaunch_with_events_blocked_by_mov_ss_error_26() -> None:
    cpu = current(vmx_cpu())
    cpu.blocking_by_mov_ss = True
    assert cpu.vmlaunch().error is Err.ENTRY_EVENTS_BLOCKED_BY_MOV_SS


def test_vmlaunch_checks_controls_first_error_7() -> None:
    cpu = current(vmx_cpu())
    result = cpu.vmlaunch()
    assert result.error is Err.ENTRY_INVALID_CONTROL_FIELD
    assert cpu.vmcs.read(VmcsField.VM_INSTRUCTION_ERROR) == 7
    assert cpu.last_entry_failure is not None


# --- VMXOFF --------------------------------------------------------------------------------------
def test_vmxoff_leaves_vmx_operation() -> None:
    cpu = vmx_cpu()
    assert cpu.vmxoff().succeeded
    assert not cpu.in_vmx_operation
    assert cpu.vmclear(VMCS_A).fault is ExceptionVector.UD


# --- INVEPT / INVVPID --------------------------------------------------------------------------
def test_invept_unsupported_type_error_28() -> None:
    assert current(vmx_cpu()).invept(3, 0).error is Err.INVALID_OPERAND_TO_INVEPT_INVVPID


def test_invept_single_context_invalid_eptp_error_28() -> None:
    assert current(vmx_cpu()).invept(1, 0x5000 | 5).error is Err.INVALID_OPERAND_TO_INVEPT_INVVPID


def test_invept_single_context_valid_eptp() -> None:
    assert current(vmx_cpu()).invept(1, 0x5000 | 6 | (3 << 3)).succeeded


def test_invept_global() -> None:
    assert current(vmx_cpu()).invept(2, 0).succeeded


@pytest.mark.parametrize(
    "inv_type, vpid, address",
    [(0, 0, 0), (0, 1, 0x0000_8000_0000_0000), (1, 0, 0), (3, 0, 0), (2, 1 << 16, 0), (4, 1, 0)],
)
def test_invvpid_invalid_operand_error_28(inv_type: int, vpid: int, address: int) -> None:
    assert current(vmx_cpu()).invvpid(inv_type, vpid, address).error is Err.INVALID_OPERAND_TO_INVEPT_INVVPID


@pytest.mark.parametrize("inv_type, vpid", [(0, 1), (1, 1), (2, 0), (3, 7)])
def test_invvpid_valid(inv_type: int, vpid: int) -> None:
    assert current(vmx_cpu()).invvpid(inv_type, vpid, 0x1000).succeeded
