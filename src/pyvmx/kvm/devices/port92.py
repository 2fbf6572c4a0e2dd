"""System control port A at 0x92 (the PS/2 "fast A20 and reset" port; QEMU hw/i386/port92.c).

Bit 1 is the A20 gate and reads back as written; a 0->1 write of bit 0 requests a CPU reset
(``on_reset``) and the bit reads back as 0. Guest RAM is never wrapped at 1 MiB here: the A20
gate is always open, as it is in QEMU once firmware has enabled it.
"""

from __future__ import annotations

from collections.abc import Callable

PORT92 = 0x92
PORT92_A20 = 1 << 1
PORT92_RESET = 1 << 0


class Port92:
    def __init__(self, on_reset: Callable[[], None] | None = None) -> None:
        self.value = PORT92_A20
        self.on_reset = on_reset

    @property
    def io_ranges(self) -> tuple[tuple[int, int, str], ...]:
        return ((PORT92, 1, "port92"),)

    def io_read(self, port: int, size: int) -> int:
        return self.value

    def io_write(self, port: int, size: int, value: int) -> None:
        if value & PORT92_RESET and not self.value & PORT92_RESET and self.on_reset is not None:
            self.on_reset()
        self.value = value & ~PORT92_RESET & 0xFF
