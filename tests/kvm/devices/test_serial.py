"""The 16550A UART against the PC16550D datasheet and what real drivers do with it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pyvmx.kvm.devices.bus import IoBus, IrqLine
from pyvmx.kvm.devices.serial import Serial16550A

BASE = 0x3F8
RBR = THR = DLL = BASE
IER = DLM = BASE + 1
IIR = FCR = BASE + 2
LCR = BASE + 3
MCR = BASE + 4
LSR = BASE + 5
MSR = BASE + 6
SCR = BASE + 7

IIR_NONE = 0x01
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_CTI = 0x0C
IIR_THRE = 0x02
IIR_MSR = 0x00
FIFO_BITS = 0xC0

MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_BI, LSR_THRE, LSR_TEMT, LSR_FIFO_ERR = 0x01, 0x02, 0x10, 0x20, 0x40, 0x80


class Uart:
    """A UART on an I/O bus, with its IRQ line recorded."""

    def __init__(self) -> None:
        self.edges: list[bool] = []
        self.irq = IrqLine(4, lambda _irq, level: self.edges.append(level))
        self.dev = Serial16550A(BASE, self.irq)
        self.bus = IoBus()
        self.bus.register_all(self.dev, self.dev.io_ranges)

    def inb(self, port: int) -> int:
        value = self.bus.read(port, 1)
        assert value is not None
        return value

    def outb(self, port: int, value: int) -> None:
        assert self.bus.write(port, 1, value)

    def init_fifo(
        self, fcr: int = 0x07, ier: int = 0x0F, mcr: int = MCR_DTR | MCR_RTS | MCR_OUT2
    ) -> None:
        self.outb(FCR, fcr)
        self.outb(MCR, mcr)
        self.outb(IER, ier)


def test_polled_transmit_loop_produces_the_exact_bytes() -> None:
    """A bare-metal console: 115200 8N1, FIFOs on, then wait for LSR.THRE and write THR."""
    u = Uart()
    for port, value in [
        (IER, 0), (LCR, 0x80), (DLL, 1), (DLM, 0), (LCR, 0x03), (FCR, 0xC7), (MCR, 0x0B),
    ]:  # fmt: skip
        u.outb(port, value)
    message = b"Hello, VMX!\r\n\x00\xff"
    for byte in message:
        spins = 0
        while not u.inb(LSR) & LSR_THRE:
            spins += 1
            assert spins < 10
        u.outb(THR, byte)
    assert bytes(u.dev.transmitted) == message
    # transmission takes no virtual time
    assert u.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_output_callback_receives_each_byte() -> None:
    out: list[bytes] = []
    dev = Serial16550A(output=out.append)
    dev.io_write(THR, 1, ord("A"))
    dev.io_write(THR, 2, 0x4342)  # a word write is two byte writes: THR, then IER
    assert out == [b"A", b"B"]
    assert dev.io_read(IER, 1) == 0x03  # 0x43 & 0x0F


@pytest.mark.parametrize(
    ("dll", "dlm", "divisor", "baud"),
    [
        (1, 0, 1, 115200),
        (2, 0, 2, 57600),
        (12, 0, 12, 9600),
        (0x80, 0x01, 0x180, 300),
        (0, 0, 0, None),  # the illegal divisor 0
    ],
)
def test_divisor_latch_behind_dlab(dll: int, dlm: int, divisor: int, baud: int | None) -> None:
    """Datasheet 8.1: with LCR.DLAB, offsets 0/1 are DLL/DLM; without, RBR/THR and IER."""
    u = Uart()
    u.outb(LCR, 0x83)
    u.outb(DLL, dll)
    u.outb(DLM, dlm)
    assert (u.inb(DLL), u.inb(DLM)) == (dll, dlm)
    assert u.dev.transmitted == b""  # DLL is not THR
    assert u.inb(LCR) == 0x83
    u.outb(LCR, 0x03)
    assert u.inb(IER) == 0  # IER untouched by the DLM write
    assert u.dev.divisor == divisor
    assert u.dev.baud_rate == baud
    assert u.dev.line_settings == "8N1"


def test_reset_values() -> None:
    """Datasheet Table VI (divisor 12 as QEMU): IIR 0x01, LSR 0x60, MSR shows the inputs."""
    u = Uart()
    registers = [u.inb(p) for p in (IER, IIR, LCR, MCR, LSR, MSR, SCR)]
    assert registers == [0, 0x01, 0, 0, 0x60, 0xB0, 0]
    assert u.dev.baud_rate == 9600


def _cts_drops(u: Uart) -> None:
    u.dev.set_modem_inputs(cts=False, dsr=True, ri=False, dcd=True)


def _overrun(u: Uart) -> None:
    u.dev.feed(bytes(17))


def _one_char(u: Uart) -> None:
    u.dev.feed(b"x")


def _one_char_trigger_14(u: Uart) -> None:
    u.outb(FCR, 0xC7)
    u.dev.feed(b"x")


def _thre_consumed_then_cts_drops(u: Uart) -> None:
    u.inb(IIR)
    _cts_drops(u)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (_overrun, IIR_RLS),  # line status beats received data
        (_one_char, IIR_RDA),  # received data beats THRE
        (_one_char_trigger_14, IIR_CTI),  # character timeout beats THRE
        (_cts_drops, IIR_THRE),  # THRE beats modem status
        (_thre_consumed_then_cts_drops, IIR_MSR),  # modem status comes last
    ],
)
def test_iir_priority(setup: Callable[[Uart], None], expected: int) -> None:
    """Datasheet Table IV: RLS > RDA = character timeout > THRE > modem status."""
    u = Uart()
    u.init_fifo()  # trigger level 1, every interrupt enabled
    setup(u)
    assert u.inb(IIR) == FIFO_BITS | expected


def _read_lsr(u: Uart) -> None:
    u.inb(LSR)


def _drain_rbr(u: Uart) -> None:
    u.inb(LSR)
    for _ in range(16):
        u.inb(RBR)


def _read_msr(u: Uart) -> None:
    u.inb(MSR)


@pytest.mark.parametrize(
    ("setup", "clear", "after"),
    [
        (_overrun, _read_lsr, IIR_RDA),  # RLS reset by reading the LSR
        (_overrun, _drain_rbr, IIR_THRE),  # RDA reset when the FIFO drops below the trigger
        (_thre_consumed_then_cts_drops, _read_msr, IIR_NONE),  # MSR reset by reading the MSR
    ],
)
def test_iir_clearing_rules(
    setup: Callable[[Uart], None], clear: Callable[[Uart], None], after: int
) -> None:
    """Datasheet Table IV, "Interrupt reset control"."""
    u = Uart()
    u.init_fifo()
    setup(u)
    clear(u)
    assert u.inb(IIR) == FIFO_BITS | after


def test_thre_cleared_by_iir_read_only_when_it_is_the_source() -> None:
    u = Uart()
    u.init_fifo(fcr=0x01, ier=0x03)
    u.dev.feed(b"a")
    assert u.inb(IIR) == FIFO_BITS | IIR_RDA  # THRE pending but not reported: not cleared
    u.inb(RBR)
    assert u.inb(IIR) == FIFO_BITS | IIR_THRE  # now it is reported, and cleared by this read
    assert u.inb(IIR) == FIFO_BITS | IIR_NONE


def test_thr_write_clears_thre_and_instant_transmission_rearms_it() -> None:
    """Interrupt-driven TX (Linux serial8250_tx_chars) needs a THRE interrupt per batch."""
    u = Uart()
    u.init_fifo(ier=0x02)
    assert u.inb(IIR) == FIFO_BITS | IIR_THRE
    assert u.inb(IIR) == FIFO_BITS | IIR_NONE
    assert u.edges == [True, False]
    u.outb(THR, ord("z"))
    assert u.edges == [True, False, True]  # a fresh edge for an edge-triggered PIC
    assert u.inb(IIR) == FIFO_BITS | IIR_THRE


@pytest.mark.parametrize(
    ("ier_writes", "expected"),
    [
        ([], IIR_NONE),  # an IIR read cleared it
        ([0x02], IIR_NONE),  # rewriting 1 does not re-arm
        ([0x00, 0x02], IIR_THRE),  # 1 -> 0 -> 1 re-arms (Linux's UART_BUG_THRE probe)
        ([0x03], IIR_NONE),  # another bit changing does not re-arm THRE
    ],
)
def test_thre_on_enable_quirk(ier_writes: list[int], expected: int) -> None:
    """IER.ETBEI 0 -> 1 with THR empty makes THRE pending again (QEMU, Bochs, real parts)."""
    u = Uart()
    u.init_fifo(ier=0)
    assert u.inb(IIR) == FIFO_BITS | IIR_NONE
    u.outb(IER, 0x02)  # 0 -> 1 arms
    assert u.inb(IIR) == FIFO_BITS | IIR_THRE  # reported, and cleared by this read
    for value in ier_writes:
        u.outb(IER, value)
    assert u.inb(IIR) == FIFO_BITS | expected


@pytest.mark.parametrize(("fcr", "trigger"), [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_rx_fifo_trigger_levels(fcr: int, trigger: int) -> None:
    """Datasheet 8.6: RDA at the trigger level; below it, the character timeout."""
    u = Uart()
    u.init_fifo(fcr=fcr, ier=0x01)
    assert u.dev.rx_trigger_level == trigger
    for count in range(1, 17):
        u.dev.feed(b"d")
        expected = IIR_RDA if count >= trigger else IIR_CTI
        assert u.inb(IIR) == FIFO_BITS | expected, count


def test_rx_fifo_overrun_keeps_the_fifo() -> None:
    """Datasheet 8.3 bit 1: in FIFO mode the 17th character is lost, the FIFO kept, OE set."""
    u = Uart()
    u.init_fifo()
    data = bytes(range(0x41, 0x52))  # 17 characters
    assert u.dev.feed(data) == 16
    assert u.dev.rx_room == 0
    lsr = u.inb(LSR)
    assert lsr & (LSR_DR | LSR_OE) == LSR_DR | LSR_OE
    assert not u.inb(LSR) & LSR_OE  # reset by the read
    received = bytearray()
    while u.inb(LSR) & LSR_DR:
        received.append(u.inb(RBR))
    assert bytes(received) == data[:16]


def test_holding_register_overrun_without_fifo() -> None:
    """Datasheet 8.3 bit 1: without FIFOs the new character overwrites RBR."""
    u = Uart()
    u.init_fifo(fcr=0x00)
    assert u.dev.feed(b"ab") == 2
    assert u.inb(IIR) == IIR_RLS  # bits 7:6 = 00 without FIFOs
    assert u.inb(LSR) & (LSR_DR | LSR_OE) == LSR_DR | LSR_OE
    assert u.inb(RBR) == ord("b")
    assert not u.inb(LSR) & LSR_DR


@pytest.mark.parametrize(("fcr", "kept"), [(0x03, 0), (0x05, 3), (0x00, 0), (0x41, 3)])
def test_fcr_clears(fcr: int, kept: int) -> None:
    """FCR bit 1 clears the RX FIFO; changing bit 0 clears both; bit 2 only the (empty) TX."""
    u = Uart()
    u.init_fifo(fcr=0x01)
    u.dev.feed(b"abc")
    u.outb(FCR, fcr)
    assert u.dev.rx_count == kept


def test_break_sets_bi_and_fifo_error() -> None:
    u = Uart()
    u.init_fifo(fcr=0x01, ier=0x05)
    u.dev.feed(b"a")
    u.dev.feed_break()
    assert u.inb(IIR) == FIFO_BITS | IIR_RDA  # BI belongs to the 2nd character, not on top yet
    lsr = u.inb(LSR)
    assert lsr & (LSR_BI | LSR_FIFO_ERR) == LSR_FIFO_ERR
    assert u.inb(RBR) == ord("a")
    assert u.inb(IIR) == FIFO_BITS | IIR_RLS  # the break reached the top
    assert u.inb(LSR) & LSR_BI
    assert u.inb(RBR) == 0
    assert not u.inb(LSR) & (LSR_BI | LSR_FIFO_ERR)


@pytest.mark.parametrize(
    ("mcr", "msr_inputs"),
    [
        (MCR_LOOP, 0x00),
        (MCR_LOOP | MCR_RTS, 0x10),  # RTS -> CTS
        (MCR_LOOP | MCR_DTR, 0x20),  # DTR -> DSR
        (MCR_LOOP | MCR_OUT1, 0x40),  # OUT1 -> RI
        (MCR_LOOP | MCR_OUT2, 0x80),  # OUT2 -> DCD
        (MCR_LOOP | MCR_OUT2 | MCR_RTS, 0x90),  # what Linux's autoconfig expects
    ],
)
def test_loopback_msr_reflects_mcr(mcr: int, msr_inputs: int) -> None:
    """Datasheet 8.7: in loopback the modem outputs feed the modem inputs."""
    u = Uart()
    u.outb(MCR, mcr)
    assert u.inb(MSR) & 0xF0 == msr_inputs


def test_loopback_transmit_is_received_and_sin_is_disconnected() -> None:
    u = Uart()
    u.init_fifo(ier=0x01, mcr=MCR_LOOP | MCR_OUT2)
    u.outb(THR, 0x5A)
    assert u.dev.feed(b"outside") == 0
    assert u.dev.transmitted == b""
    assert u.inb(LSR) & LSR_DR
    assert u.inb(IIR) == FIFO_BITS | IIR_RDA
    assert not u.irq.level  # the OUT2 pin is forced inactive in loopback
    assert u.inb(RBR) == 0x5A


@pytest.mark.parametrize(
    ("mcr", "pending", "line"),
    [
        (MCR_OUT2, True, True),
        (0, True, False),
        (MCR_DTR | MCR_RTS | MCR_OUT1, True, False),
        (MCR_OUT2, False, False),
        (MCR_OUT2 | MCR_LOOP, True, False),
    ],
)
def test_irq_line_gated_by_out2(mcr: int, pending: bool, line: bool) -> None:
    u = Uart()
    u.outb(IER, 0x02 if pending else 0x00)
    u.outb(MCR, mcr)
    assert u.dev.interrupt_pending is pending
    assert u.irq.level is line


def test_out2_toggles_the_line_while_pending() -> None:
    u = Uart()
    u.outb(IER, 0x02)
    u.outb(MCR, MCR_OUT2)
    u.outb(MCR, 0)
    u.outb(MCR, MCR_OUT2)
    assert u.edges == [True, False, True]


@pytest.mark.parametrize(
    ("inputs", "deltas"),
    [
        ({"cts": False, "dsr": True, "ri": False, "dcd": True}, 0x01),  # DCTS
        ({"cts": True, "dsr": False, "ri": False, "dcd": True}, 0x02),  # DDSR
        ({"cts": True, "dsr": True, "ri": True, "dcd": True}, 0x00),  # RI rising: no TERI
        ({"cts": True, "dsr": True, "ri": False, "dcd": False}, 0x08),  # DDCD
    ],
)
def test_msr_deltas_cleared_on_read(inputs: dict[str, bool], deltas: int) -> None:
    u = Uart()
    u.dev.set_modem_inputs(**inputs)
    first = u.inb(MSR)
    assert first & 0x0F == deltas
    assert u.inb(MSR) & 0x0F == 0
    assert u.inb(MSR) >> 4 == first >> 4


def test_ri_trailing_edge_sets_teri() -> None:
    u = Uart()
    u.dev.set_modem_inputs(cts=True, dsr=True, ri=True, dcd=True)
    u.inb(MSR)
    u.dev.set_modem_inputs(cts=True, dsr=True, ri=False, dcd=True)
    assert u.inb(MSR) & 0x0F == 0x04


def test_scratch_register() -> None:
    u = Uart()
    for value in (0x00, 0x5A, 0xA5, 0xFF):
        u.outb(SCR, value)
        assert u.inb(SCR) == value


def test_linux_8250_autoconfig_sees_a_16550a() -> None:
    """The probes of Linux drivers/tty/serial/8250/8250_port.c autoconfig(), in order."""
    u = Uart()
    u.outb(IER, 0)
    assert u.inb(IER) & 0x0F == 0
    u.outb(IER, 0x0F)
    assert u.inb(IER) & 0x0F == 0x0F
    u.outb(IER, 0)
    u.outb(MCR, MCR_LOOP | 0x0A)
    assert u.inb(MSR) & 0xF0 == 0x90
    u.outb(MCR, 0)
    u.outb(LCR, 0xBF)
    u.outb(FCR, 0)  # the EFR write of a 16650 is an FCR write here
    u.outb(LCR, 0)
    u.outb(FCR, 0x01)
    assert u.inb(IIR) >> 6 == 3  # FIFOs work: a 16550A, not a 16550
    u.outb(LCR, 0x80)
    assert u.inb(IIR) != 0  # no EFR behind DLAB: not an ST16C650V1
    u.outb(LCR, 0)
    u.outb(FCR, 0x01 | 0x20)
    assert u.inb(IIR) >> 5 == 6  # no 64-byte FIFO: not a 16750
    u.outb(IER, 0x40)
    assert not u.inb(IER) & 0x40  # no UUE bit: not an XScale


def test_wide_access_past_the_device_reads_open_bus() -> None:
    dev = Serial16550A()
    assert dev.io_read(SCR, 2) == 0xFF00  # SCR = 0, then port 0x400 floats
