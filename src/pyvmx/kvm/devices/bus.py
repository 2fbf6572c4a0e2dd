"""The buses devices sit on: port I/O, MMIO, and interrupt lines.

An :class:`IoBus` maps ranges of I/O ports onto devices, as KVM's ``kvm_io_bus`` does for
``KVM_PIO_BUS``; an :class:`MmioBus` does the same for guest-physical address ranges
(``KVM_MMIO_BUS``). A port or address no device claims is not an error: :meth:`IoBus.read`
returns ``None`` and :meth:`IoBus.write` returns ``False``, and the hypervisor hands the access
to its user, as KVM does with ``KVM_EXIT_IO`` / ``KVM_EXIT_MMIO``.

An access goes whole to the device that claims its *first* port or byte; a device whose
registers are one byte wide splits wider accesses itself (:func:`read_bytewise`,
:func:`write_bytewise`), the way QEMU's memory core splits accesses for regions whose
``impl.max_access_size`` is 1 (``out dx, ax`` to 0x20 writes 0x20, then 0x21).

An MMIO access of a size no bus cycle has -- the 3- and 5-byte halves of an access split at a
page or RAM/MMIO boundary -- is split into naturally aligned 1/2/4/8-byte cycles
(:func:`split_access`), as QEMU's softmmu does for an unaligned MMIO access
(accel/tcg/cputlb.c do_ld_mmio_beN / do_st_mmio_leN: each piece the largest power of two the
address alignment and the bytes left allow, at most 8). Each cycle goes to the device claiming
its first byte; a cycle nobody claims reads all ones and its write is dropped, as an unassigned
address does in QEMU (unassigned_mem_ops) -- unless no cycle is claimed at all, when the whole
access goes to the user.

An :class:`IrqLine` is the wire from a device to an interrupt controller input.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

IO_PORT_SPACE = 0x10000
IO_ACCESS_SIZES = (1, 2, 4)
MMIO_ACCESS_SIZES = (1, 2, 4, 8)
MMIO_ADDRESS_SPACE = 1 << 64
MAX_MMIO_ACCESS = 64  # bytes: the widest access an instruction makes (a 512-bit vector)


class BusConflictError(ValueError):
    """A range given to ``register`` overlaps a range already on the bus."""


class BusAccessError(ValueError):
    """An access the bus cannot express: a bad size, or a port/address out of its space."""


class UnknownDeviceError(KeyError):
    """``unregister`` was given a device that is not on the bus."""


class PortIoDevice(Protocol):
    """A device on the I/O port bus. ``port`` is the absolute port number; ``size`` is 1, 2 or 4;
    values are little-endian, as IN/OUT move them (SDM Vol. 1 18.2)."""

    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


class MmioDevice(Protocol):
    """A device on the MMIO bus. ``address`` is the absolute guest-physical address of the first
    byte; ``size`` is 1, 2, 4 or 8; values are little-endian."""

    def mmio_read(self, address: int, size: int) -> int: ...

    def mmio_write(self, address: int, size: int, value: int) -> None: ...


DeviceT = TypeVar("DeviceT")


@dataclass(frozen=True, slots=True)
class BusEntry(Generic[DeviceT]):
    """One registered range: ``[base, base + length)`` claimed by ``device`` under ``name``."""

    base: int
    length: int
    device: DeviceT
    name: str

    @property
    def end(self) -> int:
        """One past the last port/address of the range."""
        return self.base + self.length

    def __contains__(self, where: object) -> bool:
        return isinstance(where, int) and self.base <= where < self.end


class _RangeMap(Generic[DeviceT]):
    """Non-overlapping ranges kept sorted by base; lookups by bisection."""

    def __init__(self, space: int, what: str) -> None:
        self._space = space
        self._what = what
        self._entries: list[BusEntry[DeviceT]] = []
        self._bases: list[int] = []

    def register(self, base: int, length: int, device: DeviceT, name: str) -> None:
        if length <= 0:
            raise BusAccessError(f"{name}: {self._what} range length {length} is not positive")
        if base < 0 or base + length > self._space:
            raise BusAccessError(
                f"{name}: {self._what} range {base:#x}+{length:#x} "
                f"is outside 0..{self._space - 1:#x}"
            )
        new: BusEntry[DeviceT] = BusEntry(base, length, device, name)
        at = bisect.bisect_left(self._bases, base)
        for neighbour in self._entries[max(at - 1, 0) : at + 1]:
            if neighbour.base < new.end and base < neighbour.end:
                raise BusConflictError(
                    f"{name}: {self._what} range {base:#x}..{new.end - 1:#x} overlaps "
                    f"{neighbour.name} at {neighbour.base:#x}..{neighbour.end - 1:#x}"
                )
        self._entries.insert(at, new)
        self._bases.insert(at, base)

    def unregister(self, device: DeviceT) -> int:
        kept = [e for e in self._entries if e.device is not device]
        removed = len(self._entries) - len(kept)
        if removed == 0:
            raise UnknownDeviceError(f"{device!r} is not on the {self._what} bus")
        self._entries = kept
        self._bases = [e.base for e in kept]
        return removed

    def find(self, where: int) -> BusEntry[DeviceT] | None:
        at = bisect.bisect_right(self._bases, where) - 1
        if at < 0:
            return None
        entry = self._entries[at]
        return entry if where in entry else None

    def entries(self) -> list[BusEntry[DeviceT]]:
        return list(self._entries)


class IoBus:
    """The I/O port space, 0..0xFFFF (SDM Vol. 1 18.3): ranges of ports claimed by devices."""

    def __init__(self) -> None:
        self._map: _RangeMap[PortIoDevice] = _RangeMap(IO_PORT_SPACE, "I/O port")

    def register(self, base: int, length: int, device: PortIoDevice, name: str) -> None:
        """Give ports ``base .. base+length-1`` to ``device``; BusConflictError on overlap."""
        self._map.register(base, length, device, name)

    def register_all(
        self, device: PortIoDevice, ranges: Iterable[tuple[int, int, str]]
    ) -> None:
        """Register each ``(base, length, name)`` of ``ranges`` (a device's ``io_ranges``)."""
        for base, length, name in ranges:
            self.register(base, length, device, name)

    def unregister(self, device: PortIoDevice) -> int:
        """Remove every range of ``device``; returns how many. UnknownDeviceError if none."""
        return self._map.unregister(device)

    def find(self, port: int) -> tuple[PortIoDevice, str] | None:
        """The device claiming ``port`` and the name it was registered under, or None."""
        entry = self._map.find(port)
        return None if entry is None else (entry.device, entry.name)

    def read(self, port: int, size: int) -> int | None:
        """IN: the value read, or None when no device claims ``port`` (the user handles it)."""
        self._check(port, size)
        entry = self._map.find(port)
        if entry is None:
            return None
        return entry.device.io_read(port, size) & _mask(size)

    def write(self, port: int, size: int, value: int) -> bool:
        """OUT: True when a device claimed ``port`` and took the value."""
        self._check(port, size)
        entry = self._map.find(port)
        if entry is None:
            return False
        entry.device.io_write(port, size, value & _mask(size))
        return True

    def devices(self) -> list[BusEntry[PortIoDevice]]:
        """Every registered range, by port, for an ``info`` listing."""
        return self._map.entries()

    @staticmethod
    def _check(port: int, size: int) -> None:
        if size not in IO_ACCESS_SIZES:
            raise BusAccessError(f"I/O access size must be 1, 2 or 4, not {size}")
        if not 0 <= port < IO_PORT_SPACE:
            raise BusAccessError(f"I/O port {port:#x} is outside 0..0xffff")


class MmioBus:
    """Guest-physical MMIO ranges claimed by devices (KVM's ``KVM_MMIO_BUS``)."""

    def __init__(self) -> None:
        self._map: _RangeMap[MmioDevice] = _RangeMap(MMIO_ADDRESS_SPACE, "MMIO")

    def register(self, base: int, length: int, device: MmioDevice, name: str) -> None:
        """Give ``base .. base+length-1`` to ``device``; BusConflictError on overlap."""
        self._map.register(base, length, device, name)

    def unregister(self, device: MmioDevice) -> int:
        """Remove every range of ``device``; returns how many. UnknownDeviceError if none."""
        return self._map.unregister(device)

    def find(self, address: int) -> tuple[MmioDevice, str] | None:
        """The device claiming ``address`` and its registered name, or None."""
        entry = self._map.find(address)
        return None if entry is None else (entry.device, entry.name)

    def read(self, address: int, size: int) -> int | None:
        """A load: the value, or None when no device claims ``address`` (any size: one that is
        not 1, 2, 4 or 8 is split, see the module docstring)."""
        self._check(address, size)
        if size not in MMIO_ACCESS_SIZES:
            return self._read_split(address, size)
        entry = self._map.find(address)
        if entry is None:
            return None
        return entry.device.mmio_read(address, size) & _mask(size)

    def write(self, address: int, size: int, value: int) -> bool:
        """A store: True when a device claimed ``address`` (or a piece of a split access)."""
        self._check(address, size)
        if size not in MMIO_ACCESS_SIZES:
            return self._write_split(address, size, value)
        entry = self._map.find(address)
        if entry is None:
            return False
        entry.device.mmio_write(address, size, value & _mask(size))
        return True

    def _read_split(self, address: int, size: int) -> int | None:
        value, claimed = 0, False
        for piece, offset, length in split_access(address, size):
            entry = self._map.find(piece)
            if entry is None:
                part = _mask(length)  # nothing there: the bus floats high
            else:
                part = entry.device.mmio_read(piece, length) & _mask(length)
                claimed = True
            value |= part << (8 * offset)
        return value if claimed else None

    def _write_split(self, address: int, size: int, value: int) -> bool:
        pieces = [(self._map.find(piece), piece, offset, length) for piece, offset, length in split_access(address, size)]
        if all(entry is None for entry, _, _, _ in pieces):
            return False
        for entry, piece, offset, length in pieces:
            if entry is not None:
                entry.device.mmio_write(piece, length, (value >> (8 * offset)) & _mask(length))
        return True

    def devices(self) -> list[BusEntry[MmioDevice]]:
        """Every registered range, by address."""
        return self._map.entries()

    @staticmethod
    def _check(address: int, size: int) -> None:
        if not 1 <= size <= MAX_MMIO_ACCESS:
            raise BusAccessError(f"MMIO access size must be 1 to {MAX_MMIO_ACCESS} bytes, not {size}")
        if not 0 <= address < MMIO_ADDRESS_SPACE:
            raise BusAccessError(f"MMIO address {address:#x} is outside the 64-bit space")


class IrqLine:
    """One interrupt request wire from a device to a controller input.

    ``set_irq(irq, level)`` is the controller's input (e.g. :meth:`Pic.set_irq`). The line
    remembers its level and tells the controller only of changes, as a wire would: ``raise_()``
    on a line already high does nothing. ``pulse()`` is a rising then a falling edge, what an
    edge-triggered source such as the PIT's channel 0 on a PC delivers (QEMU ``qemu_irq_pulse``).
    """

    def __init__(self, irq: int, set_irq: Callable[[int, bool], None]) -> None:
        self._irq = irq
        self._set_irq = set_irq
        self._level = False

    @classmethod
    def unconnected(cls, irq: int) -> IrqLine:
        """A line to nowhere, for a device used on its own."""
        return cls(irq, lambda _irq, _level: None)

    @property
    def irq(self) -> int:
        return self._irq

    @property
    def level(self) -> bool:
        return self._level

    def set_level(self, level: bool) -> None:
        """Drive the line to ``level``; the controller hears only changes."""
        if level != self._level:
            self._level = level
            self._set_irq(self._irq, level)

    def raise_(self) -> None:
        self.set_level(True)

    def lower(self) -> None:
        self.set_level(False)

    def pulse(self) -> None:
        """A rising edge followed by a falling one (the line ends low)."""
        self.set_level(True)
        self.set_level(False)

    def __repr__(self) -> str:
        return f"IrqLine(irq={self._irq}, level={int(self._level)})"


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def split_access(address: int, size: int) -> list[tuple[int, int, int]]:
    """``(address, offset in the access, length)`` of the bus cycles of an access of ``size``
    bytes: naturally aligned powers of two of at most 8 bytes, the largest that fit at each
    step (QEMU accel/tcg/cputlb.c do_ld_mmio_beN)."""
    pieces = []
    offset = 0
    while offset < size:
        at = address + offset
        length = 8
        while length > 1 and (at % length or length > size - offset):
            length //= 2
        pieces.append((at % MMIO_ADDRESS_SPACE, offset, length))
        offset += length
    return pieces


def read_bytewise(read_byte: Callable[[int], int], port: int, size: int) -> int:
    """An access of ``size`` bytes to byte-wide registers: one read per port, little-endian."""
    value = 0
    for i in range(size):
        value |= (read_byte(port + i) & 0xFF) << (8 * i)
    return value


def write_bytewise(
    write_byte: Callable[[int, int], None], port: int, size: int, value: int
) -> None:
    """A write of ``size`` bytes to byte-wide registers: one write per port, low byte first."""
    for i in range(size):
        write_byte(port + i, (value >> (8 * i)) & 0xFF)
