"""I/O bitmaps A and B (SDM 25.6.4) and the per-vCPU choice between them and unconditional I/O
exiting.

Linux KVM runs its own guests with "unconditional I/O exiting" (it is in
KVM_REQUIRED_VMX_CPU_BASED_VM_EXEC_CONTROL and vmx_exec_control() clears "use I/O bitmaps"); I/O
bitmaps appear only for nested guests. Here a vCPU starts the same way, and the I/O-bitmap API
(seed 002: "intercept only port 0x3F8") switches to bitmaps: bitmap A covers ports 0000H-7FFFH,
B covers 8000H-FFFFH, one bit per port, set = exit. With bitmaps in use, "unconditional I/O
exiting" is ignored (SDM 26.1.3). Both pages start all ones, so switching modes alone changes no
decision.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyvmx.vmx.memory import PAGE_SIZE, PhysicalMemory

IO_PORTS_PER_BITMAP = 0x8000
IO_PORT_COUNT = 0x10000

PortSpec = int | range | Iterable[int]


def io_bitmap_position(port: int) -> tuple[int, int, int]:
    """(bitmap: 0 for A, 1 for B; byte offset; bit) of a port's exit bit."""
    if not 0 <= port < IO_PORT_COUNT:
        raise ValueError(f"I/O port {port:#x} is outside 0..0xffff")
    which = port // IO_PORTS_PER_BITMAP
    bit = port % IO_PORTS_PER_BITMAP
    return which, bit >> 3, bit & 7


def ports_of(spec: PortSpec) -> list[int]:
    """A port, a range of ports, or any iterable of ports, checked."""
    ports = [spec] if isinstance(spec, int) else list(spec)
    for port in ports:
        if not isinstance(port, int) or not 0 <= port < IO_PORT_COUNT:
            raise ValueError(f"I/O port {port!r} is outside 0..0xffff")
    return ports


class IoBitmaps:
    """The two bitmap pages at host-physical ``address_a`` and ``address_b``."""

    def __init__(self, memory: PhysicalMemory, address_a: int, address_b: int) -> None:
        for address in (address_a, address_b):
            if address % PAGE_SIZE:
                raise ValueError(f"I/O bitmap address {address:#x} is not 4-KiB aligned")
        self.memory = memory
        self.address_a = address_a
        self.address_b = address_b
        self.fill(intercept=True)

    def fill(self, *, intercept: bool) -> None:
        byte = 0xFF if intercept else 0
        self.memory.fill(self.address_a, PAGE_SIZE, byte)
        self.memory.fill(self.address_b, PAGE_SIZE, byte)

    def set_intercept(self, ports: PortSpec, intercept: bool) -> None:
        for port in ports_of(ports):
            which, offset, bit = io_bitmap_position(port)
            base = self.address_b if which else self.address_a
            self.memory.set_bit(base + offset, bit, intercept)

    def intercepted(self, port: int) -> bool:
        which, offset, bit = io_bitmap_position(port)
        base = self.address_b if which else self.address_a
        return self.memory.test_bit(base + offset, bit)
