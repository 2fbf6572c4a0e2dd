"""The PC's CMOS RAM and real-time clock, a Motorola MC146818A (datasheet "Address Map",
"Registers A-D"; QEMU hw/rtc/mc146818rtc.c) at index port 0x70 and data port 0x71.

* Port 0x70 selects one of 128 bytes (bits 6:0); bit 7 is the NMI mask of the PC, kept but not
  acted on. Port 0x71 reads and writes the selected byte.
* Bytes 0x00-0x09 are the clock: seconds, alarm seconds, minutes, alarm minutes, hours, alarm
  hours, day of week, day of month, month, year -- BCD unless register B's DM bit (bit 2) is
  set, 24-hour unless B's 24/12 bit (bit 1) is clear. The clock counts guest time from
  2000-01-01 00:00:00 (a Saturday) plus ``epoch`` seconds, so a run is reproducible.
* Register A (0x0A): bit 7 UIP reads 0 (an update is never in progress when sampled), bits 6:0
  as written (reset 0x26: 32.768 kHz divider, 1024 Hz rate). Register B (0x0B): reset 0x02
  (24-hour, BCD). Register C (0x0C) reads 0 -- no periodic, alarm or update interrupts are
  raised -- and is read-only; register D (0x0D) reads 0x80 (VRT: the battery is good).
* Bytes 0x0E-0x7F are battery-backed RAM; the firmware-owned bytes QEMU fills
  (hw/i386/pc.c pc_cmos_init): base memory 640 KiB (0x15/0x16), extended memory in KiB up to
  64 MiB (0x17/0x18 and 0x30/0x31), memory above 16 MiB in 64-KiB units (0x34/0x35) and the
  CPU count less one (0x5F).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from pyvmx.kvm.devices.bus import read_bytewise, write_bytewise

CMOS_INDEX = 0x70
CMOS_DATA = 0x71
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_B_24H = 1 << 1
REG_B_DM_BINARY = 1 << 2
REG_D_VRT = 1 << 7
RTC_EPOCH = datetime.datetime(2000, 1, 1)


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class Cmos:
    def __init__(self, clock: Callable[[], int], tsc_hz: int, *, epoch: int = 0) -> None:
        self.clock = clock
        self.tsc_hz = tsc_hz
        self.epoch = epoch
        self.ram = bytearray(128)
        self.ram[REG_A] = 0x26
        self.ram[REG_B] = REG_B_24H
        self.index = 0
        self.nmi_masked = False

    def describe(self, *, ram_size: int, cpus: int) -> None:
        """QEMU's pc_cmos_init memory and CPU bytes."""
        self.ram[0x15:0x17] = (640).to_bytes(2, "little")
        ext_kib = min(max(0, ram_size - 0x100000) // 1024, 0xFFFF)
        self.ram[0x17:0x19] = self.ram[0x30:0x32] = ext_kib.to_bytes(2, "little")
        above_16m = min(max(0, ram_size - 0x1000000) // 0x10000, 0xFFFF)
        self.ram[0x34:0x36] = above_16m.to_bytes(2, "little")
        self.ram[0x5F] = max(0, cpus - 1) & 0xFF

    @property
    def io_ranges(self) -> tuple[tuple[int, int, str], ...]:
        return ((CMOS_INDEX, 2, "cmos"),)

    def now(self) -> datetime.datetime:
        return RTC_EPOCH + datetime.timedelta(seconds=self.epoch + self.clock() // max(1, self.tsc_hz))

    def _time_register(self, index: int) -> int:
        t = self.now()
        hour = t.hour
        pm = 0
        if not self.ram[REG_B] & REG_B_24H:
            pm = 0x80 if hour >= 12 else 0
            hour = hour % 12 or 12
        value = {0: t.second, 2: t.minute, 4: hour, 6: t.isoweekday() % 7 + 1, 7: t.day, 8: t.month, 9: t.year % 100}[index]
        return (value if self.ram[REG_B] & REG_B_DM_BINARY else _bcd(value)) | pm

    def _read(self, port: int) -> int:
        if port == CMOS_INDEX:
            return 0xFF  # the index register is write-only
        index = self.index
        if index in (0, 2, 4, 6, 7, 8, 9):
            return self._time_register(index)
        if index == REG_A:
            return self.ram[REG_A] & 0x7F
        if index == REG_C:
            return 0
        if index == REG_D:
            return REG_D_VRT
        return self.ram[index]

    def _write(self, port: int, value: int) -> None:
        if port == CMOS_INDEX:
            self.index = value & 0x7F
            self.nmi_masked = bool(value & 0x80)
        elif self.index not in (REG_C, REG_D):
            self.ram[self.index] = value

    def io_read(self, port: int, size: int) -> int:
        return read_bytewise(self._read, port, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        write_bytewise(self._write, port, size, value)
