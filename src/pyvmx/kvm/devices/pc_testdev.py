"""QEMU's ``pc-testdev`` (hw/misc/pc-testdev.c), the ISA device kvm-unit-tests' x86 tests expect
next to the debug-exit port (their ``x86/run`` passes ``-device pc-testdev``):

* ports 0xE0-0xE3: a 32-bit scratch register; an access of n bytes at port 0xE0 + k reads or
  writes its bytes k .. k+n-1 (``test_ioport_read``/``_write``), so what ``rep outsb`` sends
  ends up in byte 0 (emulator.c ``test_stringio``, realmode.c's I/O tests);
* ports 0xE8-0xEB: the same register through a byte-wide window (QEMU splits wider accesses);
* ports 0xE4-0xE7: a 4-byte write of a guest-physical address "flushes" its page -- QEMU
  mprotect()s the page's host mapping, whose MMU notifier makes KVM drop the page's EPT mapping,
  so the next guest access faults it in again (eventinj.c uses it to get EPT violations during
  event delivery).  Here ``flush_page(gpa)`` is called; other sizes are ignored (the region's
  ``valid`` sizes are 4 only);
* ports 0x2000-0x2017: a 1-byte write of v to 0x2000 + n drives ISA interrupt line n to
  (v != 0) (``test_irq_line``; lib/x86/apic.c ``set_irq_line()``, ioapic.c);
* MMIO 0xFF000000-0xFF00FFFF: 64 KiB of device memory read and written as plain bytes
  (``test_iomem_read``/``_write``; emulator.c's MMIO tests).

Reads of the flush and IRQ ports, which have no read callback in QEMU, return 0 here.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmx.kvm.devices.bus import read_bytewise, write_bytewise

PC_TESTDEV_IOPORT = 0xE0
PC_TESTDEV_FLUSH_PAGE = 0xE4
PC_TESTDEV_IOPORT_BYTE = 0xE8
PC_TESTDEV_IRQ_LINE = 0x2000
PC_TESTDEV_NR_IRQ_LINES = 24
PC_TESTDEV_IOMEM = 0xFF000000
PC_TESTDEV_IOMEM_LEN = 0x10000
PAGE_MASK = ~0xFFF


class PcTestdev:
    """The device; ``set_irq(line, level)`` drives ISA interrupt lines, ``flush_page(gpa)`` drops
    the mapping of a guest page."""

    def __init__(
        self,
        set_irq: Callable[[int, bool], None] | None = None,
        flush_page: Callable[[int], None] | None = None,
    ) -> None:
        self.set_irq = set_irq
        self.flush_page = flush_page
        self.ioport_data = 0
        self.iomem = bytearray(PC_TESTDEV_IOMEM_LEN)
        self.flushed: list[int] = []  # the pages flush_page was asked for, in order

    @property
    def io_ranges(self) -> tuple[tuple[int, int, str], ...]:
        return (
            (PC_TESTDEV_IOPORT, 4, "pc-testdev-ioport"),
            (PC_TESTDEV_FLUSH_PAGE, 4, "pc-testdev-flush-page"),
            (PC_TESTDEV_IOPORT_BYTE, 4, "pc-testdev-ioport-byte"),
            (PC_TESTDEV_IRQ_LINE, PC_TESTDEV_NR_IRQ_LINES, "pc-testdev-irq-line"),
        )

    @property
    def mmio_ranges(self) -> tuple[tuple[int, int, str], ...]:
        return ((PC_TESTDEV_IOMEM, PC_TESTDEV_IOMEM_LEN, "pc-testdev-iomem"),)

    # --- the scratch register -----------------------------------------------------------------
    def _register_read(self, offset: int, size: int) -> int:
        shift = (offset & 3) * 8
        return (self.ioport_data >> shift) & ((1 << (8 * size)) - 1)

    def _register_write(self, offset: int, size: int, value: int) -> None:
        shift = (offset & 3) * 8
        mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFFFFFF
        self.ioport_data = (self.ioport_data & ~mask) | ((value << shift) & mask)

    def _byte_window(self, port: int) -> bool:
        return PC_TESTDEV_IOPORT_BYTE <= port < PC_TESTDEV_IOPORT_BYTE + 4

    # --- PortIoDevice ----------------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        if PC_TESTDEV_IOPORT <= port < PC_TESTDEV_IOPORT + 4:
            return self._register_read(port, size)
        if PC_TESTDEV_IOPORT_BYTE <= port < PC_TESTDEV_IOPORT_BYTE + 4:
            return read_bytewise(lambda p: self._register_read(p, 1) if self._byte_window(p) else 0xFF, port, size)
        return 0

    def io_write(self, port: int, size: int, value: int) -> None:
        if PC_TESTDEV_IOPORT <= port < PC_TESTDEV_IOPORT + 4:
            self._register_write(port, size, value)
        elif PC_TESTDEV_IOPORT_BYTE <= port < PC_TESTDEV_IOPORT_BYTE + 4:
            write_bytewise(lambda p, v: self._register_write(p, 1, v) if self._byte_window(p) else None, port, size, value)
        elif PC_TESTDEV_FLUSH_PAGE <= port < PC_TESTDEV_FLUSH_PAGE + 4:
            if size == 4 and port == PC_TESTDEV_FLUSH_PAGE:
                page = value & PAGE_MASK
                self.flushed.append(page)
                if self.flush_page is not None:
                    self.flush_page(page)
        elif PC_TESTDEV_IRQ_LINE <= port < PC_TESTDEV_IRQ_LINE + PC_TESTDEV_NR_IRQ_LINES:
            if size == 1 and self.set_irq is not None:
                self.set_irq(port - PC_TESTDEV_IRQ_LINE, value != 0)

    # --- MmioDevice --------------------------------------------------------------------------------
    def mmio_read(self, address: int, size: int) -> int:
        offset = address - PC_TESTDEV_IOMEM
        return int.from_bytes(self.iomem[offset : offset + size].ljust(size, b"\0"), "little")

    def mmio_write(self, address: int, size: int, value: int) -> None:
        offset = address - PC_TESTDEV_IOMEM
        data = value.to_bytes(size, "little")[: PC_TESTDEV_IOMEM_LEN - offset]
        self.iomem[offset : offset + len(data)] = data
