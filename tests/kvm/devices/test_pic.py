"""The cascaded 8259A pair against the Intel 8259A datasheet and QEMU's i8259.c."""

from __future__ import annotations

import pytest

from pyvmx.kvm.devices.bus import IoBus
from pyvmx.kvm.devices.pic import InvalidIrqError, Pic

M_CMD, M_DATA, S_CMD, S_DATA = 0x20, 0x21, 0xA0, 0xA1
ELCR0, ELCR1 = 0x4D0, 0x4D1
EOI = 0x20
OCW3_READ_IRR, OCW3_READ_ISR, OCW3_POLL = 0x0A, 0x0B, 0x0C


class Pics:
    def __init__(self, icw4: int = 0x01) -> None:
        self.intr: list[bool] = []
        self.pic = Pic(on_intr=self.intr.append)
        self.bus = IoBus()
        self.bus.register_all(self.pic, self.pic.io_ranges)
        if icw4 >= 0:
            self.linux_init(icw4)

    def linux_init(self, icw4: int = 0x01) -> None:
        """arch/x86/kernel/i8259.c init_8259A() and the PC BIOS: ICW1 0x11, bases 0x20/0x28."""
        for port, value in [
            (M_CMD, 0x11), (M_DATA, 0x20), (M_DATA, 0x04), (M_DATA, icw4),
            (S_CMD, 0x11), (S_DATA, 0x28), (S_DATA, 0x02), (S_DATA, icw4),
        ]:  # fmt: skip
            self.outb(port, value)

    def inb(self, port: int) -> int:
        value = self.bus.read(port, 1)
        assert value is not None
        return value

    def outb(self, port: int, value: int) -> None:
        assert self.bus.write(port, 1, value)

    def edge(self, irq: int) -> None:
        self.pic.set_irq(irq, True)
        self.pic.set_irq(irq, False)

    def isr(self) -> tuple[int, int]:
        self.outb(M_CMD, OCW3_READ_ISR)
        self.outb(S_CMD, OCW3_READ_ISR)
        return self.inb(M_CMD), self.inb(S_CMD)

    def irr(self) -> tuple[int, int]:
        self.outb(M_CMD, OCW3_READ_IRR)
        self.outb(S_CMD, OCW3_READ_IRR)
        return self.inb(M_CMD), self.inb(S_CMD)


def test_linux_init_sequence() -> None:
    p = Pics()
    m, s = p.pic.master, p.pic.slave
    assert (m.irq_base, s.irq_base) == (0x20, 0x28)
    assert (m.icw3, s.icw3) == (0x04, 0x02)
    assert m.mode_8086 and s.mode_8086 and not m.auto_eoi
    assert (m.init_state, s.init_state) == (0, 0)
    assert (p.inb(M_DATA), p.inb(S_DATA)) == (0, 0)  # ICW1 cleared the IMR
    assert not p.pic.output()


@pytest.mark.parametrize(
    ("irq", "vector", "isr"),
    [
        (0, 0x20, (0x01, 0x00)),
        (1, 0x21, (0x02, 0x00)),
        (3, 0x23, (0x08, 0x00)),
        (7, 0x27, (0x80, 0x00)),
        (8, 0x28, (0x04, 0x01)),
        (12, 0x2C, (0x04, 0x10)),
        (15, 0x2F, (0x04, 0x80)),
    ],
)
def test_acknowledge_returns_base_plus_irq(irq: int, vector: int, isr: tuple[int, int]) -> None:
    """ICW2 sets T7-T3; the INTA cycle moves the request from IRR to ISR."""
    p = Pics()
    p.edge(irq)
    assert p.pic.output()
    assert p.pic.pending_irq() == irq
    assert p.pic.acknowledge() == vector
    assert p.isr() == isr
    assert p.irr() == (0, 0)
    assert not p.pic.output()


def test_cascade_irq12_shows_as_master_irq2() -> None:
    p = Pics()
    p.pic.set_irq(12, True)
    assert p.irr() == (0x04, 0x10)  # the slave's INT is the master's IR2
    assert p.intr == [True]
    assert p.pic.acknowledge() == 0x2C
    assert p.isr() == (0x04, 0x10)
    p.pic.set_irq(12, False)
    p.outb(S_CMD, EOI)
    assert p.isr() == (0x04, 0x00)
    p.outb(M_CMD, EOI)
    assert p.isr() == (0x00, 0x00)


@pytest.mark.parametrize(
    ("master_mask", "slave_mask", "irq", "delivered"),
    [
        (0x01, 0x00, 0, False),
        (0xFE, 0x00, 0, True),
        (0x00, 0x10, 12, False),
        (0x04, 0x00, 12, False),  # masking the cascade masks the whole slave
        (0xFB, 0xEF, 12, True),
    ],
)
def test_ocw1_masking(master_mask: int, slave_mask: int, irq: int, delivered: bool) -> None:
    p = Pics()
    p.outb(M_DATA, master_mask)
    p.outb(S_DATA, slave_mask)
    assert (p.inb(M_DATA), p.inb(S_DATA)) == (master_mask, slave_mask)
    p.edge(irq)
    assert p.pic.output() is delivered
    p.outb(M_DATA, 0)
    p.outb(S_DATA, 0)
    assert p.pic.output()  # the request stayed in IRR while masked
    assert p.pic.acknowledge() == 0x20 + irq


def test_nesting_and_non_specific_eoi() -> None:
    """Fully nested mode: only higher priorities interrupt a level in service."""
    p = Pics()
    p.edge(1)
    assert p.pic.acknowledge() == 0x21
    p.edge(3)
    assert not p.pic.output()  # lower than IRQ 1 in service
    p.edge(0)
    assert p.pic.output()
    assert p.pic.acknowledge() == 0x20
    assert p.isr() == (0x03, 0)
    p.outb(M_CMD, EOI)  # clears the highest in service: IRQ 0
    assert p.isr() == (0x02, 0)
    assert not p.pic.output()
    p.outb(M_CMD, EOI)
    assert p.pic.output()
    assert p.pic.acknowledge() == 0x23


@pytest.mark.parametrize(
    ("ocw2", "isr_after"), [(0x60, 0x0A), (0x61, 0x09), (0x63, 0x03), (0x67, 0x0B)]
)
def test_specific_eoi(ocw2: int, isr_after: int) -> None:
    """OCW2 SL=1 EOI=1: clear the ISR bit named by L2-L0, whatever its priority."""
    p = Pics()
    for irq in (3, 1, 0):
        p.edge(irq)
        p.pic.acknowledge()
    assert p.isr() == (0x0B, 0)
    p.outb(M_CMD, ocw2)
    assert p.isr() == (isr_after, 0)


def test_spurious_irq7_when_a_level_request_goes_away() -> None:
    """Datasheet: a request gone before INTA gives IR7's vector, with no ISR bit set."""
    p = Pics()
    p.outb(ELCR0, 0x20)  # IRQ 5 level-triggered
    p.pic.set_irq(5, True)
    assert p.pic.output()
    p.pic.set_irq(5, False)
    assert p.pic.acknowledge() == 0x27
    assert p.isr() == (0, 0)


def test_spurious_irq15_leaves_master_irq2_in_service() -> None:
    p = Pics()
    p.outb(ELCR1, 0x04)  # IRQ 10 level-triggered
    p.pic.set_irq(10, True)
    p.pic.set_irq(10, False)  # the master's IR2 edge stays latched
    assert p.pic.acknowledge() == 0x2F
    assert p.isr() == (0x04, 0x00)  # software must EOI the master for a spurious IRQ 15


def test_acknowledge_without_request_is_spurious() -> None:
    assert Pics().pic.acknowledge() == 0x27


def test_auto_eoi() -> None:
    """ICW4 AEOI: the ISR bit is cleared at the end of INTA, so no EOI is needed."""
    p = Pics(icw4=0x03)
    assert p.pic.master.auto_eoi
    for vector in (0x21, 0x21):
        p.edge(1)
        assert p.pic.acknowledge() == vector
        assert p.isr() == (0, 0)
    p.edge(9)
    assert p.pic.acknowledge() == 0x29
    assert p.isr() == (0, 0)


@pytest.mark.parametrize(
    ("level_triggered", "drop_before_ack", "first", "again_after_eoi"),
    [
        (False, False, 0x2B, False),  # edge: one interrupt per rising edge
        (False, True, 0x2B, False),  # edge: latched even if the line falls before INTA
        (True, False, 0x2B, True),  # level: still high after EOI -> interrupts again
        (True, True, 0x2F, False),  # level: gone before INTA -> spurious
    ],
)
def test_level_versus_edge(
    level_triggered: bool, drop_before_ack: bool, first: int, again_after_eoi: bool
) -> None:
    p = Pics()
    p.outb(ELCR1, 0x08 if level_triggered else 0)  # IRQ 11
    p.pic.set_irq(11, True)
    if drop_before_ack:
        p.pic.set_irq(11, False)
    assert p.pic.acknowledge() == first
    p.outb(S_CMD, EOI)
    p.outb(M_CMD, EOI)
    assert p.pic.output() is again_after_eoi


def test_icw1_ltim_makes_every_line_level_triggered() -> None:
    p = Pics(icw4=-1)
    for port, value in [(M_CMD, 0x19), (M_DATA, 0x20), (M_DATA, 0x04), (M_DATA, 0x01)]:
        p.outb(port, value)
    p.pic.set_irq(4, True)
    assert p.pic.acknowledge() == 0x24
    p.outb(M_CMD, EOI)
    assert p.pic.output()
    p.pic.set_irq(4, False)
    assert not p.pic.output()


def test_icw1_resets_edge_sense_mask_and_isr() -> None:
    p = Pics()
    p.pic.set_irq(3, True)
    p.pic.acknowledge()
    p.outb(M_DATA, 0xF0)
    p.linux_init()
    assert p.inb(M_DATA) == 0 and p.isr() == (0, 0) and p.irr() == (0, 0)
    p.pic.set_irq(3, True)  # still high: no new edge
    assert not p.pic.output()
    p.pic.set_irq(3, False)
    p.pic.set_irq(3, True)
    assert p.pic.acknowledge() == 0x23


def test_ocw3_selects_irr_or_isr_and_imr_on_data_port() -> None:
    p = Pics()
    p.edge(4)
    p.edge(6)
    p.pic.acknowledge()
    p.outb(M_DATA, 0x81)
    assert p.inb(M_CMD) == 0x40  # IRR after ICW1
    p.outb(M_CMD, OCW3_READ_ISR)
    assert p.inb(M_CMD) == 0x10
    assert p.inb(M_CMD) == 0x10  # the selection sticks
    assert p.inb(M_DATA) == 0x81
    p.outb(M_CMD, OCW3_READ_IRR)
    assert p.inb(M_CMD) == 0x40


def test_poll_command() -> None:
    """OCW3 P: the next read is an INTA returning 0x80 | level (or 0 with nothing pending)."""
    p = Pics()
    p.outb(M_CMD, OCW3_POLL)
    assert p.inb(M_CMD) == 0x00
    p.edge(5)
    p.outb(M_CMD, OCW3_POLL)
    assert p.inb(M_DATA) == 0x85
    assert p.isr() == (0x20, 0)
    assert not p.pic.output()


def test_rotate_on_non_specific_eoi() -> None:
    """OCW2 R=1 EOI=1: the level just served becomes the lowest priority."""
    p = Pics()
    p.edge(3)
    assert p.pic.acknowledge() == 0x23
    p.edge(3)
    p.edge(5)
    p.outb(M_CMD, 0xA0)
    assert p.pic.master.priority_add == 4
    assert p.pic.acknowledge() == 0x25  # 5 now outranks 3


@pytest.mark.parametrize(("lowest", "first"), [(7, 0x21), (1, 0x26), (5, 0x26), (6, 0x21)])
def test_set_priority(lowest: int, first: int) -> None:
    p = Pics()
    p.outb(M_CMD, 0xC0 | lowest)
    p.edge(1)
    p.edge(6)
    assert p.pic.acknowledge() == first


def test_special_mask_mode_lets_lower_levels_through() -> None:
    p = Pics()
    p.edge(3)
    p.pic.acknowledge()
    p.edge(5)
    assert not p.pic.output()
    p.outb(M_DATA, 0x08)  # mask the level in service
    p.outb(M_CMD, 0x68)  # OCW3 ESMM SMM
    assert p.pic.output()
    assert p.pic.acknowledge() == 0x25
    p.outb(M_CMD, 0x48)  # reset special mask
    assert p.pic.master.special_mask is False


@pytest.mark.parametrize(
    ("port", "written", "read"), [(ELCR0, 0xFF, 0xF8), (ELCR1, 0xFF, 0xDE), (ELCR1, 0x0E, 0x0E)]
)
def test_elcr_masks(port: int, written: int, read: int) -> None:
    """IRQ 0, 1, 2, 8, 13 cannot be level-triggered (PIIX ELCR, QEMU elcr_mask)."""
    p = Pics()
    p.outb(port, written)
    assert p.inb(port) == read


def test_word_access_reaches_both_elcr_bytes() -> None:
    p = Pics()
    assert p.bus.write(ELCR0, 2, 0x0E20)
    assert p.bus.read(ELCR0, 2) == 0x0E20


@pytest.mark.parametrize("irq", [2, 16, -1])
def test_irq_without_an_input(irq: int) -> None:
    with pytest.raises(InvalidIrqError):
        Pics().pic.set_irq(irq, True)


def test_intr_callback_follows_the_output() -> None:
    p = Pics()
    p.edge(0)
    p.pic.acknowledge()
    p.outb(M_CMD, EOI)
    assert p.intr == [True, False]


def test_single_mode_master_treats_ir2_as_its_own() -> None:
    p = Pics(icw4=-1)
    for port, value in [(M_CMD, 0x13), (M_DATA, 0x40), (M_DATA, 0x01)]:  # no ICW3
        p.outb(port, value)
    assert p.pic.master.init_state == 0
    p.pic.slave.set_line(0, True)  # the slave chip still drives IR2
    assert p.pic.acknowledge() == 0x42


def test_describe_lists_both_chips() -> None:
    lines = Pics().pic.describe()
    assert lines[0].startswith("master: irr=00 imr=00 isr=00 hprio=0 irq_base=20")
    assert lines[1].startswith("slave:")
