"""Builds EPT paging structures (SDM 29.3.2) in a PhysicalMemory for tests."""

from __future__ import annotations

from pyvmx.arch.controls import (
    VMX_EPT_LARGE_PAGE_BIT,
    VMX_EPT_MT_SHIFT,
    VMX_EPT_RWX_MASK,
    VMX_EPTP_AD_ENABLE_BIT,
    VMX_EPTP_MT_WB,
    VMX_EPTP_PWL_4,
)
from pyvmx.vmx.memory import PageAllocator, PhysicalMemory

KIB4, MIB2, GIB1 = 1 << 12, 1 << 21, 1 << 30
_LEAF_SHIFT = {KIB4: 12, MIB2: 21, GIB1: 30}
_ADDRESS_MASK = ((1 << 52) - 1) & ~0xFFF


class EptBuilder:
    """A 4-level EPT whose table pages come from a bump allocator starting at ``table_base``."""

    def __init__(self, memory: PhysicalMemory, table_base: int = 0x100000, table_end: int = 0x200000) -> None:
        self.memory = memory
        self.allocator = PageAllocator(memory, table_base, table_end)
        self.pml4 = int(self.allocator.alloc_page())

    def eptp(self, *, ad: bool = False) -> int:
        """EPTP (SDM 25.6.11): WB, page-walk length 4, bit 6 for A/D flags."""
        return self.pml4 | VMX_EPTP_MT_WB | VMX_EPTP_PWL_4 | (VMX_EPTP_AD_ENABLE_BIT if ad else 0)

    def map(self, gpa: int, hpa: int, size: int = KIB4, perms: int = 0b111, memtype: int = 6) -> int:
        """Map ``size`` bytes at ``gpa`` to ``hpa``; missing tables are created with RWX
        entries. Returns the address of the leaf entry."""
        leaf_shift = _LEAF_SHIFT[size]
        assert gpa % size == 0 and hpa % size == 0
        table = self.pml4
        shift = 39
        while shift > leaf_shift:
            address = table + ((gpa >> shift) & 0x1FF) * 8
            entry = self.memory.read64(address)
            if not entry & VMX_EPT_RWX_MASK:
                entry = int(self.allocator.alloc_page()) | VMX_EPT_RWX_MASK
                self.memory.write64(address, entry)
            table = entry & _ADDRESS_MASK
            shift -= 9
        address = table + ((gpa >> shift) & 0x1FF) * 8
        entry = hpa | perms | memtype << VMX_EPT_MT_SHIFT
        if size != KIB4:
            entry |= VMX_EPT_LARGE_PAGE_BIT
        self.memory.write64(address, entry)
        return address

    def entry_address(self, gpa: int, level: int) -> int:
        """Address of the entry for ``gpa`` at ``level`` (4 = PML4E ... 1 = PTE); the tables
        above it must exist."""
        table = self.pml4
        for shift in (39, 30, 21, 12)[: 5 - level]:
            address = table + ((gpa >> shift) & 0x1FF) * 8
            table = self.memory.read64(address) & _ADDRESS_MASK
        return address

    def entry(self, gpa: int, level: int) -> int:
        return self.memory.read64(self.entry_address(gpa, level))

    def set_entry(self, gpa: int, level: int, value: int) -> None:
        self.memory.write64(self.entry_address(gpa, level), value)

    def update_entry(self, gpa: int, level: int, *, set_bits: int = 0, clear_bits: int = 0) -> None:
        self.set_entry(gpa, level, (self.entry(gpa, level) & ~clear_bits) | set_bits)
