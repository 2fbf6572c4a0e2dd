"""SDM 28.5.1-28.5.3: what a VM exit (here: a VM entry that fails on guest state, which loads the
host state the same way, SDM 27.8) loads into the processor, for a 64-bit and a 32-bit host."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import Cr0, Cr4, Efer

from .vmcs_builder import HOST_RIP, HOST_RIP_32, HOST_RSP_32, EntryHarness

# CR0 bits a VM exit leaves alone (SDM 28.5.1): ET, CD, NW, 28:19, 17, 15:6 (and the fixed ones).
_KEPT = int(Cr0.ET | Cr0.CD | Cr0.NW) | 0x1FF80000 | (1 << 17) | 0xFFC0
_FREE = int(Cr0.MP | Cr0.EM | Cr0.TS | Cr0.WP | Cr0.AM)  # loaded from the host CR0 field


def _fail_on_guest_state(h: EntryHarness) -> None:
    h.write(F.GUEST_RFLAGS, 0)  # RFLAGS bit 1 must be 1 (SDM 27.3.1.4)
    result = h.launch()
    assert result.exit is not None and result.exit.reason == 0x80000021, result


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_28_5_1_cr0_kept_bits_stay_the_rest_comes_from_the_host_cr0_field(before: int, field: int) -> None:
    h = EntryHarness()
    cpu = h.processor
    fixed = h.profile.cr0_fixed0
    cpu.host.cr0 = (before & (_KEPT | _FREE)) | fixed
    h.write(F.HOST_CR0, (field & _FREE) | fixed)
    _fail_on_guest_state(h)
    assert cpu.host.cr0 & _KEPT == before & _KEPT
    assert cpu.host.cr0 & _FREE == field & _FREE
    assert cpu.host.cr0 & fixed == fixed


def test_28_5_64bit_host_state_loaded() -> None:
    """With "host address-space size" = 1: IA32_EFER.LMA/LME = 1, CS.L = 1, CR4.PAE = 1, RFLAGS = 2."""
    h = EntryHarness()
    h.processor.host.rflags = 0x246
    _fail_on_guest_state(h)
    host = h.processor.host
    assert host.efer & Efer.LMA and host.efer & Efer.LME and host.cs_l and host.cr4 & Cr4.PAE
    assert host.rip == HOST_RIP and host.rflags == 0x2


def test_28_5_32bit_host_state_loaded() -> None:
    """With "host address-space size" = 0: IA32_EFER.LMA/LME = 0 (here "load IA32_EFER" loads 0), CS.L
    = 0, CR4.PCIDE = 0, RIP/RSP from the fields; the next VMX instruction runs (no #UD)."""
    h = EntryHarness().use_protected_mode_32_guest().use_32bit_host()
    _fail_on_guest_state(h)
    host = h.processor.host
    assert not host.efer & (Efer.LMA | Efer.LME) and not host.cs_l and not host.cr4 & Cr4.PCIDE
    assert (host.rip, host.rsp) == (HOST_RIP_32, HOST_RSP_32)
    assert h.processor.vmptrst().succeeded
