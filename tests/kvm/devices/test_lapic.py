"""The local APIC's registers and interrupt acceptance (Intel SDM Vol. 3A chapter 11)."""

from __future__ import annotations

from pyvmx.kvm.devices.lapic import (
    APIC_EOI,
    APIC_ESR,
    APIC_ICR,
    APIC_ID,
    APIC_IRR,
    APIC_ISR,
    APIC_LVR,
    APIC_LVTT,
    APIC_PROCPRI,
    APIC_SPIV,
    APIC_TASKPRI,
    APIC_TDCR,
    APIC_TMCCT,
    APIC_TMICT,
    Lapic,
)


def _apic(now: list[int] | None = None) -> Lapic:
    clock = now if now is not None else [0]
    apic = Lapic(2, lambda: clock[0])
    apic.write(APIC_SPIV, 0x1FF)
    return apic


def test_reset_state_sdm_11_4_7_1() -> None:
    apic = Lapic(5, lambda: 0)
    assert apic.read(APIC_ID) == 5 << 24
    assert apic.read(APIC_LVR) & 0xFF == 0x14
    assert apic.read(APIC_SPIV) == 0xFF and apic.read(APIC_LVTT) == 1 << 16


def test_ppr_follows_tpr_and_isr_sdm_11_8_3_1() -> None:
    apic = _apic()
    apic.write(APIC_TASKPRI, 0x35)
    assert apic.read(APIC_PROCPRI) == 0x35
    apic.accept(0x61)
    assert apic.acknowledge() == 0x61
    assert apic.read(APIC_PROCPRI) == 0x60


def test_interrupt_at_or_below_ppr_class_is_held_in_irr_sdm_11_8_3_1() -> None:
    apic = _apic()
    apic.write(APIC_TASKPRI, 0x40)
    apic.accept(0x45)
    assert apic.has_interrupt() is None and apic.read(APIC_IRR + 0x20) == 1 << 5
    apic.write(APIC_TASKPRI, 0x30)
    assert apic.has_interrupt() == 0x45


def test_eoi_clears_the_highest_isr_bit_sdm_11_8_5() -> None:
    apic = _apic()
    apic.accept(0x30)
    apic.acknowledge()
    apic.accept(0x50)
    apic.acknowledge()
    apic.write(APIC_EOI, 0)
    assert apic.read(APIC_ISR + 0x10) == 1 << 16 and apic.read(APIC_ISR + 0x50) == 0


def test_self_ipi_is_accepted_and_illegal_vector_sets_esr_sdm_11_6_1_11_5_3() -> None:
    apic = _apic()
    apic.write(APIC_ICR, (1 << 18) | 0x77)  # shorthand self, fixed
    assert apic.has_interrupt() == 0x77
    apic.write(APIC_ICR, (1 << 18) | 0x05)
    apic.write(APIC_ESR, 0)
    assert apic.read(APIC_ESR) & (1 << 5)


def test_software_disabled_apic_accepts_nothing_sdm_11_4_7_2() -> None:
    apic = Lapic(0, lambda: 0)
    apic.accept(0x40)
    assert apic.has_interrupt() is None


def test_one_shot_timer_counts_down_and_fires_once_sdm_11_5_4() -> None:
    now = [0]
    apic = _apic(now)
    apic.write(APIC_TDCR, 0xB)  # divide by 1
    apic.write(APIC_LVTT, 0x40)
    apic.write(APIC_TMICT, 100)
    now[0] = 40
    assert apic.read(APIC_TMCCT) == 60
    now[0] = 100
    assert apic.has_interrupt() == 0x40 and apic.read(APIC_TMCCT) == 0
    apic.acknowledge()
    apic.write(APIC_EOI, 0)
    now[0] = 500
    assert apic.has_interrupt() is None


def test_periodic_timer_reloads_sdm_11_5_4() -> None:
    now = [0]
    apic = _apic(now)
    apic.write(APIC_TDCR, 0x0)  # divide by 2
    apic.write(APIC_LVTT, (1 << 17) | 0x41)
    apic.write(APIC_TMICT, 50)
    now[0] = 250
    assert apic.has_interrupt() == 0x41
    assert apic.read(APIC_TMCCT) == 25  # reloaded at 200: 50 ticks to go at 2 ticks a count


def test_nmi_ipi_to_own_apic_id_delivers_an_nmi_sdm_11_6_1() -> None:
    nmis: list[int] = []
    apic = Lapic(3, lambda: 0, deliver_nmi=lambda: nmis.append(1))
    apic.write(APIC_SPIV, 0x1FF)
    apic.write(0x310, 3 << 24)  # ICR high: destination APIC ID 3
    apic.write(APIC_ICR, (4 << 8) | (1 << 14))  # NMI, assert, physical, no shorthand
    assert nmis == [1] and apic.has_interrupt() is None
