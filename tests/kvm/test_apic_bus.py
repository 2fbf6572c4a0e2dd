"""IPIs between vCPUs' local APICs and INIT-SIPI-SIPI start-up (Intel SDM Vol. 3A 11.6.1,
9.4.4; KVM lapic.c kvm_apic_match_dest())."""

from __future__ import annotations

from pyvmx.kvm.apic_bus import wait_for_sipi
from pyvmx.kvm.devices.lapic import APIC_ICR, APIC_ICR2, APIC_LDR, APIC_SPIV
from pyvmx.kvm.kvm import Kvm
from pyvmx.kvm.vcpu import Vcpu


def _vcpus(n: int) -> list[Vcpu]:
    vm = Kvm(memory_size=64 << 20).create_vm(memory_size=4 << 20)
    vcpus = [vm.create_vcpu() for _ in range(n)]
    for v in vcpus:
        v.lapic.write(APIC_SPIV, 0x1FF)
    return vcpus


def _send(v: Vcpu, icr: int, dest: int = 0) -> None:
    v.lapic.write(APIC_ICR2, dest << 24)
    v.lapic.write(APIC_ICR, icr)


def test_fixed_ipi_by_physical_id_reaches_only_that_vcpu_sdm_11_6_2_1() -> None:
    a, b, c = _vcpus(3)
    _send(a, 0x40 | (1 << 14), dest=2)
    assert c.lapic.has_interrupt() == 0x40 and b.lapic.has_interrupt() is None and a.lapic.has_interrupt() is None


def test_all_excluding_self_shorthand_sdm_11_6_1() -> None:
    a, b, c = _vcpus(3)
    _send(a, 0x41 | (1 << 14) | (3 << 18))
    assert (a.lapic.has_interrupt(), b.lapic.has_interrupt(), c.lapic.has_interrupt()) == (None, 0x41, 0x41)


def test_logical_flat_destination_matches_ldr_bits_sdm_11_6_2_2() -> None:
    a, b, c = _vcpus(3)
    b.lapic.write(APIC_LDR, 0x02 << 24)
    c.lapic.write(APIC_LDR, 0x04 << 24)
    _send(a, 0x42 | (1 << 14) | (1 << 11), dest=0x04)
    assert b.lapic.has_interrupt() is None and c.lapic.has_interrupt() == 0x42


def test_init_then_sipi_starts_the_vcpu_in_real_mode_at_vector_4k_sdm_11_6_1() -> None:
    a, b = _vcpus(2)
    _send(a, (5 << 8) | (1 << 14), dest=1)  # INIT, assert
    assert wait_for_sipi(b) is True and b.has_events() is False
    _send(a, (6 << 8) | 0x9A, dest=1)  # Start-up, vector 0x9A
    assert b.has_events() is True
    assert wait_for_sipi(b) is False
    sregs, regs = b.get_sregs(), b.get_regs()
    assert (sregs.cs.selector, sregs.cs.base, regs.rip) == (0x9A00, 0x9A000, 0)
    assert not sregs.cr0 & 1


def test_sipi_outside_wait_for_sipi_is_ignored_and_init_deassert_does_nothing_sdm_11_6_1() -> None:
    a, b = _vcpus(2)
    _send(a, (5 << 8) | (1 << 15), dest=1)  # INIT level de-assert
    assert b.lapic.wait_sipi is False
    _send(a, (6 << 8) | 0x10, dest=1)
    assert b.lapic.sipi_vector is None


def test_cr8_is_tpr_bits_7_4_sdm_11_8_6() -> None:
    (a,) = _vcpus(1)
    a.cr8 = 0x9
    assert a.lapic.read(0x80) == 0x90
    a.lapic.write(0x80, 0x5C)
    assert a.cr8 == 0x5


def test_apic_page_follows_ia32_apic_base_enable_and_x2apic_sdm_11_4_4() -> None:
    from pyvmx.kvm.apic_bus import mmio_read, xapic_page

    (a,) = _vcpus(1)
    assert xapic_page(a) == 0xFEE00000 and mmio_read(a, 0xFEE00030, 4) == 0x50014
    a.msrs.values[0x1B] &= ~(1 << 11)
    assert xapic_page(a) is None and mmio_read(a, 0xFEE00030, 4) is None
    a.msrs.values[0x1B] |= (1 << 11) | (1 << 10)
    assert xapic_page(a) is None
