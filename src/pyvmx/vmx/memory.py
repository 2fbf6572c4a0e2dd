"""Simulated host-physical memory: one flat, zero-filled buffer.

The buffer is an anonymous mmap so that the CPU engine can map the very same bytes into the
emulator (no copies): VMCS regions, EPT tables, bitmaps and guest RAM all live here.

Writes made through this class (the hypervisor, device DMA, event delivery, emulated string
I/O) never pass through the CPU engine, so the engine cannot see them change code it has
translated: pages can be *watched*, and every write touching a watched page is reported to the
write observers (:mod:`pyvmx.engine.code_cache` watches the pages holding translated code).
Writes through :meth:`PhysicalMemory.view` are not reported (it serves VMCS regions).
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Callable, NewType

HostPhysAddr = NewType("HostPhysAddr", int)
"""A host-physical address (HPA) in :class:`PhysicalMemory`."""

PAGE_SIZE = 4096
PAGE_SHIFT = 12

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class PhysicalMemoryError(IndexError):
    """An access outside simulated physical memory; carries the bad address."""

    def __init__(self, address: int, size: int, limit: int) -> None:
        super().__init__(
            f"physical access of {size} bytes at {address:#x} is outside memory (size {limit:#x})"
        )
        self.address = address
        self.size = size


def page_aligned(address: int) -> bool:
    return address & (PAGE_SIZE - 1) == 0


WriteObserver = Callable[[int, int], None]
"""Called with (host-physical address, size) after a write that touched a watched page."""


class PhysicalMemory:
    """Host-physical memory of ``size`` bytes (a multiple of 4 KiB)."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"memory size must be a positive multiple of 4 KiB, not {size:#x}")
        self.size = size
        self._buf = mmap.mmap(-1, size)
        self._view = memoryview(self._buf)
        self._watched: set[int] = set()  # page frame numbers whose writes are reported
        self._observers: list[WriteObserver] = []
        # State the CPU engines over this memory share (pyvmx.engine.code_cache), kept here so
        # that it lives and dies with the memory.
        self.engine_state: dict[str, object] = {}

    # --- write watching --------------------------------------------------------------------------
    def add_write_observer(self, observer: WriteObserver) -> None:
        self._observers.append(observer)

    def watch_page(self, pfn: int) -> None:
        """Report writes to page frame ``pfn`` to the observers (until :meth:`unwatch_page`)."""
        self._watched.add(pfn)

    def unwatch_page(self, pfn: int) -> None:
        self._watched.discard(pfn)

    def _written(self, address: int, size: int) -> None:
        first = address >> PAGE_SHIFT
        last = (address + size - 1) >> PAGE_SHIFT if size > 1 else first
        watched = self._watched
        if first in watched or last in watched or (last - first > 1 and not watched.isdisjoint(range(first + 1, last))):
            for observer in list(self._observers):
                observer(address, size)

    @property
    def host_pointer(self) -> int:
        """Address of the buffer in this process, for mapping it into the CPU engine."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self._buf))

    def contains(self, address: int, size: int = 1) -> bool:
        return 0 <= address and address + size <= self.size

    def _check(self, address: int, size: int) -> None:
        if address < 0 or address + size > self.size:
            raise PhysicalMemoryError(address, size, self.size)

    def read(self, address: int, size: int) -> bytes:
        self._check(address, size)
        return self._buf[address : address + size]

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        self._check(address, len(data))
        self._buf[address : address + len(data)] = data
        if self._watched:
            self._written(address, len(data))

    def fill(self, address: int, size: int, byte: int) -> None:
        self._check(address, size)
        self._buf[address : address + size] = bytes([byte]) * size
        if self._watched:
            self._written(address, size)

    def view(self, address: int, size: int) -> memoryview:
        """A live, writable view of a range (no copy)."""
        self._check(address, size)
        return self._view[address : address + size]

    def read8(self, address: int) -> int:
        self._check(address, 1)
        return self._buf[address]

    def write8(self, address: int, value: int) -> None:
        self._check(address, 1)
        self._buf[address] = value & 0xFF
        if self._watched:
            self._written(address, 1)

    def read16(self, address: int) -> int:
        self._check(address, 2)
        return int(_U16.unpack_from(self._buf, address)[0])

    def write16(self, address: int, value: int) -> None:
        self._check(address, 2)
        _U16.pack_into(self._buf, address, value & 0xFFFF)
        if self._watched:
            self._written(address, 2)

    def read32(self, address: int) -> int:
        self._check(address, 4)
        return int(_U32.unpack_from(self._buf, address)[0])

    def write32(self, address: int, value: int) -> None:
        self._check(address, 4)
        _U32.pack_into(self._buf, address, value & 0xFFFFFFFF)
        if self._watched:
            self._written(address, 4)

    def read64(self, address: int) -> int:
        self._check(address, 8)
        return int(_U64.unpack_from(self._buf, address)[0])

    def write64(self, address: int, value: int) -> None:
        self._check(address, 8)
        _U64.pack_into(self._buf, address, value & 0xFFFFFFFFFFFFFFFF)
        if self._watched:
            self._written(address, 8)

    def test_bit(self, base: int, bit: int) -> bool:
        """Bit ``bit`` of the bitmap at ``base`` (I/O and MSR bitmaps are little-endian bit arrays)."""
        return bool(self.read8(base + (bit >> 3)) >> (bit & 7) & 1)

    def set_bit(self, base: int, bit: int, value: bool = True) -> None:
        byte = self.read8(base + (bit >> 3))
        mask = 1 << (bit & 7)
        self.write8(base + (bit >> 3), byte | mask if value else byte & ~mask)


class PageAllocator:
    """Hands out zeroed 4 KiB pages of physical memory, bottom-up, for VMCS regions, bitmaps
    and EPT tables -- like the kernel's __get_free_page for a hypervisor built on this model."""

    def __init__(self, memory: PhysicalMemory, start: int, end: int | None = None) -> None:
        if not page_aligned(start):
            raise ValueError(f"allocator start {start:#x} is not page aligned")
        self.memory = memory
        self._next = start
        self._end = memory.size if end is None else end
        self._free: list[int] = []

    def alloc_page(self, fill: int = 0) -> HostPhysAddr:
        if self._free:
            page = self._free.pop()
        else:
            if self._next + PAGE_SIZE > self._end:
                raise MemoryError(f"out of physical pages (limit {self._end:#x})")
            page = self._next
            self._next += PAGE_SIZE
        self.memory.fill(page, PAGE_SIZE, fill)
        return HostPhysAddr(page)

    def free_page(self, page: int) -> None:
        self._free.append(page)

    def alloc_contiguous(self, npages: int, align_pages: int = 1, fill: int = 0) -> HostPhysAddr | None:
        """A physically contiguous run of ``npages`` zeroed pages whose first page is aligned to
        ``align_pages`` pages (512 and 512 for a 2-MByte huge page), or None when no such run is
        free -- like alloc_pages() of a high order, which fails rather than waits.

        Freed pages are searched first; otherwise the run is cut from the untouched top, and the
        pages skipped to reach the alignment go to the free list, so none are lost."""
        if npages <= 0 or align_pages <= 0:
            raise ValueError(f"bad contiguous request: {npages} pages aligned to {align_pages}")
        run = npages * PAGE_SIZE
        align = align_pages * PAGE_SIZE
        start = self._free_run(npages, align)
        if start is not None:
            taken = set(range(start, start + run, PAGE_SIZE))
            self._free = [page for page in self._free if page not in taken]
        else:
            start = -(-self._next // align) * align
            if start + run > self._end:
                return None
            self._free.extend(range(self._next, start, PAGE_SIZE))
            self._next = start + run
        self.memory.fill(start, run, fill)
        return HostPhysAddr(start)

    def free_contiguous(self, start: int, npages: int) -> None:
        """Return a run from :meth:`alloc_contiguous` (or any ``npages`` pages from ``start``)."""
        self._free.extend(range(start, start + npages * PAGE_SIZE, PAGE_SIZE))

    def _free_run(self, npages: int, align: int) -> int | None:
        """The lowest aligned start of ``npages`` consecutive pages all on the free list."""
        if len(self._free) < npages:
            return None
        free = set(self._free)
        for start in sorted(page for page in free if page % align == 0):
            if all(start + i * PAGE_SIZE in free for i in range(1, npages)):
                return start
        return None
