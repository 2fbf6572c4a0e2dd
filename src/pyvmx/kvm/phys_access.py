"""Guest-physical accesses the hypervisor makes for the guest while emulating an instruction
(the elements of a string I/O instruction): to RAM, to an in-kernel MMIO device, or to nothing.

An address with neither RAM nor a device behind it reads all ones and drops writes, as a PC bus
does and QEMU's ``unassigned_mem_ops`` model; KVM's emulator would send such an access to the
VMM as KVM_EXIT_MMIO, and a VMM with no device there (QEMU) answers the same way. Either way the
guest sees an architectural outcome, never a host error. Accesses are split at page boundaries,
since each page may be RAM or not (a memslot ends on a page boundary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmx.kvm.mmu.guest_memory import GuestMemoryError

if TYPE_CHECKING:
    from pyvmx.kvm.vm import Vm

PAGE_SIZE = 4096


def _pages(gpa: int, size: int) -> list[tuple[int, int, int]]:
    """(address, offset in the access, length) of each page the access touches."""
    pieces = []
    offset = 0
    while offset < size:
        at = gpa + offset
        length = min(size - offset, PAGE_SIZE - (at & (PAGE_SIZE - 1)))
        pieces.append((at, offset, length))
        offset += length
    return pieces


def read_phys(vm: Vm, gpa: int, size: int) -> bytes:
    """``size`` bytes at ``gpa``: RAM, an MMIO device's answer, or all ones."""
    out = bytearray(b"\xff" * size)
    for at, offset, length in _pages(gpa, size):
        if vm.memory.is_ram(at, False):
            try:
                out[offset : offset + length] = vm.memory.read(at, length)
            except GuestMemoryError:
                pass  # the VMM unmapped the memory behind the slot: nothing answers
            continue
        value = vm.mmio_bus.read(at, length)
        if value is not None:
            out[offset : offset + length] = value.to_bytes(length, "little")
    return bytes(out)


def write_phys(vm: Vm, gpa: int, data: bytes) -> None:
    """Write ``data`` at ``gpa``: to RAM, to an MMIO device, or nowhere (dropped)."""
    for at, offset, length in _pages(gpa, len(data)):
        piece = data[offset : offset + length]
        if vm.memory.is_ram(at, True):
            try:
                vm.memory.write(at, piece)
            except GuestMemoryError:
                pass
            continue
        vm.mmio_bus.write(at, length, int.from_bytes(piece, "little"))
