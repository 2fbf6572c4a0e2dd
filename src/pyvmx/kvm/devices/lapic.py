"""A local APIC in xAPIC mode (Intel SDM Vol. 3A chapter 11 "Advanced Programmable Interrupt
Controller (APIC)"; Linux arch/x86/kvm/lapic.c), one per vCPU, its registers at the 4-KiB page
of IA32_APIC_BASE (0xFEE00000 by default, SDM 11.4.1 Table 11-1).

Registers (SDM Table 11-1), each 32 bits at a 16-byte-aligned offset:

* ID (0x20, bits 31:24 = the vCPU's APIC ID), version (0x30: version 0x14, max LVT entry 5 --
  KVM's value without CMCI);
* TPR (0x80), APR (0x90, reads 0 as in KVM), PPR (0xA0, SDM 11.8.3.1: TPR if TPR[7:4] >=
  ISRV[7:4], else ISRV & 0xF0), EOI (0xB0, write-only: clears the highest ISR bit, SDM 11.8.5),
  LDR (0xD0), DFR (0xE0, reset all ones), SVR (0xF0, reset 0xFF; bit 8 software enable);
* ISR, TMR, IRR (0x100, 0x180, 0x200: 256 bits in eight registers each), ESR (0x280: a write
  latches the errors seen since the last write, SDM 11.5.3);
* ICR (0x300 low, 0x310 high): a write of the low half sends the IPI (SDM 11.6.1); this model
  delivers fixed interrupts and NMIs (``deliver_nmi``) to itself (destination shorthand "self",
  or a physical destination equal to its own ID, or "all including self") and reports other
  IPIs to ``send_ipi``;
* LVT: timer (0x320), thermal (0x330), performance counters (0x340), LINT0 (0x350), LINT1
  (0x360), error (0x370) -- reset masked (0x10000, SDM 11.12.5.1);
* the timer (SDM 11.5.4): initial count (0x380), current count (0x390, read-only), divide
  configuration (0x3E0); one-shot and periodic modes count down at the bus rate divided as
  TDCR says; TSC-deadline mode (LVT timer bits 18:17 = 10b, SDM 11.5.4.1) fires when the guest
  TSC reaches IA32_TSC_DEADLINE. Time is the VM's clock (guest TSC ticks); the bus clock is
  ``tsc_hz / bus_divisor``.

Interrupt acceptance (SDM 11.8.3-11.8.4): an accepted vector sets IRR; the highest IRR vector is
offered to the CPU when its priority class is above PPR's (``has_interrupt``); acknowledging it
moves it from IRR to ISR (``acknowledge``, KVM's kvm_get_apic_interrupt). A software-disabled
APIC (SVR bit 8 clear) masks every LVT entry and accepts no interrupts but still takes EOIs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

APIC_DEFAULT_BASE = 0xFEE00000
APIC_PAGE = 0x1000
APIC_VERSION = 0x14 | (5 << 16)

APIC_ID, APIC_LVR, APIC_TASKPRI, APIC_ARBPRI, APIC_PROCPRI, APIC_EOI = 0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0
APIC_RRR, APIC_LDR, APIC_DFR, APIC_SPIV = 0xC0, 0xD0, 0xE0, 0xF0
APIC_ISR, APIC_TMR, APIC_IRR, APIC_ESR = 0x100, 0x180, 0x200, 0x280
APIC_LVTCMCI, APIC_ICR, APIC_ICR2 = 0x2F0, 0x300, 0x310
APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR = 0x320, 0x330, 0x340, 0x350, 0x360, 0x370
APIC_TMICT, APIC_TMCCT, APIC_TDCR = 0x380, 0x390, 0x3E0
LVT_REGISTERS = (APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR)

APIC_SPIV_APIC_ENABLED = 1 << 8
APIC_LVT_MASKED = 1 << 16
APIC_LVT_TIMER_MODE = 3 << 17
TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSCDEADLINE = 0, 1 << 17, 2 << 17
APIC_ICR_BUSY = 1 << 12
APIC_DM_FIXED, APIC_DM_LOWEST, APIC_DM_SMI, APIC_DM_NMI, APIC_DM_INIT, APIC_DM_STARTUP = 0, 1, 2, 4, 5, 6
APIC_DEST_SELF, APIC_DEST_ALLINC, APIC_DEST_ALLBUT = 1, 2, 3
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# Writable bits of the LVT entries (lapic.c apic_lvt_mask[]): vector, delivery mode, mask,
# trigger mode / remote IRR / polarity where the entry has them, the timer mode.
LVT_WRITABLE = {
    APIC_LVTT: 0xFF | (1 << 16) | (3 << 17) | (1 << 12),
    APIC_LVTTHMR: 0x7FF | (1 << 16) | (1 << 12),
    APIC_LVTPC: 0x7FF | (1 << 16) | (1 << 12),
    APIC_LVT0: 0x7FF | (1 << 16) | (1 << 12) | (1 << 13) | (1 << 15),
    APIC_LVT1: 0x7FF | (1 << 16) | (1 << 12) | (1 << 13) | (1 << 15),
    APIC_LVTERR: 0xFF | (1 << 16) | (1 << 12),
}
LVT_WRITABLE = {k: v & ~(1 << 12) for k, v in LVT_WRITABLE.items()}  # delivery status is read-only


@dataclass(frozen=True)
class Ipi:
    """An IPI for other APICs: ICR low and the destination field (ICR high bits 31:24)."""

    icr: int
    destination: int

    @property
    def vector(self) -> int:
        return self.icr & 0xFF

    @property
    def delivery_mode(self) -> int:
        return (self.icr >> 8) & 7

    @property
    def shorthand(self) -> int:
        return (self.icr >> 18) & 3


class Lapic:
    """One vCPU's local APIC (see the module docstring)."""

    def __init__(self, apic_id: int, clock: Callable[[], int], *, bus_divisor: int = 1,
                 send_ipi: Callable[[Ipi], None] | None = None, deliver_nmi: Callable[[], None] | None = None) -> None:
        self.apic_id = apic_id
        self.deliver_nmi = deliver_nmi
        self.clock = clock
        self.bus_divisor = bus_divisor
        self.send_ipi = send_ipi
        self.base = APIC_DEFAULT_BASE
        self.regs: dict[int, int] = {}
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.esr_pending = 0
        self.tsc_deadline = 0
        self.timer_start = 0  # VM time the count was loaded
        self.timer_fired = False  # one-shot: expired already
        self.wait_sipi = False  # the wait-for-SIPI state after INIT (SDM 9.4.4, 11.6.1)
        self.sipi_vector: int | None = None  # a SIPI received in that state
        self.reset()

    def reset(self) -> None:
        """Power-up / INIT state (SDM 11.4.7.1)."""
        self.regs = {APIC_ID: self.apic_id << 24, APIC_DFR: 0xFFFFFFFF, APIC_SPIV: 0xFF}
        for lvt in LVT_REGISTERS:
            self.regs[lvt] = APIC_LVT_MASKED
        self.irr = self.isr = self.tmr = 0
        self.esr_pending = 0
        self.tsc_deadline = 0
        self.timer_fired = True

    def init(self) -> None:
        """An INIT (SDM 11.6.1, 9.1): the APIC is reset -- its ID kept -- and the processor waits
        for a SIPI."""
        apic_id = self.regs[APIC_ID]
        self.reset()
        self.regs[APIC_ID] = apic_id
        self.wait_sipi = True
        self.sipi_vector = None

    def sipi(self, vector: int) -> None:
        """A Start-up IPI: taken only in the wait-for-SIPI state, otherwise ignored (SDM 11.6.1)."""
        if self.wait_sipi and self.sipi_vector is None:
            self.sipi_vector = vector

    def take_sipi(self) -> int | None:
        """Leave wait-for-SIPI with the vector received, or None when none arrived."""
        vector = self.sipi_vector
        if vector is not None:
            self.wait_sipi = False
            self.sipi_vector = None
        return vector

    # --- state --------------------------------------------------------------------------------
    @property
    def software_enabled(self) -> bool:
        return bool(self.regs[APIC_SPIV] & APIC_SPIV_APIC_ENABLED)

    def ppr(self) -> int:
        """SDM 11.8.3.1: processor priority from TPR and the highest in-service vector."""
        tpr = self.regs.get(APIC_TASKPRI, 0) & 0xFF
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        return tpr if (tpr >> 4) >= (isrv >> 4) else isrv & 0xF0

    def accept(self, vector: int, *, level: bool = False) -> None:
        """SDM 11.8.4: a fixed interrupt arrives (vectors 0-15 are illegal: ESR bit 6)."""
        if vector < 16:
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR
            return
        if not self.software_enabled:
            return
        self.irr |= 1 << vector
        self.tmr = self.tmr | (1 << vector) if level else self.tmr & ~(1 << vector)

    def has_interrupt(self) -> int | None:
        """``kvm_apic_has_interrupt()``: the highest IRR vector above PPR's class, or None."""
        self._run_timer()
        if not self.irr:
            return None
        vector = self.irr.bit_length() - 1
        return vector if (vector & 0xF0) > (self.ppr() & 0xF0) else None

    def acknowledge(self) -> int | None:
        """``kvm_get_apic_interrupt()``: the INTA cycle -- IRR -> ISR for the vector offered."""
        vector = self.has_interrupt()
        if vector is not None:
            self.irr &= ~(1 << vector)
            self.isr |= 1 << vector
        return vector

    def eoi(self) -> int | None:
        """SDM 11.8.5: clear the highest in-service bit; returns its vector (for a level-triggered
        one the I/O APIC gets an EOI broadcast)."""
        if not self.isr:
            return None
        vector = self.isr.bit_length() - 1
        self.isr &= ~(1 << vector)
        return vector

    # --- the timer ----------------------------------------------------------------------------
    def _timer_divisor(self) -> int:
        tdcr = self.regs.get(APIC_TDCR, 0)
        code = ((tdcr & 8) >> 1) | (tdcr & 3)  # bits 3, 1:0 (SDM Figure 11-10)
        return 1 if code == 7 else 2 << code

    def _ticks_per_count(self) -> int:
        return self.bus_divisor * self._timer_divisor()

    def _timer_mode(self) -> int:
        return self.regs[APIC_LVTT] & APIC_LVT_TIMER_MODE

    def timer_deadline(self) -> int | None:
        """The VM time of the timer's next expiry, or None when it is not counting."""
        if self._timer_mode() == TIMER_TSCDEADLINE:
            return self.tsc_deadline or None
        initial = self.regs.get(APIC_TMICT, 0)
        if not initial or (self.timer_fired and self._timer_mode() == TIMER_ONESHOT):
            return None
        return self.timer_start + initial * self._ticks_per_count()

    def _run_timer(self) -> None:
        """Deliver a timer expiry that fell by now (SDM 11.5.4)."""
        deadline = self.timer_deadline()
        now = self.clock()
        if deadline is None or now < deadline:
            return
        lvt = self.regs[APIC_LVTT]
        if not lvt & APIC_LVT_MASKED:
            self.accept(lvt & 0xFF)
        if self._timer_mode() == TIMER_TSCDEADLINE:
            self.tsc_deadline = 0
        elif self._timer_mode() == TIMER_PERIODIC:
            period = self.regs[APIC_TMICT] * self._ticks_per_count()
            self.timer_start = deadline + ((now - deadline) // period) * period
        else:
            self.timer_fired = True

    def current_count(self) -> int:
        deadline = self.timer_deadline()
        if deadline is None or self._timer_mode() == TIMER_TSCDEADLINE:
            return 0
        now = self.clock()
        if now >= deadline:
            self._run_timer()
            deadline = self.timer_deadline()
            if deadline is None:
                return 0
        return -(-(deadline - now) // self._ticks_per_count())

    def set_tsc_deadline(self, value: int) -> None:
        """IA32_TSC_DEADLINE (MSR 0x6E0): armed only in TSC-deadline mode (SDM 11.5.4.1)."""
        if self._timer_mode() == TIMER_TSCDEADLINE:
            self.tsc_deadline = value

    # --- register access (SDM 11.4.1: 32-bit loads and stores at 16-byte-aligned offsets) -------
    def read(self, offset: int) -> int:
        offset &= 0xFF0
        if APIC_ISR <= offset < APIC_ISR + 0x80:
            return (self.isr >> (32 * ((offset - APIC_ISR) >> 4))) & 0xFFFFFFFF
        if APIC_TMR <= offset < APIC_TMR + 0x80:
            return (self.tmr >> (32 * ((offset - APIC_TMR) >> 4))) & 0xFFFFFFFF
        if APIC_IRR <= offset < APIC_IRR + 0x80:
            self._run_timer()
            return (self.irr >> (32 * ((offset - APIC_IRR) >> 4))) & 0xFFFFFFFF
        if offset == APIC_LVR:
            return APIC_VERSION
        if offset == APIC_PROCPRI:
            return self.ppr()
        if offset in (APIC_ARBPRI, APIC_EOI):
            return 0
        if offset == APIC_TMCCT:
            return self.current_count()
        return self.regs.get(offset, 0)

    def write(self, offset: int, value: int) -> None:
        offset &= 0xFF0
        value &= 0xFFFFFFFF
        if offset == APIC_ID:
            self.regs[APIC_ID] = value & 0xFF000000
        elif offset == APIC_TASKPRI:
            self.regs[APIC_TASKPRI] = value & 0xFF
        elif offset == APIC_EOI:
            self.eoi()
        elif offset == APIC_LDR:
            self.regs[APIC_LDR] = value & 0xFF000000
        elif offset == APIC_DFR:
            self.regs[APIC_DFR] = value | 0x0FFFFFFF
        elif offset == APIC_SPIV:
            self.regs[APIC_SPIV] = value & 0x3FF
            if not value & APIC_SPIV_APIC_ENABLED:  # SDM 11.4.7.2: every LVT entry masked
                for lvt in LVT_REGISTERS:
                    self.regs[lvt] |= APIC_LVT_MASKED
        elif offset == APIC_ESR:
            self.regs[APIC_ESR] = self.esr_pending
            self.esr_pending = 0
        elif offset == APIC_ICR:
            self.regs[APIC_ICR] = value & ~APIC_ICR_BUSY
            self._send(Ipi(value, self.regs.get(APIC_ICR2, 0) >> 24))
        elif offset == APIC_ICR2:
            self.regs[APIC_ICR2] = value & 0xFF000000
        elif offset in LVT_WRITABLE:
            if not self.software_enabled:
                value |= APIC_LVT_MASKED
            if offset == APIC_LVTT and (value ^ self.regs[APIC_LVTT]) & APIC_LVT_TIMER_MODE:
                self.regs[APIC_TMICT] = 0  # lapic.c: a mode change stops the timer
                self.tsc_deadline = 0
            self.regs[offset] = value & LVT_WRITABLE[offset]
        elif offset == APIC_TMICT:
            if self._timer_mode() != TIMER_TSCDEADLINE:
                self.regs[APIC_TMICT] = value
                self.timer_start = self.clock()
                self.timer_fired = False
        elif offset == APIC_TDCR:
            self.current_count()  # settle the count under the old divisor
            self.regs[APIC_TDCR] = value & 0xB
        # read-only and reserved registers: the write is dropped

    def _send(self, ipi: Ipi) -> None:
        """SDM 11.6.1: the IPI this APIC can deliver to itself, the rest to ``send_ipi``."""
        mode = ipi.delivery_mode
        to_self = ipi.shorthand in (APIC_DEST_SELF, APIC_DEST_ALLINC) or (
            ipi.shorthand == 0 and not ipi.icr & (1 << 11) and ipi.destination in (self.apic_id, 0xFF))
        if mode == APIC_DM_FIXED and ipi.vector < 16:
            self.esr_pending |= ESR_SEND_ILLEGAL_VECTOR
            return
        if to_self and mode in (APIC_DM_FIXED, APIC_DM_LOWEST):
            self.accept(ipi.vector, level=bool(ipi.icr & (1 << 15)))
        elif to_self and mode == APIC_DM_NMI and self.deliver_nmi is not None:
            self.deliver_nmi()  # SDM 11.6.1: NMI delivery mode, the vector is ignored
        if ipi.shorthand != APIC_DEST_SELF and self.send_ipi is not None:
            self.send_ipi(ipi)

    # --- the MMIO page ------------------------------------------------------------------------
    def mmio_read(self, gpa: int, size: int) -> int:
        offset = gpa - self.base
        value = self.read(offset & ~3)
        return (value >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        offset = gpa - self.base
        if offset & 0xF == 0 and size >= 4:  # SDM 11.4.1: only aligned 32-bit stores
            self.write(offset, value & 0xFFFFFFFF)


class ApicMsiPage:
    """What the PC has at 0xFEE00000 behind a vCPU whose APIC does not decode it (globally
    disabled, or in x2APIC mode): QEMU's "apic-msi" region. Reads see all ones and writes --
    MSI messages, which no device here sends -- are dropped (the values kvm-unit-tests' apic.c
    verify_disabled_apic_mmio() expects)."""

    def mmio_read(self, address: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def mmio_write(self, address: int, size: int, value: int) -> None:
        return None
