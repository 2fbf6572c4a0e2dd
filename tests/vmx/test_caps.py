"""The capability MSRs of the modelled CPU (SDM Appendix A) and KVM's adjust_vmx_controls."""

from __future__ import annotations

import pytest

from pyvmx.arch.controls import (
    CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
    PinBasedControls,
    ProcBasedControls,
    SecondaryProcBasedControls,
    VmExitControls,
)
from pyvmx.arch.msr import Msr
from pyvmx.arch.vmcs_fields import VmcsField
from pyvmx.vmx.caps import CpuProfile, UnsupportedControlsError, adjust_vmx_controls


def test_vmx_basic_fields() -> None:
    """SDM A.1: revision id 30:0, bit 31 clear, region size 4096, WB memory type, TRUE MSRs."""
    basic = CpuProfile().vmx_basic
    assert basic & (1 << 31) == 0
    assert (basic >> 32) & 0x1FFF == 4096
    assert (basic >> 50) & 0xF == 6
    assert basic & (1 << 55)
    assert basic & (1 << 54)  # INS/OUTS instruction information


def test_allowed_settings_halves() -> None:
    """SDM A.3: bits 31:0 are the allowed 0-settings, bits 63:32 the allowed 1-settings."""
    p = CpuProfile()
    msr = p.rdmsr(Msr.IA32_VMX_PROCBASED_CTLS)
    assert msr is not None
    low, high = msr & 0xFFFFFFFF, msr >> 32
    assert low == CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR  # default1 must be 1 in the non-TRUE MSR
    assert high & low == low  # anything that must be 1 may be 1
    assert high & ProcBasedControls.HLT_EXITING


def test_true_procbased_lets_cr3_exiting_be_zero() -> None:
    """SDM A.3.2: the TRUE MSR reports CR3-load/store exiting as allowed to be 0."""
    true = CpuProfile().rdmsr(Msr.IA32_VMX_TRUE_PROCBASED_CTLS)
    assert true is not None
    assert not true & ProcBasedControls.CR3_LOAD_EXITING
    assert not true & ProcBasedControls.CR3_STORE_EXITING


def test_misc_preemption_timer_rate_and_cr3_targets() -> None:
    misc = CpuProfile().rdmsr(Msr.IA32_VMX_MISC)
    assert misc is not None
    assert misc & 0x1F == 5
    assert (misc >> 16) & 0x1FF == 4
    assert misc & (1 << 6)  # HLT activity state supported


def test_cr_fixed_bits() -> None:
    p = CpuProfile()
    assert p.rdmsr(Msr.IA32_VMX_CR0_FIXED0) == 0x80000021  # PE, NE, PG
    assert p.rdmsr(Msr.IA32_VMX_CR4_FIXED0) == 1 << 13  # VMXE


def test_vmcs_enum_is_highest_index() -> None:
    enum = CpuProfile().rdmsr(Msr.IA32_VMX_VMCS_ENUM)
    assert enum == max(f.index for f in VmcsField) << 1


def test_weaker_cpu_without_unrestricted_guest() -> None:
    p = CpuProfile().without(SecondaryProcBasedControls.UNRESTRICTED_GUEST)
    msr = p.rdmsr(Msr.IA32_VMX_PROCBASED_CTLS2)
    assert msr is not None and not (msr >> 32) & SecondaryProcBasedControls.UNRESTRICTED_GUEST
    assert (msr >> 32) & SecondaryProcBasedControls.ENABLE_EPT


def test_weaker_cpu_without_preemption_timer_drops_save_control_too() -> None:
    p = CpuProfile().without(PinBasedControls.VMX_PREEMPTION_TIMER)
    assert not p.supports(PinBasedControls.VMX_PREEMPTION_TIMER)
    assert not p.supports(VmExitControls.SAVE_VMX_PREEMPTION_TIMER)


def test_without_ept_drops_unrestricted_guest() -> None:
    p = CpuProfile().without(SecondaryProcBasedControls.ENABLE_EPT)
    assert not p.supports(SecondaryProcBasedControls.UNRESTRICTED_GUEST)


def test_default1_control_cannot_be_removed() -> None:
    """CR3-load exiting is default1 (SDM A.3.2): a CPU cannot lack it."""
    with pytest.raises(ValueError):
        CpuProfile().without(ProcBasedControls.CR3_LOAD_EXITING)


def test_no_true_msrs_when_basic_bit_55_clear() -> None:
    p = CpuProfile(true_controls=False)
    assert p.rdmsr(Msr.IA32_VMX_TRUE_PINBASED_CTLS) is None
    assert not p.vmx_basic & (1 << 55)


def test_adjust_vmx_controls_adds_required_and_drops_unsupported() -> None:
    """KVM's adjust_vmx_controls: ctl &= high; ctl |= low; fail if a required bit is missing."""
    msr = CpuProfile().rdmsr(Msr.IA32_VMX_TRUE_PINBASED_CTLS)
    assert msr is not None
    result = adjust_vmx_controls(
        PinBasedControls.EXT_INTR_MASK, PinBasedControls.VMX_PREEMPTION_TIMER | PinBasedControls.POSTED_INTR, msr
    )
    assert result & PinBasedControls.EXT_INTR_MASK
    assert result & PinBasedControls.VMX_PREEMPTION_TIMER
    assert not result & PinBasedControls.POSTED_INTR  # optional and not supported: dropped
    assert result & 0x16 == 0x16  # default1 bits added


def test_adjust_vmx_controls_missing_required() -> None:
    msr = CpuProfile().rdmsr(Msr.IA32_VMX_TRUE_PINBASED_CTLS)
    assert msr is not None
    with pytest.raises(UnsupportedControlsError) as info:
        adjust_vmx_controls(PinBasedControls.POSTED_INTR, 0, msr, Msr.IA32_VMX_TRUE_PINBASED_CTLS)
    assert info.value.missing == PinBasedControls.POSTED_INTR
    assert isinstance(info.value, ValueError)


def test_capability_msrs_are_read_only_for_the_host() -> None:
    from pyvmx.vmx.memory import PhysicalMemory
    from pyvmx.vmx.processor import Processor

    cpu = Processor(PhysicalMemory(1 << 16))
    with pytest.raises(PermissionError):
        cpu.wrmsr(Msr.IA32_VMX_BASIC, 0)
    with pytest.raises(PermissionError):
        cpu.wrmsr(Msr.IA32_FEAT_CTL, 0)  # locked by firmware
