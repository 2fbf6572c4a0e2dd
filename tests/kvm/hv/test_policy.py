"""Pure policy tables, no CPU: the exception bitmap, MSR and I/O bitmap positions, CR0/CR4
guest/host masks, VMCS configuration against the capability MSRs, event-injection rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmx.arch.controls import INTR_INFO_DELIVER_CODE_MASK, INTR_INFO_VALID_MASK, InterruptionType
from pyvmx.arch.controls import PinBasedControls as P
from pyvmx.arch.controls import ProcBasedControls as C
from pyvmx.arch.controls import SecondaryProcBasedControls as S
from pyvmx.arch.msr import Msr
from pyvmx.arch.x86 import Cr0, Cr4, ExceptionVector
from pyvmx.kvm import events
from pyvmx.kvm.io_bitmap import IoBitmaps, io_bitmap_position
from pyvmx.kvm.msr_bitmap import KVM_PASSTHROUGH_MSRS, MsrBitmap, MsrOutsideBitmapError, msr_bitmap_position
from pyvmx.kvm.vmcs_setup import (
    ALWAYS_INTERCEPTED_EXCEPTIONS,
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_USE_SW_BP,
    ExceptionBitmapPolicy,
    VmxSetupError,
    cr0_guest_owned_bits,
    cr4_guest_owned_bits,
    exception_bitmap,
    guest_host_mask,
    hw_cr0,
    hw_cr4,
    setup_vmcs_config,
    vmx_exec_control,
    vmx_pin_based_exec_ctrl,
)
from pyvmx.vmx.caps import CpuProfile
from pyvmx.vmx.memory import PhysicalMemory

PF, UD, MC, DB, AC, BP = (1 << int(v) for v in (ExceptionVector.PF, ExceptionVector.UD, ExceptionVector.MC,
                                                  ExceptionVector.DB, ExceptionVector.AC, ExceptionVector.BP))


# --- vmx_update_exception_bitmap() (seed 000) ---------------------------------------------------
@pytest.mark.parametrize(
    "policy, bitmap, mask",
    [
        # EPT, same MAXPHYADDR: no #PF intercept at all.
        (ExceptionBitmapPolicy(), UD | MC | DB | AC, 0),
        # EPT, guest MAXPHYADDR smaller: #PF trapped, only present faults (mask = match = P).
        (ExceptionBitmapPolicy(guest_maxphyaddr=36), PF | UD | MC | DB | AC, 1),
        # ...unless allow_smaller_maxphyaddr is off.
        (ExceptionBitmapPolicy(guest_maxphyaddr=36, allow_smaller_maxphyaddr=False), UD | MC | DB | AC, 0),
        # No EPT (shadow paging): every #PF.
        (ExceptionBitmapPolicy(enable_ept=False), PF | UD | MC | DB | AC, 0),
        # Guest debugging with software breakpoints adds #BP.
        (ExceptionBitmapPolicy(guest_debug=KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP), UD | MC | DB | AC | BP, 0),
        # ...both flags are needed.
        (ExceptionBitmapPolicy(guest_debug=KVM_GUESTDBG_USE_SW_BP), UD | MC | DB | AC, 0),
        # A user intercept of #PF (seed 002) traps every #PF.
        (ExceptionBitmapPolicy(extra=PF), PF | UD | MC | DB | AC, 0),
        (ExceptionBitmapPolicy(guest_maxphyaddr=36, extra=PF), PF | UD | MC | DB | AC, 0),
    ],
)
def test_exception_bitmap_policy(policy: ExceptionBitmapPolicy, bitmap: int, mask: int) -> None:
    """Linux vmx.c vmx_update_exception_bitmap() / vmx_need_pf_intercept() (seed 000):
    #UD #MC #DB #AC always; #PF only when needed; PFEC mask = match = PFERR_PRESENT with EPT."""
    eb, pfec_mask, pfec_match = exception_bitmap(policy)
    assert eb == bitmap
    assert pfec_mask == pfec_match == mask


def test_always_intercepted_exceptions_match_linux() -> None:
    """vmx_update_exception_bitmap(): (1u << PF_VECTOR) | UD | MC | DB | AC."""
    assert ALWAYS_INTERCEPTED_EXCEPTIONS == (1 << 14) | (1 << 6) | (1 << 18) | (1 << 1) | (1 << 17)


# --- MSR bitmap (SDM 25.6.9; seed 002 "only EFER writes", seed 003) ----------------------------
def test_efer_write_bit_position_seed_002() -> None:
    """IA32_EFER (C0000080H) write: bitmap at 0xC00, bit 0x80 -> byte 0xC00 + 0x80/8 = 0xC10, bit 0
    (seed 002: "bit 3072*8 + 0x80 of the page")."""
    assert msr_bitmap_position(Msr.EFER, write=True) == (0xC00 + 0x80 // 8, 0)
    assert msr_bitmap_position(Msr.EFER, write=False) == (0x400 + 0x10, 0)
    assert msr_bitmap_position(Msr.IA32_SYSENTER_CS, write=True) == (0x800 + 0x174 // 8, 0x174 % 8)
    assert msr_bitmap_position(Msr.KVM_ASYNC_PF_EN, write=True) is None


@given(st.integers(0, 0xFFFFFFFF), st.booleans())
def test_msr_bitmap_position_matches_sdm_ranges(msr: int, write: bool) -> None:
    """SDM 25.6.9: low MSRs 0-1FFFH and high MSRs C0000000H-C0001FFFH have bits; others none."""
    position = msr_bitmap_position(msr, write)
    if msr <= 0x1FFF or 0xC0000000 <= msr <= 0xC0001FFF:
        assert position is not None
        offset, bit = position
        base = (0x800 if write else 0) + (0x400 if msr >= 0xC0000000 else 0)
        assert offset * 8 + bit == base * 8 + (msr & 0x1FFF)
    else:
        assert position is None


def test_msr_bitmap_starts_all_ones_and_opens_kvm_passthrough_list() -> None:
    """alloc_loaded_vmcs(): memset 0xFF; vmx_vcpu_create() opens FS/GS/KERNEL_GS base, SYSENTER_*
    read+write, and the TSC for reads only (seed 003)."""
    memory = PhysicalMemory(1 << 20)
    bitmap = MsrBitmap(memory, 0x3000)
    assert memory.read(0x3000, 4096) == b"\xff" * 4096
    bitmap.pass_through_kvm_defaults()
    for msr, read, write in KVM_PASSTHROUGH_MSRS:
        assert bitmap.intercepted(msr, write=False) is not read
        assert bitmap.intercepted(msr, write=True) is not write
    assert bitmap.intercepted(Msr.EFER, write=True) and bitmap.intercepted(Msr.LSTAR, write=False)
    assert bitmap.intercepted(Msr.KVM_ASYNC_PF_EN, write=True)  # outside the ranges: always
    with pytest.raises(MsrOutsideBitmapError):
        bitmap.set_intercept(Msr.KVM_ASYNC_PF_EN, read=True, write=True, intercept=False)
    bitmap.set_intercept("EFER", read=False, write=True, intercept=False)
    assert memory.read8(0x3000 + 0xC10) & 1 == 0


# --- I/O bitmaps (SDM 25.6.4; seed 002 "only port 0x3F8") --------------------------------------
def test_io_bitmap_positions() -> None:
    """SDM 25.6.4: bitmap A for ports 0000H-7FFFH, B for 8000H-FFFFH, one bit per port."""
    assert io_bitmap_position(0x3F8) == (0, 0x3F8 // 8, 0)
    assert io_bitmap_position(0x8000) == (1, 0, 0)
    assert io_bitmap_position(0xFFFF) == (1, 0xFFF, 7)
    memory = PhysicalMemory(1 << 20)
    io = IoBitmaps(memory, 0x4000, 0x5000)
    io.fill(intercept=False)
    io.set_intercept(0x3F8, True)
    assert [p for p in range(0x3F0, 0x400) if io.intercepted(p)] == [0x3F8]
    assert memory.read8(0x4000 + 0x7F) == 1


# --- CR0/CR4 guest/host masks -------------------------------------------------------------------
def test_cr_guest_owned_bits_match_kvm() -> None:
    """KVM_POSSIBLE_CR0_GUEST_BITS = TS | WP (WP only with EPT, vmx_l1_guest_owned_cr0_bits());
    KVM_POSSIBLE_CR4_GUEST_BITS; the mask is their complement (1 = host-owned)."""
    assert cr0_guest_owned_bits() == Cr0.TS | Cr0.WP
    assert cr0_guest_owned_bits(enable_ept=False) == Cr0.TS
    mask = guest_host_mask(cr0_guest_owned_bits())
    assert mask & Cr0.PG and mask & Cr0.PE and mask & Cr0.NE and not mask & (Cr0.TS | Cr0.WP)
    cr4 = cr4_guest_owned_bits()
    assert cr4 & Cr4.PGE and cr4 & Cr4.OSFXSR and not cr4 & (Cr4.PAE | Cr4.VMXE | Cr4.PCIDE)
    assert not cr4_guest_owned_bits(enable_ept=False) & Cr4.PGE


def test_hardware_cr_values() -> None:
    """vmx_set_cr0(): NW/CD off, NE on (unrestricted guest); vmx_set_cr4(): VMXE on, SMEP/SMAP
    off while paging is off."""
    assert hw_cr0(0x60000010) == 0x30
    assert hw_cr4(int(Cr4.SMEP | Cr4.PAE), paging=False) == Cr4.PAE | Cr4.VMXE
    assert hw_cr4(int(Cr4.SMEP), paging=True) == Cr4.SMEP | Cr4.VMXE


# --- setup_vmcs_config() ------------------------------------------------------------------------
def test_vmcs_config_against_capability_msrs() -> None:
    """setup_vmcs_config(): required controls present; CR3 and INVLPG exiting dropped with EPT;
    vmx_exec_control() leaves the windows, RDTSC, PAUSE exiting, I/O bitmaps off; the
    preemption timer is armed per entry (vmx_pin_based_exec_ctrl())."""
    profile = CpuProfile.default()
    config = setup_vmcs_config(profile.rdmsr)
    assert config.pin_based & (P.EXT_INTR_MASK | P.NMI_EXITING) == P.EXT_INTR_MASK | P.NMI_EXITING
    assert config.secondary & S.ENABLE_EPT and config.secondary & S.UNRESTRICTED_GUEST
    assert not config.cpu_based & (C.CR3_LOAD_EXITING | C.CR3_STORE_EXITING | C.INVLPG_EXITING)
    exec_ctl = vmx_exec_control(config)
    assert exec_ctl & C.HLT_EXITING and exec_ctl & C.UNCOND_IO_EXITING and exec_ctl & C.USE_MSR_BITMAPS
    assert not exec_ctl & (C.INTR_WINDOW_EXITING | C.RDTSC_EXITING | C.PAUSE_EXITING | C.USE_IO_BITMAPS)
    assert not vmx_pin_based_exec_ctrl(config) & P.VMX_PREEMPTION_TIMER
    assert config.has_preemption_timer


def test_vmcs_config_refuses_a_cpu_without_ept() -> None:
    """Linux hardware_setup(): no EPT means shadow paging, which this hypervisor does not have -- a clear setup error."""
    with pytest.raises(VmxSetupError, match="EPT"):
        setup_vmcs_config(CpuProfile.default().without(S.ENABLE_EPT).rdmsr)


def test_vmcs_config_without_preemption_timer() -> None:
    """setup_vmcs_config(): PIN_BASED_VMX_PREEMPTION_TIMER is optional (KVM falls back to hrtimers)."""
    config = setup_vmcs_config(CpuProfile.default().without(P.VMX_PREEMPTION_TIMER).rdmsr)
    assert not config.has_preemption_timer


# --- events (SDM 25.8.3, 26.7.5) ----------------------------------------------------------------
def test_injection_encoding_and_error_codes() -> None:
    """A #GP injected in protected mode delivers its error code; in real mode it must not
    (SDM 27.2.1.3); an external interrupt never has one."""
    gp = events.exception(int(ExceptionVector.GP), 0)
    info, error = gp.intr_info(protected_mode=True)
    assert info == INTR_INFO_VALID_MASK | INTR_INFO_DELIVER_CODE_MASK | (3 << 8) | 13 and error == 0
    info, error = gp.intr_info(protected_mode=False)
    assert info == INTR_INFO_VALID_MASK | (3 << 8) | 13 and error is None
    irq = events.external_interrupt(0x20)
    assert irq.intr_info(protected_mode=True) == (INTR_INFO_VALID_MASK | 0x20, None)
    bp = events.software_exception(3, 1)
    assert bp.software and bp.kind is InterruptionType.SOFT_EXCEPTION


def test_requeue_from_idt_vectoring_info() -> None:
    """__vmx_complete_interrupts(): an interrupted delivery comes back as the same event."""
    info = INTR_INFO_VALID_MASK | (3 << 8) | INTR_INFO_DELIVER_CODE_MASK | 14
    ev = events.from_vectoring_info(info, 0x2, 0)
    assert ev is not None and ev.vector == 14 and ev.error_code == 2
    assert events.from_vectoring_info(0x20, 0, 0) is None


@pytest.mark.parametrize(
    "rflags, interruptibility, allowed",
    [(0x202, 0, True), (0x2, 0, False), (0x202, 1, False), (0x202, 2, False), (0x202, 8, True)],
)
def test_interrupt_window_rule(rflags: int, interruptibility: int, allowed: bool) -> None:
    """vmx_interrupt_blocked(): RFLAGS.IF and no STI/MOV-SS blocking (NMI blocking is irrelevant)."""
    assert events.interrupt_allowed(rflags, interruptibility) is allowed
