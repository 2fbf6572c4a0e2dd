"""The 8254 programmable interval timer at ports 0x40-0x43, and port 0x61 (Intel 8254
datasheet "82C54 CHMOS Programmable Interval Timer"; QEMU hw/timer/i8254.c, i8254_common.c,
hw/audio/pcspk.c).

Time is virtual. The caller's clock (for the hypervisor, the guest TSC) runs at
``ticks_per_second_of_clock``; the PIT input clock runs at 1 193 182 Hz, and its n-th pulse falls
at clock time ``ceil(n * clock_hz / 1193182)``, so that ``n = t * 1193182 // clock_hz`` pulses have
fallen by time ``t`` -- exact integer arithmetic, no drift. Nothing runs between accesses: each
counter's state is a closed form of the pulse number, evaluated when a port is read or written,
or when :meth:`Pit.advance` / :meth:`Pit.next_event` ask about channel 0.

Counting, per the datasheet's "Mode definitions" and its "Minimum and maximum initial counts":

* A count written to a counter is loaded into the counting element (CE) on the next CLK pulse
  and decremented on each pulse after that (so in mode 0 OUT goes high N + 1 pulses after the
  write). A count of 0 means 65536 (10000 in BCD). BCD counting is implemented: counts are
  written and read as four BCD digits and the counter wraps at 10000.
* Mode 0, interrupt on terminal count: OUT low from the control word; high when the CE
  reaches 0. GATE low suspends counting. Writing the first byte of a two-byte count stops
  counting and drives OUT low.
* Mode 1, hardware retriggerable one-shot: a rising GATE edge loads the CE and drives OUT low
  until the CE reaches 0. On a PC only channel 2's gate can move (port 0x61 bit 0).
* Mode 2, rate generator: OUT goes low for one pulse when the CE reaches 1 and the CE reloads,
  period N; the OUT rising edges (which interrupt) fall N, 2N, ... pulses after the load.
* Mode 3, square wave: OUT high for ceil(N/2) pulses and low for floor(N/2), period N; the CE
  counts down by two (odd counts show N-1, N-3, ..., as the datasheet describes).
* Modes 2 and 3: a count written while counting takes effect when the current period ends
  (the datasheet reloads mode 3 at the end of the current *half*-cycle; here it is the end of
  the full period, which keeps every period whole). GATE low stops counting and forces OUT
  high; a rising GATE edge reloads. A count of 1 is illegal in these modes; here it gives a
  rising edge on every pulse.
* Mode 4, software triggered strobe, and mode 5, hardware triggered strobe: OUT low for one
  pulse when the CE reaches 0 (N pulses after the load or trigger), so the rising edge is at
  N + 1. Mode 4 is gated like mode 0; mode 5 is triggered like mode 1.
* Control words: counter latch (access 00; ignored while a latch is unread), read-back (status
  byte OUT, null count, access, mode, BCD; status read before count when both are latched),
  and lobyte / hibyte / lobyte-then-hibyte access. A control word stops the counter until a new
  count arrives (OUT to its initial level: low in mode 0, high otherwise). Modes 6 and 7 are
  modes 2 and 3 (the status byte shows the bits as written). Before any control word each
  counter is as after ``control word 0x36``: mode 3, lobyte/hibyte, binary, no count, not
  counting -- unlike QEMU, which starts channel 0 counting 65536 at reset as a BIOS would.
* Reads of 0x43 return 0xFF (the datasheet: no operation, 3-state).

Channel 0's OUT drives IRQ 0 as edges: each rising edge of OUT is an :meth:`IrqLine.pulse`,
as QEMU delivers it to the edge-triggered PIC input on a PC. :meth:`Pit.advance` delivers the
edges that fell since the last call; when several periods have passed (a busy or descheduled
vCPU), they collapse into ONE pulse, as a real PIC's IRR latch would collapse them while the
CPU had interrupts off -- no catch-up, no tick injection policy. :meth:`Pit.next_event` gives
the clock time of the first edge not yet delivered, for the VMX-preemption timer.

Port 0x61 (PC system control port B, as QEMU's pcspk): bit 0 channel 2 GATE, bit 1 speaker
data enable, bits 3:2 read back as written; reads add bit 4, the DRAM refresh toggle (one
flip every 18 PIT pulses, ~15.09 us, from virtual time -- QEMU flips it on every read), and
bit 5, channel 2's OUT. Channels 0 and 1 have GATE tied high.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from pyvmx.kvm.devices.bus import IrqLine, read_bytewise, write_bytewise

PIT_HZ = 1193182
PIT_BASE = 0x40
PIT_COMMAND = 0x43
PORT_B = 0x61
PIT_IRQ = 0
REFRESH_TOGGLE_PULSES = 18

# Access field of the control word (bits 5:4) and the byte pointers built on it.
RW_LATCH = 0
RW_LSB = 1
RW_MSB = 2
RW_WORD = 3
_WORD_HIGH = 4  # the second byte of a lobyte-then-hibyte access

READ_BACK = 0xC0
READ_BACK_NO_COUNT = 0x20
READ_BACK_NO_STATUS = 0x10
STATUS_OUT = 0x80
STATUS_NULL_COUNT = 0x40

PORT_B_GATE2 = 0x01
PORT_B_SPEAKER_DATA = 0x02
PORT_B_WRITABLE = 0x0F
PORT_B_REFRESH = 0x10
PORT_B_OUT2 = 0x20


class ClockError(ValueError):
    """The clock passed in went backwards."""


class _Phase(Enum):
    IDLE = auto()  # control word written, no count yet (or mode 0 between the two bytes)
    WAITING = auto()  # modes 1, 5: count written, waiting for a GATE trigger
    RUNNING = auto()  # counting from ``start``
    PAUSED = auto()  # modes 0, 4: GATE low, counting suspended at ``paused_m``
    HELD = auto()  # modes 2, 3: GATE low, OUT high, waiting for a rising GATE


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    """What ``info pit`` shows for one counter."""

    channel: int
    mode: int
    bcd: bool
    access: int
    initial_count: int | None
    gate: bool
    out: bool
    counting: bool


def _rise_after(start: int, period: int, after: int) -> int:
    """The first of ``start + period * j`` (j >= 1) after pulse ``after``."""
    j = max(1, (after - start) // period + 1)
    return start + period * j


class _Counter:
    """One of the three counters, as a function of the PIT pulse number ``k``."""

    def __init__(self, index: int, gate: bool) -> None:
        self.index = index
        self.gate = gate
        self.mode = 3
        self.bcd = False
        self.access = RW_WORD
        self.write_state = RW_WORD
        self.read_state = RW_WORD
        self.write_latch = 0
        self.count_latch_state = 0  # 0: no latched count; else the byte pointer into it
        self.latched_count = 0
        self.status_latched = False
        self.status = 0
        self.cr: int | None = None  # the count register (decoded: 1 .. modulus)
        self.phase = _Phase.IDLE
        self.start = 0  # pulse at which the CE was loaded (RUNNING)
        self.n = 0  # the count the CE runs with
        self.pending: tuple[int, int] | None = None  # modes 2/3: (new count, pulse it loads at)
        self.paused_m = 0
        self.load_edge = 0
        self.snapshot = 0  # what the CE reads while not counting
        self.null_count = True
        self.null_clear_edge: int | None = None

    @property
    def op_mode(self) -> int:
        return self.mode - 4 if self.mode >= 6 else self.mode

    @property
    def modulus(self) -> int:
        return 10000 if self.bcd else 0x10000

    # -- closed forms ------------------------------------------------------------------------

    def fold(self, k: int) -> None:
        """Apply a pending mode 2/3 reload whose pulse has come."""
        if self.phase is _Phase.RUNNING and self.pending is not None and k >= self.pending[1]:
            self.n, self.start = self.pending
            self.pending = None

    def _value_at(self, m: int) -> int:
        n, op = self.n, self.op_mode
        if op == 2:
            value = n - m % n
        elif op == 3:
            p = m % n
            half = (n + 1) // 2
            q = p if p < half else p - half
            value = n - 2 * q if n % 2 == 0 else n - 1 - 2 * q
        else:
            value = n - m
        return value % self.modulus

    def _out_at(self, m: int) -> bool:
        n, op = self.n, self.op_mode
        if op == 0:
            return m >= n
        if m < 0:
            return True
        if op == 1:
            return m >= n
        if op == 2:
            return n == 1 or m % n != n - 1
        if op == 3:
            return m % n < (n + 1) // 2
        return m != n  # modes 4, 5

    def value(self, k: int) -> int:
        """The counting element at pulse ``k`` (decoded, 0 .. modulus-1)."""
        self.fold(k)
        if self.phase is _Phase.RUNNING and k >= self.start:
            return self._value_at(k - self.start)
        if self.phase is _Phase.PAUSED:
            return self._value_at(self.paused_m)
        return self.snapshot

    def out(self, k: int) -> bool:
        self.fold(k)
        if self.phase is _Phase.RUNNING:
            return self._out_at(k - self.start)
        if self.phase is _Phase.PAUSED:
            return self._out_at(self.paused_m)
        if self.phase is _Phase.IDLE:
            return self.op_mode != 0
        return True  # WAITING, HELD

    def next_rise(self, after: int) -> int | None:
        """The first pulse after ``after`` at which OUT rises, or None if it never will."""
        if self.phase is not _Phase.RUNNING:
            return None
        op = self.op_mode
        if op in (2, 3):
            rise = _rise_after(self.start, self.n, after)
            if self.pending is not None and rise > self.pending[1]:
                new_n, reload = self.pending
                rise = _rise_after(reload, new_n, after)
            return rise
        rise = self.start + self.n + (1 if op in (4, 5) else 0)
        return rise if rise > after else None

    def null(self, k: int) -> bool:
        return self.null_count and (self.null_clear_edge is None or k < self.null_clear_edge)

    # -- programming -------------------------------------------------------------------------

    def encode(self, value: int) -> int:
        if not self.bcd:
            return value & 0xFFFF
        value %= 10000
        return sum(((value // 10**i) % 10) << (4 * i) for i in range(4))

    def decode(self, raw: int) -> int:
        if self.bcd:
            value = sum(((raw >> (4 * i)) & 0xF) * 10**i for i in range(4)) % 10000
        else:
            value = raw & 0xFFFF
        return value or self.modulus

    def write_control(self, value: int, k: int) -> None:
        """A control word for this counter (access != 00): reset its control logic."""
        self.snapshot = self.value(k)
        self.mode = (value >> 1) & 7
        self.bcd = bool(value & 1)
        self.access = (value >> 4) & 3
        self.write_state = self.read_state = self.access
        self.phase = _Phase.IDLE
        self.cr = None
        self.pending = None
        self.null_count = True
        self.null_clear_edge = None

    def latch_count(self, k: int) -> None:
        if not self.count_latch_state:  # a second latch before the read is ignored
            self.latched_count = self.encode(self.value(k))
            self.count_latch_state = self.access

    def latch_status(self, k: int) -> None:
        if not self.status_latched:
            self.status = (
                (STATUS_OUT if self.out(k) else 0)
                | (STATUS_NULL_COUNT if self.null(k) else 0)
                | (self.access << 4)
                | (self.mode << 1)
                | int(self.bcd)
            )
            self.status_latched = True

    def write_byte(self, value: int, k: int) -> None:
        state = self.write_state
        if state == RW_LSB:
            self._load(value, k)
        elif state == RW_MSB:
            self._load(value << 8, k)
        elif state == RW_WORD:
            self.write_latch = value
            self.write_state = _WORD_HIGH
            if self.op_mode == 0:  # the first byte stops counting and drives OUT low
                self.snapshot = self.value(k)
                self.phase = _Phase.IDLE
                self.pending = None
        else:
            self.write_state = RW_WORD
            self._load(self.write_latch | (value << 8), k)

    def _load(self, raw: int, k: int) -> None:
        """A complete count written to the count register at pulse ``k``."""
        self.fold(k)
        n = self.decode(raw)
        self.cr = n
        self.null_count = True
        op = self.op_mode
        running = self.phase is _Phase.RUNNING
        if op in (1, 5):
            if self.phase is _Phase.IDLE:
                self.phase = _Phase.WAITING
            self.null_clear_edge = None  # the CR reaches the CE on the next trigger
        elif op in (2, 3) and running and k >= self.start:
            reload = self.pending[1] if self.pending else _rise_after(self.start, self.n, k)
            self.pending = (n, reload)
            self.null_clear_edge = reload
        elif op in (2, 3) and not self.gate:
            self.snapshot = self.value(k)
            self.phase = _Phase.HELD
            self.null_clear_edge = None
        elif op in (0, 4) and not self.gate:
            self.phase = _Phase.PAUSED
            self.n = n
            self.paused_m = 0
            self.load_edge = k + 1
            self.null_clear_edge = k + 1
        else:  # loads on the next pulse and counts from there
            self.phase = _Phase.RUNNING
            self.n = n
            self.start = k + 1
            self.pending = None
            self.null_clear_edge = k + 1

    def set_gate(self, level: bool, k: int) -> None:
        if level == self.gate:
            return
        self.fold(k)
        self.gate = level
        op = self.op_mode
        if level:
            if op in (0, 4) and self.phase is _Phase.PAUSED:
                self.phase = _Phase.RUNNING
                self.start = max(self.load_edge, k - self.paused_m)
            elif op in (1, 2, 3, 5) and self.cr is not None and self.phase is not _Phase.IDLE:
                self.phase = _Phase.RUNNING  # trigger (1, 5) or reload (2, 3)
                self.n = self.cr
                self.start = k + 1
                self.pending = None
                self.null_clear_edge = k + 1
        elif self.phase is _Phase.RUNNING:
            if op in (0, 4):
                self.phase = _Phase.PAUSED
                self.paused_m = max(0, k - self.start)
                self.load_edge = self.start
            elif op in (2, 3):
                self.snapshot = self.value(k)
                self.phase = _Phase.HELD
                self.pending = None

    def read_byte(self, k: int) -> int:
        if self.status_latched:
            self.status_latched = False
            return self.status
        if self.count_latch_state:
            if self.count_latch_state == RW_MSB:
                self.count_latch_state = 0
                return self.latched_count >> 8
            self.count_latch_state = RW_MSB if self.count_latch_state == RW_WORD else 0
            return self.latched_count & 0xFF
        count = self.encode(self.value(k))
        state = self.read_state
        if state == RW_WORD:
            self.read_state = _WORD_HIGH
            return count & 0xFF
        if state == _WORD_HIGH:
            self.read_state = RW_WORD
            return count >> 8
        return count >> 8 if state == RW_MSB else count & 0xFF

    def info(self, k: int) -> ChannelInfo:
        return ChannelInfo(
            channel=self.index,
            mode=self.mode,
            bcd=self.bcd,
            access=self.access,
            initial_count=self.cr,
            gate=self.gate,
            out=self.out(k),
            counting=self.phase is _Phase.RUNNING,
        )


class Pit:
    """The 8254 and port 0x61, in virtual time; see the module docstring."""

    def __init__(
        self,
        ticks_per_second_of_clock: int,
        clock: Callable[[], int],
        irq: IrqLine | None = None,
    ) -> None:
        if ticks_per_second_of_clock <= 0:
            raise ValueError("the clock rate must be positive")
        self.clock_hz = ticks_per_second_of_clock
        self._clock = clock
        self.irq = irq if irq is not None else IrqLine.unconnected(PIT_IRQ)
        self.reset()

    def reset(self) -> None:
        """Every counter as after control word 0x36 (not counting); GATE 2 and port 0x61 low."""
        now = self._clock()
        self._last_time = now
        self._last_edge = self.pulses_at(now)
        self._counters = [_Counter(0, True), _Counter(1, True), _Counter(2, False)]
        for i, counter in enumerate(self._counters):
            counter.write_control((i << 6) | 0x36, self._last_edge)
        self._port_b = 0

    @property
    def io_ranges(self) -> tuple[tuple[int, int, str], ...]:
        return ((PIT_BASE, 4, "pit"), (PORT_B, 1, "port61"))

    # -- time --------------------------------------------------------------------------------

    def pulses_at(self, now: int) -> int:
        """How many PIT input pulses have fallen by clock time ``now``."""
        return now * PIT_HZ // self.clock_hz

    def time_of_pulse(self, pulse: int) -> int:
        """The clock time at which PIT pulse number ``pulse`` falls."""
        return -(-pulse * self.clock_hz // PIT_HZ)

    def _check(self, now: int) -> None:
        if now < self._last_time:
            raise ClockError(f"clock went backwards: {now} after {self._last_time}")

    def advance(self, now: int) -> None:
        """Deliver channel 0's OUT rising edges up to ``now``: one IRQ 0 pulse if any fell."""
        self._check(now)
        k = self.pulses_at(now)
        rise = self._counters[0].next_rise(self._last_edge)
        self._last_time = now
        self._last_edge = k
        if rise is not None and rise <= k:
            self.irq.pulse()

    def next_event(self, now: int) -> int | None:
        """The clock time of the first IRQ 0 edge :meth:`advance` has not delivered yet, or None
        when channel 0 will not raise one. It is at or before ``now`` when an edge is overdue."""
        self._check(now)
        rise = self._counters[0].next_rise(self._last_edge)
        return None if rise is None else self.time_of_pulse(rise)

    def _sync(self) -> int:
        """Bring IRQ 0 up to the present before an access changes anything; the pulse number."""
        now = self._clock()
        self.advance(now)
        return self._last_edge

    # -- port I/O ----------------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        return read_bytewise(self._read_byte, port, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        write_bytewise(self._write_byte, port, size, value)

    def _read_byte(self, port: int) -> int:
        if PIT_BASE <= port < PIT_COMMAND:
            return self._counters[port - PIT_BASE].read_byte(self._sync())
        if port == PORT_B:
            k = self._sync()
            refresh = PORT_B_REFRESH if (k // REFRESH_TOGGLE_PULSES) & 1 else 0
            out2 = PORT_B_OUT2 if self._counters[2].out(k) else 0
            return self._port_b | refresh | out2
        return 0xFF  # 0x43 is write-only

    def _write_byte(self, port: int, value: int) -> None:
        if PIT_BASE <= port < PIT_COMMAND:
            self._counters[port - PIT_BASE].write_byte(value, self._sync())
        elif port == PIT_COMMAND:
            self._write_control(value, self._sync())
        elif port == PORT_B:
            k = self._sync()
            self._port_b = value & PORT_B_WRITABLE
            self._counters[2].set_gate(bool(value & PORT_B_GATE2), k)

    def _write_control(self, value: int, k: int) -> None:
        select = value >> 6
        if value & READ_BACK == READ_BACK:
            for channel, counter in enumerate(self._counters):
                if value & (2 << channel):
                    if not value & READ_BACK_NO_COUNT:
                        counter.latch_count(k)
                    if not value & READ_BACK_NO_STATUS:
                        counter.latch_status(k)
            return
        counter = self._counters[select]
        if (value >> 4) & 3 == RW_LATCH:
            counter.latch_count(k)
        else:
            counter.write_control(value, k)

    # -- board wiring and inspection ---------------------------------------------------------

    def set_gate(self, channel: int, level: bool) -> None:
        """Drive a counter's GATE input (channel 2's is port 0x61 bit 0 on a PC)."""
        k = self._sync()
        self._counters[channel].set_gate(level, k)
        if channel == 2:
            self._port_b = (self._port_b & ~PORT_B_GATE2) | (PORT_B_GATE2 if level else 0)

    def channel_info(self, channel: int) -> ChannelInfo:
        return self._counters[channel].info(self.pulses_at(self._clock()))

    @property
    def speaker_on(self) -> bool:
        """Port 0x61 bits 0 and 1 both set: channel 2's OUT reaches the speaker."""
        both = PORT_B_GATE2 | PORT_B_SPEAKER_DATA
        return self._port_b & both == both
