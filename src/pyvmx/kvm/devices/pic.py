"""The PC's two cascaded 8259A PICs (Intel 8259A datasheet; QEMU hw/intc/i8259.c; Linux
arch/x86/kvm/i8259.c).

The master sits at ports 0x20/0x21 and drives the CPU's INTR; the slave sits at 0xA0/0xA1 and
its INT output drives the master's IR2. The PIIX edge/level control registers (ELCR) at
0x4D0/0x4D1 choose level triggering per line (IRQ 0, 1, 2, 8 and 13 are always edge: ELCR
masks 0xF8 and 0xDE, as in QEMU).

Behaviour, by datasheet section:

* **Initialization** ("Initialization Command Words"): ICW1 (bit 4 set, on the command port)
  starts the sequence and resets the chip: edge-sense latches cleared (an edge-triggered line
  must go low then high again to interrupt), IMR and ISR cleared, IR7 lowest priority, special
  mask mode off, status read set to IRR, and ICW4 functions cleared when IC4 = 0. ICW1 bit 3
  (LTIM) makes every line of the chip level-triggered. ICW2 gives the vector base (bits 2:0
  ignored); ICW3 follows unless SNGL; ICW4 follows if IC4 (bit 1 AEOI, bit 4 special fully
  nested mode; bit 0 8086 mode is stored -- the INTA cycle always yields an 8086 vector, MCS-80
  CALL sequences are not modelled; buffered-mode bits are ignored). ICW3 is stored: the slave
  always answers for the master's IR2, and the master cascades unless it was set up SNGL.
* **Triggering**: an edge-triggered request latches IRR on a 0->1 transition of the input and
  stays latched when the input falls before INTA (QEMU and KVM do the same; the datasheet
  asks the input to stay high until INTA). A level-triggered request follows the input.
* **Priority** ("Interrupt sequence", "Priority"): a request interrupts when, unmasked, it has
  a higher priority than every bit in service; in special mask mode in-service bits that are
  masked are ignored (as QEMU does); in special fully nested mode the master ignores its
  cascade bit in service so a higher-priority slave request gets through. Rotation is kept as
  ``priority_add`` -- the line that currently has the highest priority -- as in QEMU.
* **INTA** (:meth:`Pic.acknowledge`): the highest request goes IRR -> ISR (not ISR under AEOI,
  rotating if "rotate in AEOI" is set); a level-triggered IRR bit is left as the input says. A
  request that went away before INTA gives the spurious vector of IR7 (base + 7) with no ISR
  bit set; a slave that has nothing when the master acknowledged IR2 gives slave base + 7
  while the master's ISR bit 2 stays set (so software must EOI the master for IRQ 15).
* **OCW1** (data port): IMR. **OCW2**: non-specific EOI, specific EOI, rotate on
  non-specific EOI, rotate on specific EOI, set priority, set/clear rotate in AEOI.
  **OCW3**: read IRR/ISR select, poll command (the next read of either port of the chip is an
  INTA: 0x80 | level, or 0 when nothing is pending), special mask mode set/reset.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmx.kvm.devices.bus import read_bytewise, write_bytewise

PIC_MASTER_COMMAND = 0x20
PIC_MASTER_DATA = 0x21
PIC_SLAVE_COMMAND = 0xA0
PIC_SLAVE_DATA = 0xA1
ELCR_MASTER = 0x4D0
ELCR_SLAVE = 0x4D1
ELCR_MASTER_MASK = 0xF8  # IRQ 0, 1, 2 are always edge-triggered
ELCR_SLAVE_MASK = 0xDE  # IRQ 8 and 13 are always edge-triggered
CASCADE_IRQ = 2
SPURIOUS_LINE = 7
NR_PIC_IRQS = 16

ICW1_IC4 = 0x01
ICW1_SNGL = 0x02
ICW1_LTIM = 0x08
ICW1_INIT = 0x10
ICW4_8086 = 0x01
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10
OCW3_SELECT = 0x08  # bits 4:3 = 01 mark an OCW3 (00: OCW2)
OCW3_RIS = 0x01
OCW3_RR = 0x02
OCW3_POLL = 0x04
OCW3_SMM = 0x20
OCW3_ESMM = 0x40


class InvalidIrqError(ValueError):
    """An IRQ number the PIC pair has no input for (0-15, but not the cascade input 2)."""


class I8259:
    """One 8259A. Lines are 0-7; ``on_output`` hears each change of the INT output."""

    def __init__(
        self,
        *,
        master: bool,
        elcr_mask: int,
        on_output: Callable[[bool], None] | None = None,
    ) -> None:
        self.is_master = master
        self.elcr_mask = elcr_mask
        self.on_output = on_output
        self._output = False
        self.elcr = 0
        self.irr = 0
        self.lines = 0  # the input levels
        self.ltim = False
        self.icw3 = 0x04 if master else CASCADE_IRQ
        self._init_reset()

    def reset(self) -> None:
        """Power-on reset: the chip as after ICW1, and ELCR cleared (QEMU ``pic_reset``)."""
        self.elcr = 0
        self.ltim = False
        self._init_reset()

    def _init_reset(self) -> None:
        """What ICW1 does to the chip (datasheet "Initialization Command Words", a-f)."""
        self.irr = self.lines & self._level_mask()  # edge latches cleared, levels as they are
        self.imr = 0
        self.isr = 0
        self.priority_add = 0  # IR0 highest
        self.irq_base = 0
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.init_state = 0  # 0: ready; 1..3: expecting ICW2..ICW4
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.mode_8086 = False
        self.init4 = False
        self.single_mode = False
        self._update()

    # -- inputs and priority -----------------------------------------------------------------

    def _level_mask(self) -> int:
        return 0xFF if self.ltim else self.elcr

    def set_line(self, line: int, level: bool) -> None:
        """Drive input IR``line``: edge-triggered lines latch IRR on 0->1, level ones follow."""
        bit = 1 << line
        was_high = bool(self.lines & bit)
        if level:
            self.lines |= bit
        else:
            self.lines &= ~bit
        if self._level_mask() & bit:
            self.irr = self.irr | bit if level else self.irr & ~bit
        elif level and not was_high:
            self.irr |= bit
        self._update()

    def _priority(self, mask: int) -> int:
        """0 (highest) .. 7 of the highest-priority bit of ``mask`` under rotation; 8 if none."""
        if mask == 0:
            return 8
        priority = 0
        while not mask & (1 << ((priority + self.priority_add) & 7)):
            priority += 1
        return priority

    def pending_line(self) -> int | None:
        """The line the chip would interrupt with now, or None (QEMU ``pic_get_irq``)."""
        priority = self._priority(self.irr & ~self.imr)
        if priority == 8:
            return None
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested and self.is_master:
            in_service &= ~(1 << CASCADE_IRQ)
        if priority < self._priority(in_service):
            return (priority + self.priority_add) & 7
        return None

    @property
    def output(self) -> bool:
        """The INT output pin."""
        return self._output

    def _update(self) -> None:
        level = self.pending_line() is not None
        if level != self._output:
            self._output = level
            if self.on_output is not None:
                self.on_output(level)

    def intack(self, line: int) -> None:
        """The INTA pulses for ``line``: IRR -> ISR (QEMU ``pic_intack``)."""
        bit = 1 << line
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (line + 1) & 7
        else:
            self.isr |= bit
        if not self._level_mask() & bit:
            self.irr &= ~bit  # a level-triggered request stays as long as its input
        self._update()

    # -- ports -------------------------------------------------------------------------------

    def write_command(self, value: int) -> None:
        """A write to A0 = 0: ICW1, OCW2 or OCW3."""
        if value & ICW1_INIT:
            self.ltim = bool(value & ICW1_LTIM)
            self._init_reset()
            self.init_state = 1
            self.init4 = bool(value & ICW1_IC4)
            self.single_mode = bool(value & ICW1_SNGL)
            return
        if value & OCW3_SELECT:
            if value & OCW3_POLL:
                self.poll = True
            if value & OCW3_RR:
                self.read_isr = bool(value & OCW3_RIS)
            if value & OCW3_ESMM:
                self.special_mask = bool(value & OCW3_SMM)
            self._update()
            return
        self._write_ocw2(value)

    def _write_ocw2(self, value: int) -> None:
        command = value >> 5  # R, SL, EOI
        level = value & 7
        if command in (0b000, 0b100):  # clear / set rotate in automatic EOI mode
            self.rotate_on_auto_eoi = bool(command & 0b100)
        elif command in (0b001, 0b101):  # non-specific EOI, rotate on non-specific EOI
            priority = self._priority(self.isr)
            if priority != 8:
                line = (priority + self.priority_add) & 7
                self.isr &= ~(1 << line)
                if command == 0b101:
                    self.priority_add = (line + 1) & 7
        elif command == 0b011:  # specific EOI
            self.isr &= ~(1 << level)
        elif command == 0b110:  # set priority: ``level`` becomes the lowest
            self.priority_add = (level + 1) & 7
        elif command == 0b111:  # rotate on specific EOI
            self.isr &= ~(1 << level)
            self.priority_add = (level + 1) & 7
        # 0b010: no operation
        self._update()

    def write_data(self, value: int) -> None:
        """A write to A0 = 1: ICW2..ICW4 during initialization, else OCW1 (the IMR)."""
        if self.init_state == 0:
            self.imr = value
            self._update()
        elif self.init_state == 1:
            self.irq_base = value & 0xF8
            if not self.single_mode:
                self.init_state = 2
            else:
                self.init_state = 3 if self.init4 else 0
        elif self.init_state == 2:
            self.icw3 = value
            self.init_state = 3 if self.init4 else 0
        else:
            self.mode_8086 = bool(value & ICW4_8086)
            self.auto_eoi = bool(value & ICW4_AEOI)
            self.special_fully_nested = bool(value & ICW4_SFNM)
            self.init_state = 0

    def read(self, a0: int) -> int:
        """A read: the poll word if a poll command is pending, else IRR/ISR (A0 = 0) or IMR."""
        if self.poll:
            self.poll = False
            line = self.pending_line()
            if line is None:
                return 0
            self.intack(line)
            return 0x80 | line
        if a0 == 0:
            return self.isr if self.read_isr else self.irr
        return self.imr

    def write_elcr(self, value: int) -> None:
        self.elcr = value & self.elcr_mask
        self._update()

    def describe(self) -> str:
        """One line in the style of QEMU's ``info pic``."""
        return (
            f"{'master' if self.is_master else 'slave'}: irr={self.irr:02x} imr={self.imr:02x} "
            f"isr={self.isr:02x} hprio={self.priority_add} irq_base={self.irq_base:02x} "
            f"rr_sel={int(self.read_isr)} elcr={self.elcr:02x} ltim={int(self.ltim)} "
            f"aeoi={int(self.auto_eoi)} fnm={int(self.special_fully_nested)}"
        )


class Pic:
    """The master/slave pair the hypervisor talks to: inputs IRQ 0-15, INTR, INTA.

    ``on_intr`` (optional) hears each change of INTR, for kicking a halted vCPU; the hypervisor
    may instead poll :meth:`output` before each VM entry.
    """

    def __init__(self, on_intr: Callable[[bool], None] | None = None) -> None:
        self.on_intr = on_intr
        self.master = I8259(master=True, elcr_mask=ELCR_MASTER_MASK, on_output=self._master_output)
        self.slave = I8259(master=False, elcr_mask=ELCR_SLAVE_MASK, on_output=self._slave_output)

    def reset(self) -> None:
        self.slave.reset()
        self.master.reset()

    @property
    def io_ranges(self) -> tuple[tuple[int, int, str], ...]:
        return (
            (PIC_MASTER_COMMAND, 2, "pic-master"),
            (PIC_SLAVE_COMMAND, 2, "pic-slave"),
            (ELCR_MASTER, 2, "elcr"),
        )

    def _master_output(self, level: bool) -> None:
        if self.on_intr is not None:
            self.on_intr(level)

    def _slave_output(self, level: bool) -> None:
        self.master.set_line(CASCADE_IRQ, level)

    # -- hypervisor interface ----------------------------------------------------------------

    def set_irq(self, irq: int, level: bool) -> None:
        """Drive ISA IRQ ``irq`` (0-15; 8-15 go to the slave; 2 is the cascade, not an input)."""
        if not 0 <= irq < NR_PIC_IRQS or irq == CASCADE_IRQ:
            raise InvalidIrqError(f"no PIC input for IRQ {irq} (0-15, 2 is the cascade)")
        if irq < 8:
            self.master.set_line(irq, level)
        else:
            self.slave.set_line(irq - 8, level)

    def output(self) -> bool:
        """INTR: the master has an unmasked request above everything in service."""
        return self.master.output

    @property
    def _cascaded(self) -> bool:
        return not self.master.single_mode

    def acknowledge(self) -> int:
        """The INTA cycle: the vector to deliver (QEMU ``pic_read_irq``)."""
        line = self.master.pending_line()
        if line is None:
            return self.master.irq_base + SPURIOUS_LINE  # spurious IRQ 7, no ISR bit set
        if line == CASCADE_IRQ and self._cascaded:
            slave_line = self.slave.pending_line()
            if slave_line is not None:
                self.slave.intack(slave_line)
                vector = self.slave.irq_base + slave_line
            else:
                vector = self.slave.irq_base + SPURIOUS_LINE  # spurious IRQ 15
        else:
            vector = self.master.irq_base + line
        self.master.intack(line)
        return vector

    def pending_irq(self) -> int | None:
        """The IRQ number (0-15) INTA would deliver now, or None; does not acknowledge."""
        line = self.master.pending_line()
        if line is None:
            return None
        if line == CASCADE_IRQ and self._cascaded:
            slave_line = self.slave.pending_line()
            return None if slave_line is None else 8 + slave_line
        return line

    # -- port I/O ----------------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        return read_bytewise(self._read_byte, port, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        write_bytewise(self._write_byte, port, size, value)

    def _read_byte(self, port: int) -> int:
        if port in (PIC_MASTER_COMMAND, PIC_MASTER_DATA):
            return self.master.read(port & 1)
        if port in (PIC_SLAVE_COMMAND, PIC_SLAVE_DATA):
            return self.slave.read(port & 1)
        if port == ELCR_MASTER:
            return self.master.elcr
        if port == ELCR_SLAVE:
            return self.slave.elcr
        return 0xFF

    def _write_byte(self, port: int, value: int) -> None:
        chip: I8259
        if port in (PIC_MASTER_COMMAND, PIC_MASTER_DATA):
            chip = self.master
        elif port in (PIC_SLAVE_COMMAND, PIC_SLAVE_DATA):
            chip = self.slave
        elif port == ELCR_MASTER:
            self.master.write_elcr(value)
            return
        elif port == ELCR_SLAVE:
            self.slave.write_elcr(value)
            return
        else:
            return
        if port & 1:
            chip.write_data(value)
        else:
            chip.write_command(value)

    def describe(self) -> list[str]:
        return [self.master.describe(), self.slave.describe()]
