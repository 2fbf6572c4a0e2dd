"""A debug-exit port: the guest ends the run with an exit code (after QEMU's isa-debug-exit,
hw/misc/debugexit.c).

A 1-, 2- or 4-byte write of ``v`` to the port (0xF4 by default) records ``code = v`` and calls
``on_exit(v)``; the hypervisor then stops the run and reports ``v``. QEMU's device instead
exits the QEMU process with status ``(v << 1) | 1`` so that no guest value can look like a
clean exit of QEMU itself; there is no process to protect here, so the value is passed through
unchanged. Reads return 0.
"""

from __future__ import annotations

from collections.abc import Callable

DEBUG_EXIT_PORT = 0xF4


class DebugExit:
    """The exit port. ``code`` is the last value written, or None."""

    def __init__(
        self,
        port: int = DEBUG_EXIT_PORT,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.port = port
        self.on_exit = on_exit
        self.code: int | None = None

    @property
    def io_ranges(self) -> tuple[tuple[int, int, str], ...]:
        return ((self.port, 1, "debug-exit"),)

    def io_read(self, port: int, size: int) -> int:
        return 0

    def io_write(self, port: int, size: int, value: int) -> None:
        self.code = value & ((1 << (8 * size)) - 1)
        if self.on_exit is not None:
            self.on_exit(self.code)
