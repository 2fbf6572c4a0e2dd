"""Guest-physical memory as the hypervisor reaches it through the memslots and the VMM's address
space -- kvm_read_guest()/kvm_write_guest() (virt/kvm/kvm_main.c): gpa -> memslot -> hva ->
host page. Writes mark the pages dirty in logging slots (mark_page_dirty_in_slot()), as every
write KVM itself makes to guest memory does.

Used by the emulator's context for the RAM side of an instruction, by the async-PF code for the
shared area, and as the guest page walker's memory (:class:`GuestPhysicalView`).
"""

from __future__ import annotations

import struct

from pyvmx.kvm.host_mm import HostMemoryError, HostMm
from pyvmx.kvm.memslots import PAGE_SHIFT, PAGE_SIZE, MemorySlot, Memslots


class GuestMemoryError(ValueError):
    """A guest-physical access outside RAM (no memslot, or a write to a read-only one)."""

    def __init__(self, gpa: int, size: int, write: bool) -> None:
        super().__init__(f"guest-physical {'write' if write else 'read'} of {size} bytes at {gpa:#x} is not RAM")
        self.gpa = gpa
        self.size = size
        self.write = write


class GuestMemory:
    """kvm_read_guest()/kvm_write_guest() over ``memslots`` (address space ``as_id``)."""

    def __init__(self, memslots: Memslots, host_mm: HostMm, as_id: int = 0) -> None:
        self.memslots = memslots
        self.host_mm = host_mm
        self.as_id = as_id

    def slot(self, gpa: int) -> MemorySlot | None:
        """The usable slot of ``gpa`` (INVALID slots count as none, as __gfn_to_hva_many())."""
        slot = self.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT, self.as_id)
        return None if slot is None or slot.invalid else slot

    def is_ram(self, gpa: int, write: bool) -> bool:
        slot = self.slot(gpa)
        return slot is not None and not (write and slot.readonly)

    def is_mmio(self, gpa: int, write: bool) -> bool:
        """What the emulator asks: not RAM for this access, so it goes to a device."""
        return not self.is_ram(gpa, write)

    def _pieces(self, gpa: int, size: int, write: bool) -> list[tuple[MemorySlot, int, int, int]]:
        pieces = []
        offset = 0
        while offset < size:
            address = gpa + offset
            length = min(size - offset, PAGE_SIZE - (address & (PAGE_SIZE - 1)))
            slot = self.slot(address)
            if slot is None or (write and slot.readonly):
                raise GuestMemoryError(gpa, size, write)
            pieces.append((slot, address, offset, length))
            offset += length
        return pieces

    def read(self, gpa: int, size: int) -> bytes:
        """Read guest RAM; raises :class:`GuestMemoryError` if any byte is not RAM."""
        out = bytearray(size)
        for slot, address, offset, length in self._pieces(gpa, size, False):
            hva = slot.gfn_to_hva(address >> PAGE_SHIFT) + (address & (PAGE_SIZE - 1))
            try:
                out[offset : offset + length] = self.host_mm.read(hva, length)
            except HostMemoryError as error:
                raise GuestMemoryError(gpa, size, False) from error
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray) -> None:
        """Write guest RAM and mark the pages dirty; raises :class:`GuestMemoryError` (before
        writing anything) if any byte is not writable RAM."""
        pieces = self._pieces(gpa, len(data), True)
        for slot, address, offset, length in pieces:
            hva = slot.gfn_to_hva(address >> PAGE_SHIFT) + (address & (PAGE_SIZE - 1))
            try:
                self.host_mm.write(hva, data[offset : offset + length])
            except HostMemoryError as error:
                raise GuestMemoryError(gpa, len(data), True) from error
            self.memslots.mark_page_dirty(slot, address >> PAGE_SHIFT)

    def read64(self, gpa: int) -> int:
        return int(struct.unpack("<Q", self.read(gpa, 8))[0])

    def write64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value & (2**64 - 1)))

    def read32(self, gpa: int) -> int:
        return int(struct.unpack("<I", self.read(gpa, 4))[0])

    def write32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value & 0xFFFFFFFF))


class GuestPhysicalView:
    """:class:`GuestMemory` as the guest page walker's memory (pyvmx.vmx.paging
    GuestPhysicalAccess), for translating linear addresses in software (kvm_mmu_gva_to_gpa)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def read64(self, gpa: int, *, paging_structure: bool = True) -> int:
        return self.memory.read64(gpa)

    def read32(self, gpa: int, *, paging_structure: bool = True) -> int:
        return self.memory.read32(gpa)

    def write64(self, gpa: int, value: int, *, paging_structure: bool = True) -> None:
        self.memory.write64(gpa, value)

    def write32(self, gpa: int, value: int, *, paging_structure: bool = True) -> None:
        self.memory.write32(gpa, value)
