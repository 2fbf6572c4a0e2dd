"""A 16550A UART (National Semiconductor PC16550D datasheet; QEMU hw/char/serial.c).

Eight byte-wide registers at ``base`` (COM1: 0x3F8, IRQ 4). With LCR.DLAB (bit 7) set, offsets
0 and 1 are the divisor latch (DLL, DLM); offsets 2..7 do not depend on DLAB::

    0  RBR (read) / THR (write) / DLL      4  MCR
    1  IER / DLM                            5  LSR
    2  IIR (read) / FCR (write)             6  MSR
    3  LCR                                  7  SCR

Modelling choices (each checked against the datasheet section named):

* Transmission takes no virtual time. A byte written to THR goes straight to ``output`` (or,
  in loopback, to the receiver), so LSR.THRE and LSR.TEMT always read 1 and the TX FIFO is
  always empty. Because THR empties at once, the THRE interrupt, cleared by the THR write
  (Table IV, "Reset control"), is set again at once -- as it is a character time later on
  real hardware and right after ``serial_xmit`` in QEMU. Linux's interrupt-driven transmit
  depends on this: it writes one FIFO's worth per THRE interrupt and waits for the next.
* "THRE on enable": setting IER.ETBEI (bit 1) from 0 to 1 while THR is empty makes the THRE
  interrupt pending again even if an IIR read had cleared it (not in the datasheet; real
  parts, Bochs and QEMU do it, and Linux's UART_BUG_THRE/TXEN probes test for it).
* Character timeout (IIR 0b1100, section 8.6 "FIFO interrupt mode operation") needs a notion
  of "no character received or read for 4 character times". Here it is pending whenever FIFOs
  are enabled, IER.ERBFI is set and the RX FIFO holds at least one character but fewer than
  the trigger level: the timeout has always elapsed by the time a driver looks, since virtual
  time does not pass between a byte's arrival and the guest's next instruction boundary
  that matters to it. Like QEMU, IER.ERBFI gates it.
* Receive overrun (LSR.OE): in FIFO mode a character arriving at a full FIFO is lost and the
  FIFO kept (section 8.4, LSR bit 1); without FIFOs the new character overwrites RBR.
* In loopback (MCR bit 4, section 8.7) SIN is disconnected (``feed`` drops data), THR goes to
  the receiver, MSR bits 7:4 read OUT2, OUT1, DTR, RTS (as DCD, RI, DSR, CTS), and the modem
  output pins are forced inactive -- so OUT2 no longer gates the interrupt onto the ISA bus
  and the IRQ line stays low (on a PC the OUT2 pin enables the IRQ driver).
* The IRQ line is (an interrupt is pending) AND MCR.OUT2 AND NOT loopback, driven through an
  :class:`IrqLine`, which passes on only changes of level.
* Divisor latch: kept and readable; :attr:`baud_rate` is 115200 / divisor. No timing effect.
  After reset it is 12 (9600 baud), as in QEMU; the datasheet leaves it undefined.
* Errors: no parity or framing errors arise on a virtual line; a break can be received with
  :meth:`feed_break` (a 0 byte with LSR.BI). In FIFO mode the error bits of a character show
  in LSR when it reaches the top of the FIFO, and LSR bit 7 is set while an errored character
  is in the FIFO and cleared by an LSR read when no other errored character remains.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import IntEnum, IntFlag

from pyvmx.kvm.devices.bus import IrqLine, read_bytewise, write_bytewise

COM1_BASE = 0x3F8
COM1_IRQ = 4
UART_FIFO_SIZE = 16
UART_CLOCK_BAUD_BASE = 115200  # 1.8432 MHz / 16
_RESET_DIVISOR = 12


class UartReg(IntEnum):
    """Register offsets from the base port (datasheet Table II)."""

    RBR_THR_DLL = 0
    IER_DLM = 1
    IIR_FCR = 2
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


class Ier(IntFlag):
    """Interrupt Enable Register (datasheet 8.5); bits 7:4 are always 0."""

    ERBFI = 0x01  # received data available (and character timeout)
    ETBEI = 0x02  # transmitter holding register empty
    ELSI = 0x04  # receiver line status
    EDSSI = 0x08  # modem status


class IirId(IntEnum):
    """IIR bits 3:0 (datasheet Table IV), highest priority first."""

    NONE = 0b0001
    RECEIVER_LINE_STATUS = 0b0110
    RECEIVED_DATA_AVAILABLE = 0b0100
    CHARACTER_TIMEOUT = 0b1100
    THR_EMPTY = 0b0010
    MODEM_STATUS = 0b0000


IIR_FIFOS_ENABLED = 0xC0


class Fcr(IntFlag):
    """FIFO Control Register (datasheet 8.4); bits 7:6 select the RX trigger level."""

    ENABLE = 0x01
    CLEAR_RX = 0x02
    CLEAR_TX = 0x04
    DMA_MODE = 0x08


FCR_TRIGGER_LEVELS = (1, 4, 8, 14)  # FCR bits 7:6 = 00, 01, 10, 11


class Lcr(IntFlag):
    """Line Control Register (datasheet 8.2); bits 1:0 word length, bit 2 stop bits."""

    PARITY_ENABLE = 0x08
    EVEN_PARITY = 0x10
    STICK_PARITY = 0x20
    SET_BREAK = 0x40
    DLAB = 0x80


class Mcr(IntFlag):
    """Modem Control Register (datasheet 8.7); bits 7:5 are always 0."""

    DTR = 0x01
    RTS = 0x02
    OUT1 = 0x04
    OUT2 = 0x08
    LOOP = 0x10


class Lsr(IntFlag):
    """Line Status Register (datasheet 8.3)."""

    DR = 0x01
    OE = 0x02
    PE = 0x04
    FE = 0x08
    BI = 0x10
    THRE = 0x20
    TEMT = 0x40
    RX_FIFO_ERROR = 0x80


_LSR_CHAR_ERRORS = Lsr.PE | Lsr.FE | Lsr.BI
_LSR_INTERRUPTING = Lsr.OE | _LSR_CHAR_ERRORS


class Msr(IntFlag):
    """Modem Status Register (datasheet 8.8): deltas in bits 3:0, input levels in 7:4."""

    DCTS = 0x01
    DDSR = 0x02
    TERI = 0x04
    DDCD = 0x08
    CTS = 0x10
    DSR = 0x20
    RI = 0x40
    DCD = 0x80


_MSR_DELTAS = 0x0F


class Serial16550A:
    """A 16550A UART on the I/O bus; see the module docstring for the modelling choices."""

    def __init__(
        self,
        base: int = COM1_BASE,
        irq: IrqLine | None = None,
        output: Callable[[bytes], None] | None = None,
    ) -> None:
        self.base = base
        self.irq = irq if irq is not None else IrqLine.unconnected(COM1_IRQ)
        self.transmitted = bytearray()
        self._output = output if output is not None else self.transmitted.extend
        self._external_msr = int(Msr.CTS | Msr.DSR | Msr.DCD)  # a terminal is attached
        self.reset()

    # -- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Master reset (datasheet Table VI): every register to its reset value, FIFOs empty."""
        self._divisor = _RESET_DIVISOR
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._fifo_enabled = False
        self._trigger = 1
        self._rx: deque[tuple[int, int]] = deque()  # (byte, its PE/FE/BI bits)
        self._lsr_sticky = 0  # OE, PE, FE, BI until the LSR is read
        self._fifo_error = False  # LSR bit 7
        self._thr_ipending = False
        self._msr_deltas = 0
        self._msr_inputs = self._modem_inputs()
        self._update_irq()

    @property
    def io_ranges(self) -> tuple[tuple[int, int, str], ...]:
        return ((self.base, 8, f"serial@{self.base:#x}"),)

    @property
    def divisor(self) -> int:
        """The 16-bit divisor latch (DLM:DLL)."""
        return self._divisor

    @property
    def baud_rate(self) -> int | None:
        """115200 / divisor (a 1.8432 MHz crystal), or None for the illegal divisor 0."""
        return UART_CLOCK_BAUD_BASE // self._divisor if self._divisor else None

    @property
    def line_settings(self) -> str:
        """Word length, parity and stop bits from LCR, as "8N1"."""
        bits = 5 + (self._lcr & 0x03)
        if not self._lcr & Lcr.PARITY_ENABLE:
            parity = "N"
        elif self._lcr & Lcr.STICK_PARITY:
            parity = "S" if self._lcr & Lcr.EVEN_PARITY else "M"
        else:
            parity = "E" if self._lcr & Lcr.EVEN_PARITY else "O"
        stop = "1" if not self._lcr & 0x04 else ("1.5" if bits == 5 else "2")
        return f"{bits}{parity}{stop}"

    @property
    def fifo_enabled(self) -> bool:
        return self._fifo_enabled

    @property
    def rx_trigger_level(self) -> int:
        return self._trigger

    @property
    def rx_count(self) -> int:
        """Characters waiting in the RX FIFO (or the holding register)."""
        return len(self._rx)

    @property
    def rx_room(self) -> int:
        """How many characters :meth:`feed` can take now without an overrun."""
        if self._mcr & Mcr.LOOP:
            return 0
        return self._rx_capacity - len(self._rx)

    @property
    def _rx_capacity(self) -> int:
        return UART_FIFO_SIZE if self._fifo_enabled else 1

    # -- the outside world -------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Characters arriving on SIN; returns how many were stored (the rest overran).

        In loopback SIN is disconnected and nothing is stored (datasheet 8.7)."""
        if self._mcr & Mcr.LOOP:
            return 0
        stored = sum(self._receive(byte, 0) for byte in data)
        self._update_irq()
        return stored

    def feed_break(self) -> None:
        """A break condition on SIN: a 0 character with LSR.BI (datasheet 8.3, LSR bit 4)."""
        if self._mcr & Mcr.LOOP:
            return
        self._receive(0, int(Lsr.BI))
        self._update_irq()

    def set_modem_inputs(self, *, cts: bool, dsr: bool, ri: bool, dcd: bool) -> None:
        """Drive the modem status inputs; changes set the MSR delta bits (datasheet 8.8)."""
        self._external_msr = int(
            (Msr.CTS if cts else 0)
            | (Msr.DSR if dsr else 0)
            | (Msr.RI if ri else 0)
            | (Msr.DCD if dcd else 0)
        )
        self._refresh_modem_inputs()
        self._update_irq()

    # -- port I/O ----------------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        return read_bytewise(self._read_byte, port, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        write_bytewise(self._write_byte, port, size, value)

    def _read_byte(self, port: int) -> int:
        offset = port - self.base
        if not 0 <= offset < 8:
            return 0xFF  # past the device: an undriven ISA bus
        dlab = bool(self._lcr & Lcr.DLAB)
        value: int
        if offset == UartReg.RBR_THR_DLL:
            value = self._divisor & 0xFF if dlab else self._read_rbr()
        elif offset == UartReg.IER_DLM:
            value = self._divisor >> 8 if dlab else self._ier
        elif offset == UartReg.IIR_FCR:
            value = self._read_iir()
        elif offset == UartReg.LCR:
            value = self._lcr
        elif offset == UartReg.MCR:
            value = self._mcr
        elif offset == UartReg.LSR:
            value = self._read_lsr()
        elif offset == UartReg.MSR:
            value = self._read_msr()
        else:
            value = self._scr
        self._update_irq()
        return value

    def _write_byte(self, port: int, value: int) -> None:
        offset = port - self.base
        if not 0 <= offset < 8:
            return
        dlab = bool(self._lcr & Lcr.DLAB)
        if offset == UartReg.RBR_THR_DLL:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif offset == UartReg.IER_DLM:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif offset == UartReg.IIR_FCR:
            self._write_fcr(value)
        elif offset == UartReg.LCR:
            self._lcr = value
        elif offset == UartReg.MCR:
            self._mcr = value & 0x1F
            self._refresh_modem_inputs()
        elif offset == UartReg.SCR:
            self._scr = value
        # LSR and MSR are read-only here (writing them is for factory test on the part).
        self._update_irq()

    # -- registers ---------------------------------------------------------------------------

    def _read_rbr(self) -> int:
        if not self._rx:
            return 0
        byte, _ = self._rx.popleft()
        if self._rx:
            self._lsr_sticky |= self._rx[0][1]  # the next character's errors reach the top
        return byte

    def _write_thr(self, value: int) -> None:
        # THR empties at once into the shift register and out of the part (see module doc).
        self._thr_ipending = False
        if self._mcr & Mcr.LOOP:
            self._receive(value, 0)
        else:
            self._output(bytes((value,)))
        self._thr_ipending = True

    def _write_ier(self, value: int) -> None:
        old = self._ier
        self._ier = value & 0x0F
        if (old ^ self._ier) & Ier.ETBEI:
            # THRE-on-enable: re-sampled when ETBEI changes (THR is always empty here).
            self._thr_ipending = bool(self._ier & Ier.ETBEI)

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & Fcr.ENABLE)
        if enable != self._fifo_enabled:
            # Changing FCR0 clears both FIFOs (datasheet 8.4, bit 0).
            self._fifo_enabled = enable
            self._clear_rx()
        if not enable:
            return  # the other bits are programmed only with FCR0 = 1
        if value & Fcr.CLEAR_RX:
            self._clear_rx()
        # CLEAR_TX: the TX FIFO is always empty. DMA mode (bit 3) selects RXRDY/TXRDY pin
        # behaviour only, which nothing here sees.
        self._trigger = FCR_TRIGGER_LEVELS[value >> 6]

    def _read_iir(self) -> int:
        source = self._pending_source()
        value = int(source) | (IIR_FIFOS_ENABLED if self._fifo_enabled else 0)
        if source == IirId.THR_EMPTY:
            self._thr_ipending = False  # reading IIR clears THRE when it is the source
        return value

    def _read_lsr(self) -> int:
        value = self._lsr_sticky
        if self._rx:
            value |= Lsr.DR
        value |= Lsr.THRE | Lsr.TEMT
        if self._fifo_enabled and self._fifo_error:
            value |= Lsr.RX_FIFO_ERROR
        # OE, PE, FE, BI reset on read; bit 7 stays while later errored characters remain.
        self._lsr_sticky = 0
        self._fifo_error = any(flags for _, flags in list(self._rx)[1:])
        return int(value)

    def _read_msr(self) -> int:
        value = self._msr_inputs | self._msr_deltas
        self._msr_deltas = 0
        return value

    # -- internals ---------------------------------------------------------------------------

    def _receive(self, byte: int, flags: int) -> bool:
        """One character from the receive shift register into RBR / the RX FIFO."""
        if len(self._rx) >= self._rx_capacity:
            self._lsr_sticky |= Lsr.OE
            if self._fifo_enabled:
                return False  # the FIFO keeps its contents; the new character is lost
            self._rx.clear()  # without FIFOs the new character overwrites RBR
        if not self._rx:
            self._lsr_sticky |= flags  # straight to the top: its errors show at once
        if flags and self._fifo_enabled:
            self._fifo_error = True
        self._rx.append((byte, flags))
        return True

    def _clear_rx(self) -> None:
        self._rx.clear()
        self._fifo_error = False

    def _modem_inputs(self) -> int:
        if not self._mcr & Mcr.LOOP:
            return self._external_msr
        mcr = self._mcr
        return (
            (Msr.CTS if mcr & Mcr.RTS else 0)
            | (Msr.DSR if mcr & Mcr.DTR else 0)
            | (Msr.RI if mcr & Mcr.OUT1 else 0)
            | (Msr.DCD if mcr & Mcr.OUT2 else 0)
        )

    def _refresh_modem_inputs(self) -> None:
        new = self._modem_inputs()
        changed = new ^ self._msr_inputs
        deltas = 0
        if changed & Msr.CTS:
            deltas |= Msr.DCTS
        if changed & Msr.DSR:
            deltas |= Msr.DDSR
        if changed & Msr.DCD:
            deltas |= Msr.DDCD
        if changed & Msr.RI and not new & Msr.RI:
            deltas |= Msr.TERI  # trailing edge only
        self._msr_deltas |= deltas
        self._msr_inputs = new

    def _pending_source(self) -> IirId:
        """The highest-priority pending interrupt (datasheet Table IV)."""
        ier = self._ier
        if ier & Ier.ELSI and self._lsr_sticky & _LSR_INTERRUPTING:
            return IirId.RECEIVER_LINE_STATUS
        if ier & Ier.ERBFI and self._rx:
            if not self._fifo_enabled or len(self._rx) >= self._trigger:
                return IirId.RECEIVED_DATA_AVAILABLE
            return IirId.CHARACTER_TIMEOUT
        if ier & Ier.ETBEI and self._thr_ipending:
            return IirId.THR_EMPTY
        if ier & Ier.EDSSI and self._msr_deltas:
            return IirId.MODEM_STATUS
        return IirId.NONE

    @property
    def interrupt_pending(self) -> bool:
        """The UART's INTR output, before the OUT2 gate."""
        return self._pending_source() != IirId.NONE

    def _update_irq(self) -> None:
        gated = bool(self._mcr & Mcr.OUT2) and not self._mcr & Mcr.LOOP
        self.irq.set_level(gated and self.interrupt_pending)

    def __repr__(self) -> str:
        return (
            f"Serial16550A(base={self.base:#x}, irq={self.irq.irq}, {self.baud_rate} baud "
            f"{self.line_settings}, ier={self._ier:#x}, mcr={self._mcr:#x}, rx={len(self._rx)})"
        )
