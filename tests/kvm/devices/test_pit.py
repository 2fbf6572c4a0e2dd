"""The 8254 PIT in virtual time, against the Intel 8254 datasheet's mode definitions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmx.kvm.devices.bus import IoBus, IrqLine
from pyvmx.kvm.devices.pit import PIT_HZ, ClockError, Pit

CH0, CH1, CH2, CMD, PORT_B = 0x40, 0x41, 0x42, 0x43, 0x61
GHZ = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


class Board:
    """A PIT on a bus with a clock the test moves, and IRQ 0 edges counted."""

    def __init__(self, hz: int = GHZ) -> None:
        self.clock = Clock()
        self.irq_levels: list[bool] = []
        irq0 = IrqLine(0, lambda _irq, level: self.irq_levels.append(level))
        self.pit = Pit(hz, self.clock, irq0)
        self.bus = IoBus()
        self.bus.register_all(self.pit, self.pit.io_ranges)

    @property
    def pulses(self) -> int:
        return self.irq_levels.count(True)

    def at(self, now: int) -> Board:
        self.clock.now = now
        return self

    def inb(self, port: int) -> int:
        value = self.bus.read(port, 1)
        assert value is not None
        return value

    def outb(self, port: int, value: int) -> None:
        assert self.bus.write(port, 1, value)

    def program(
        self, channel: int, mode: int, count: int, access: int = 3, bcd: bool = False
    ) -> None:
        self.outb(CMD, (channel << 6) | (access << 4) | (mode << 1) | int(bcd))
        if access in (1, 3):
            self.outb(CH0 + channel, count & 0xFF)
        if access in (2, 3):
            self.outb(CH0 + channel, (count >> 8) & 0xFF)

    def latched_count(self, channel: int) -> int:
        self.outb(CMD, channel << 6)  # counter latch command
        low = self.inb(CH0 + channel)
        return low | (self.inb(CH0 + channel) << 8)

    def read_back(self, channel: int) -> int:
        self.outb(CMD, 0xE0 | (2 << channel))  # status only
        return self.inb(CH0 + channel)


def ns_of_pulse(pulse: int) -> int:
    """When PIT pulse ``pulse`` falls on a 1 GHz clock: ceil(pulse * 1e9 / 1193182)."""
    return -(-pulse * GHZ // PIT_HZ)


def test_mode2_divisor_1193_at_1ghz() -> None:
    """Linux's HZ=1000 LATCH: written at t=0, loaded on pulse 1, rising edges at 1 + 1193 j."""
    b = Board()
    b.program(0, 2, 1193)
    first = b.pit.next_event(0)
    assert first == 1_000_686  # ceil(1194 * 10**9 / 1193182)
    edges: list[int] = []
    for _ in range(12):
        event = b.pit.next_event(b.clock.now)
        assert event is not None
        b.pit.advance(event - 1)
        assert b.pulses == len(edges)  # not yet
        b.at(event).pit.advance(event)
        edges.append(event)
        assert b.pulses == len(edges)
    assert edges[:5] == [1_000_686, 2_000_534, 3_000_381, 4_000_228, 5_000_076]
    assert {later - earlier for earlier, later in zip(edges, edges[1:])} == {999_847, 999_848}
    assert edges == [ns_of_pulse(1 + 1193 * j) for j in range(1, 13)]


def test_one_virtual_second_of_mode2_gives_1000_edges() -> None:
    b = Board()
    b.program(0, 2, 1193)
    count = 0
    while (event := b.pit.next_event(b.clock.now)) is not None and event <= GHZ:
        b.at(event).pit.advance(event)
        count += 1
    assert count == (PIT_HZ - 1) // 1193 == 1000
    assert b.pulses == 1000


def test_missed_periods_collapse_into_one_edge() -> None:
    """A vCPU away for ten periods gets one IRQ 0 edge, not ten (as the PIC's IRR would)."""
    b = Board()
    b.program(0, 2, 1193)
    b.pit.advance(10 * 1_000_000)
    assert b.pulses == 1
    # the 10th edge fell at 9.999 ms; the next is the 11th
    assert b.pit.next_event(10 * 1_000_000) == ns_of_pulse(1 + 1193 * 11)
    b.pit.advance(10 * 1_000_000)
    assert b.pulses == 1


def test_next_event_reports_an_overdue_edge() -> None:
    b = Board()
    b.program(0, 2, 1193)
    assert b.pit.next_event(5_000_000) == 1_000_686  # not advanced yet: due in the past


def test_not_counting_means_no_event() -> None:
    b = Board()
    assert b.pit.next_event(0) is None
    b.outb(CMD, 0x34)  # control word, no count yet
    assert b.pit.next_event(0) is None


def test_mode0_interrupt_on_terminal_count_is_one_shot() -> None:
    """Mode 0: OUT low after the control word, high N + 1 pulses after the count write."""
    b = Board()
    b.program(0, 0, 1000)
    assert not b.read_back(0) & 0x80
    assert b.pit.next_event(0) == ns_of_pulse(1001)
    b.at(ns_of_pulse(500)).pit.advance(ns_of_pulse(500))
    assert b.latched_count(0) == 1000 - 499
    b.at(ns_of_pulse(1001) - 1).pit.advance(b.clock.now)
    assert b.pulses == 0 and not b.read_back(0) & 0x80
    b.at(ns_of_pulse(1001)).pit.advance(b.clock.now)
    assert b.pulses == 1 and b.read_back(0) & 0x80
    assert b.pit.next_event(b.clock.now) is None
    b.at(ns_of_pulse(1001 + 70000)).pit.advance(b.clock.now)
    assert b.pulses == 1  # the counter wraps and keeps counting; OUT stays high
    assert b.latched_count(0) == (1000 - 71000) % 0x10000


def test_mode0_two_byte_write_stops_counting_between_the_bytes() -> None:
    b = Board()
    b.program(0, 0, 100)
    b.at(ns_of_pulse(50))
    b.outb(CH0, 0x10)  # first byte of a new count: counting stops, OUT low
    assert b.pit.next_event(b.clock.now) is None
    b.at(ns_of_pulse(60))
    assert b.latched_count(0) == 100 - 49
    b.outb(CH0, 0x00)
    assert b.pit.next_event(b.clock.now) == ns_of_pulse(60 + 1 + 0x10)


def test_latch_command_freezes_the_count() -> None:
    b = Board()
    b.program(0, 2, 1193)
    b.at(ns_of_pulse(300))
    b.outb(CMD, 0x00)  # latch channel 0
    b.at(ns_of_pulse(900))
    b.outb(CMD, 0x00)  # ignored: the first latch is unread
    assert b.inb(CH0) | (b.inb(CH0) << 8) == 1193 - 299
    assert b.inb(CH0) | (b.inb(CH0) << 8) == 1193 - 899  # latch consumed: live count again


@pytest.mark.parametrize(
    ("access", "writes", "count", "reads"),
    [
        (1, [0x34], 0x34, [0x34 - 9, 0x34 - 9]),  # lobyte only: every read is the low byte
        (2, [0x12], 0x1200, [0x11, 0x11]),  # hibyte only: every read is the high byte
        (3, [0x34, 0x12], 0x1234, [0x2B, 0x12, 0x2B, 0x12]),  # lobyte then hibyte, alternating
    ],
)
def test_access_modes_sequence_bytes(
    access: int, writes: list[int], count: int, reads: list[int]
) -> None:
    b = Board(hz=PIT_HZ)  # one clock tick per PIT pulse
    b.outb(CMD, (access << 4) | (0 << 1))  # channel 0, mode 0
    for value in writes:
        b.outb(CH0, value)
    assert b.pit.channel_info(0).initial_count == count
    b.at(10)  # pulse 1 loaded the count; nine decrements since
    assert [b.inb(CH0) for _ in reads] == reads


@pytest.mark.parametrize(
    ("control", "count", "when", "status"),
    [
        (0x34, None, 0, 0x80 | 0x40 | 0x34),  # mode 2 after the control word: OUT high, null count
        (0x34, 100, 0, 0x80 | 0x40 | 0x34),  # count written, not yet loaded: still null
        (0x34, 100, 1, 0x80 | 0x34),  # loaded on the next pulse
        (0x30, 100, 1, 0x30),  # mode 0: OUT low until terminal count
        (0x30, 100, 101, 0x80 | 0x30),
        (0x1F, 0x99, 1, 0x80 | 0x1F),  # lobyte only, mode 7 shown as written, BCD
        (0x32, 100, 1, 0x80 | 0x40 | 0x32),  # mode 1 waits for a GATE trigger: null count
    ],
)
def test_read_back_status(control: int, count: int | None, when: int, status: int) -> None:
    b = Board(hz=PIT_HZ)
    b.outb(CMD, control)
    if count is not None:
        b.outb(CH0, count & 0xFF)
        if (control >> 4) & 3 == 3:
            b.outb(CH0, count >> 8)
    b.at(when)
    assert b.read_back(0) == status


def test_read_back_status_comes_before_the_count() -> None:
    b = Board(hz=PIT_HZ)
    b.program(2, 0, 500)
    b.at(101)
    b.outb(CMD, 0xC8)  # read-back count and status of channel 2
    assert [b.inb(CH2) for _ in range(3)] == [0x30, 500 & 0xFF, 500 >> 8]  # GATE 2 is low


def test_bcd_counting() -> None:
    b = Board(hz=PIT_HZ)
    b.program(0, 0, 0x1000, bcd=True)  # 1000 decimal
    b.at(2)
    assert b.latched_count(0) == 0x0999
    assert b.pit.next_event(2) == 1001
    b.program(0, 2, 0x0000, bcd=True)  # 0 is 10000 in BCD
    assert b.pit.next_event(2) == 3 + 10000


def test_channel2_mode0_calibration_loop_like_linux() -> None:
    """pit_calibrate_tsc(): gate on, speaker off, mode 0 on channel 2, poll port 0x61 bit 5."""
    b = Board(hz=PIT_HZ)
    b.outb(PORT_B, (b.inb(PORT_B) & ~0x02) | 0x01)
    b.program(2, 0, 11932)
    b.at(11932)
    assert not b.inb(PORT_B) & 0x20
    b.at(11933)
    assert b.inb(PORT_B) & 0x20
    assert b.pulses == 0  # channel 2 has no IRQ


def test_gate_low_suspends_mode0() -> None:
    b = Board(hz=PIT_HZ)
    b.outb(PORT_B, 0x01)
    b.program(2, 0, 100)
    b.at(41)
    b.outb(PORT_B, 0x00)
    b.at(500)
    assert b.latched_count(2) == 60
    b.outb(PORT_B, 0x01)
    b.at(560)
    assert b.latched_count(2) == 0
    assert b.inb(PORT_B) & 0x20


@pytest.mark.parametrize(("count", "high", "low"), [(4, 2, 2), (5, 3, 2), (6, 3, 3)])
def test_mode3_square_wave_duty(count: int, high: int, low: int) -> None:
    b = Board(hz=PIT_HZ)
    b.outb(PORT_B, 0x01)
    b.program(2, 3, count)
    wave = []
    for t in range(1, 1 + 2 * count):
        b.at(t)
        wave.append(bool(b.inb(PORT_B) & 0x20))
    assert wave == ([True] * high + [False] * low) * 2


def test_mode1_retriggerable_one_shot_on_gate() -> None:
    b = Board(hz=PIT_HZ)
    b.program(2, 1, 10)
    assert b.inb(PORT_B) & 0x20  # waiting for a trigger: OUT high
    b.at(100).outb(PORT_B, 0x01)  # trigger: loads on pulse 101
    b.at(101)
    assert not b.inb(PORT_B) & 0x20
    b.at(105).outb(PORT_B, 0x00)
    b.at(106).outb(PORT_B, 0x01)  # retrigger: OUT stays low 10 more pulses from 107
    b.at(116)
    assert not b.inb(PORT_B) & 0x20
    b.at(117)
    assert b.inb(PORT_B) & 0x20


def test_mode4_software_strobe_raises_irq0_after_n_plus_1() -> None:
    b = Board(hz=PIT_HZ)
    b.program(0, 4, 50)
    assert b.pit.next_event(0) == 1 + 50 + 1
    b.at(50)
    assert b.read_back(0) & 0x80
    b.at(51)
    assert not b.read_back(0) & 0x80  # the CE reached 0: OUT low for one pulse
    assert b.pulses == 0
    b.at(52)
    assert b.read_back(0) & 0x80  # the access brought IRQ 0 up to date
    assert b.pulses == 1
    assert b.pit.next_event(52) is None


def test_mode5_needs_a_gate_trigger() -> None:
    b = Board(hz=PIT_HZ)
    b.program(0, 5, 20)
    assert b.pit.next_event(0) is None  # channel 0's GATE is tied high: never triggered
    b.at(10)
    b.pit.set_gate(0, False)
    b.pit.set_gate(0, True)
    assert b.pit.next_event(10) == 11 + 20 + 1


def test_mode2_new_count_waits_for_the_end_of_the_period() -> None:
    b = Board(hz=PIT_HZ)
    b.program(0, 2, 100)
    b.at(30)
    b.outb(CH0, 10)
    b.outb(CH0, 0)
    assert b.read_back(0) & 0x40  # null count until the reload
    edges: list[int] = []
    while len(edges) < 3:
        event = b.pit.next_event(b.clock.now)
        assert event is not None
        b.at(event).pit.advance(event)
        edges.append(event)
    assert edges == [101, 111, 121]
    assert not b.read_back(0) & 0x40


def test_control_word_stops_the_counter() -> None:
    b = Board(hz=PIT_HZ)
    b.program(0, 2, 100)
    b.at(50).outb(CMD, 0x34)
    assert b.pit.next_event(50) is None
    assert b.read_back(0) == 0xC0 | 0x34


def test_clock_going_backwards_is_an_error() -> None:
    b = Board()
    b.pit.advance(100)
    with pytest.raises(ClockError):
        b.pit.advance(99)
    with pytest.raises(ClockError):
        b.pit.next_event(99)


def test_port_b_and_command_port_reads() -> None:
    b = Board(hz=PIT_HZ)
    assert b.inb(CMD) == 0xFF  # write-only
    b.outb(PORT_B, 0xFF)
    assert b.inb(PORT_B) & 0x0F == 0x0F
    assert b.pit.speaker_on
    b.at(18)
    toggled = b.inb(PORT_B) & 0x10
    b.at(36)
    assert b.inb(PORT_B) & 0x10 != toggled  # refresh toggles every 18 pulses
    assert b.inb(PORT_B) & 0xC0 == 0


def test_word_read_of_the_counter_ports_reads_two_channels() -> None:
    b = Board(hz=PIT_HZ)
    b.program(0, 0, 0x0102, access=1)
    b.program(1, 0, 0x0304, access=1)
    b.at(1)  # both loaded
    assert b.bus.read(CH0, 2) == 0x0402  # channel 0's low byte, then channel 1's


# -- a naive pulse-by-pulse 8254, from the datasheet's mode descriptions ---------------------


def simulate(mode: int, n: int, pulses: int) -> list[tuple[bool, int]]:
    """(OUT, CE) after each pulse 0 .. pulses-1, where pulse 0 loads the count (gate high)."""
    out = mode != 0
    ce = 0
    strobed = False
    trace = []
    for p in range(pulses):
        if p == 0:
            ce = n - 1 if mode == 3 and n % 2 else n
            out = mode != 0
        elif mode == 0:
            ce = (ce - 1) % 0x10000
            out = out or ce == 0
        elif mode == 2:
            ce = n if ce == 1 else ce - 1
            out = ce != 1
        elif mode == 3:
            if n % 2 == 0:
                ce -= 2
                if ce == 0:
                    out, ce = not out, n
            elif out:
                if ce == 0:
                    out, ce = False, n - 1
                else:
                    ce -= 2
            else:
                ce -= 2
                if ce == 0:
                    out, ce = True, n - 1
        else:  # mode 4
            ce = (ce - 1) % 0x10000
            out = not (ce == 0 and not strobed)
            strobed = strobed or ce == 0
        trace.append((out, ce % 0x10000))
    return trace


@given(st.sampled_from([0, 2, 3, 4]), st.integers(2, 40))
def test_closed_forms_agree_with_a_pulse_by_pulse_8254(mode: int, n: int) -> None:
    """Property: OUT, the count, and every IRQ 0 edge match a naive per-pulse simulation."""
    b = Board(hz=PIT_HZ)
    b.program(0, mode, n)  # written at pulse 0: loads on pulse 1
    trace = simulate(mode, n, 4 * n + 3)
    expected_rises = [
        1 + p for p in range(1, len(trace)) if trace[p][0] and not trace[p - 1][0]
    ]
    for p, (out, ce) in enumerate(trace):
        b.at(1 + p)
        assert b.read_back(0) >> 7 == int(out), (p, "OUT")
        assert b.latched_count(0) == ce, (p, "CE")
    b2 = Board(hz=PIT_HZ)
    b2.program(0, mode, n)
    rises = []
    while (event := b2.pit.next_event(b2.clock.now)) is not None and event <= len(trace):
        b2.at(event).pit.advance(event)
        rises.append(event)
    assert rises == expected_rises
    assert b2.pulses == len(rises)
