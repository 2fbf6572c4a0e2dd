"""Exit reasons (SDM Appendix C), control bits (SDM 25.6-25.8, Appendix A), MSR names,
VM-instruction errors (SDM 31.4)."""

from __future__ import annotations

from enum import IntFlag

import pytest

from pyvmx.arch import controls as c
from pyvmx.arch.exit_reasons import EXIT_REASON_DESCRIPTIONS, ExitReason
from pyvmx.arch.msr import Msr, UnknownNameError, msr_by_name
from pyvmx.arch.vm_instruction_errors import VM_INSTRUCTION_ERROR_DESCRIPTIONS, VmInstructionError


def test_vmx_instruction_exit_reasons_are_18_to_27_in_order() -> None:
    names = ["VMCALL", "VMCLEAR", "VMLAUNCH", "VMPTRLD", "VMPTRST", "VMREAD", "VMRESUME", "VMWRITE", "VMOFF", "VMON"]
    assert [ExitReason[n] for n in names] == list(range(18, 28))


@pytest.mark.parametrize(
    "name, number",
    [("EXCEPTION_NMI", 0), ("EXTERNAL_INTERRUPT", 1), ("TRIPLE_FAULT", 2), ("INTERRUPT_WINDOW", 7),
     ("CPUID", 10), ("HLT", 12), ("CR_ACCESS", 28), ("IO_INSTRUCTION", 30), ("MSR_READ", 31),
     ("MSR_WRITE", 32), ("INVALID_STATE", 33), ("MSR_LOAD_FAIL", 34), ("PAUSE_INSTRUCTION", 40),
     ("EPT_VIOLATION", 48), ("EPT_MISCONFIG", 49), ("PREEMPTION_TIMER", 52), ("XSETBV", 55),
     ("BUS_LOCK", 74), ("NOTIFY", 75), ("TDCALL", 77)],
)
def test_appendix_c_numbers(name: str, number: int) -> None:
    assert ExitReason[name] == number


def test_unused_reason_numbers_have_no_name() -> None:
    for unused in (35, 38, 42):
        with pytest.raises(ValueError):
            ExitReason(unused)


def test_every_exit_reason_is_described() -> None:
    assert max(ExitReason) >= 77
    assert set(EXIT_REASON_DESCRIPTIONS) == set(ExitReason)


@pytest.mark.parametrize(
    "cls", [c.PinBasedControls, c.ProcBasedControls, c.SecondaryProcBasedControls, c.VmExitControls, c.VmEntryControls]
)
def test_each_control_is_one_bit(cls: type[IntFlag]) -> None:
    for member in cls:
        assert bin(int(member)).count("1") == 1, member


def test_seed_002_control_bits() -> None:
    """Seed 002: HLT exiting is bit 7, use MSR bitmaps bit 28 of the primary controls."""
    assert c.ProcBasedControls.HLT_EXITING == 1 << 7
    assert c.ProcBasedControls.USE_MSR_BITMAPS == 1 << 28
    assert c.ProcBasedControls.UNCOND_IO_EXITING == 1 << 24
    assert c.ProcBasedControls.USE_IO_BITMAPS == 1 << 25
    assert c.ProcBasedControls.PAUSE_EXITING == 1 << 30
    assert c.PinBasedControls.EXT_INTR_MASK == 1 << 0
    assert c.PinBasedControls.VMX_PREEMPTION_TIMER == 1 << 6


def _bits(*positions: int) -> int:
    return sum(1 << p for p in positions)


def test_default1_masks_match_appendix_a() -> None:
    """SDM A.3.1, A.3.2, A.4, A.5: the default1 controls when no TRUE MSRs exist."""
    assert c.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR == _bits(1, 2, 4)
    assert c.CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR == _bits(1, 4, 5, 6, 8, 13, 14, 15, 16, 26)
    assert c.VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR == _bits(*range(0, 9), 10, 11, 13, 14, 16, 17)
    assert c.VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR == _bits(*range(0, 9), 12)


@pytest.mark.parametrize("name", ["IA32_EFER", "EFER", "MSR_EFER", "msr_ia32_efer", " efer "])
def test_msr_by_name_accepts_common_spellings(name: str) -> None:
    assert msr_by_name(name) == 0xC0000080


def test_msr_by_name_rejects_unknown() -> None:
    with pytest.raises(UnknownNameError) as info:
        msr_by_name("IA32_NOPE")
    assert isinstance(info.value, KeyError)
    assert "IA32_NOPE" in str(info.value)


def test_vmx_capability_msr_indices() -> None:
    assert Msr.IA32_VMX_BASIC == 0x480 and Msr.IA32_VMX_TRUE_ENTRY_CTLS == 0x490
    assert Msr.IA32_VMX_EPT_VPID_CAP == 0x48C and Msr.IA32_VMX_PROCBASED_CTLS2 == 0x48B


def test_vm_instruction_error_numbers() -> None:
    assert VmInstructionError.VMLAUNCH_NONCLEAR_VMCS == 4
    assert VmInstructionError.VMRESUME_NONLAUNCHED_VMCS == 5
    assert VmInstructionError.ENTRY_INVALID_CONTROL_FIELD == 7
    assert VmInstructionError.VMPTRLD_INCORRECT_VMCS_REVISION_ID == 11
    assert VmInstructionError.UNSUPPORTED_VMCS_COMPONENT == 12
    assert VmInstructionError.VMWRITE_READ_ONLY_VMCS_COMPONENT == 13
    assert VmInstructionError.INVALID_OPERAND_TO_INVEPT_INVVPID == 28
    assert 14 not in {int(e) for e in VmInstructionError} and 21 not in {int(e) for e in VmInstructionError}
    assert set(VM_INSTRUCTION_ERROR_DESCRIPTIONS) == set(VmInstructionError)
