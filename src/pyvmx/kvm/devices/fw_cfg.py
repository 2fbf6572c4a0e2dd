"""QEMU's firmware configuration device, the I/O-port interface a PC guest sees (QEMU
docs/specs/fw_cfg.rst, hw/nvram/fw_cfg.c): a 16-bit selector register at port 0x510 and an 8-bit
data register at 0x511.

Writing a key to the selector selects an item and rewinds its read offset; each read of the data
port returns the item's next byte, 0 past its end or for a key that names no item. Items here are
the ones a PC guest reads first: the signature "QEMU" (key 0x00), the interface ID 1 -- the
traditional interface, no DMA -- (0x01), the RAM size (0x03, 64-bit little-endian), the number of
CPUs at boot (0x05, 16-bit) and the maximum (0x0F). Writes to the data port are ignored (QEMU has
ignored them since 2.4). The selector's bit 14 (write channel) and bit 15 (arch-local) are part of
the key.
"""

from __future__ import annotations

from pyvmx.kvm.devices.bus import read_bytewise

FW_CFG_IO_BASE = 0x510
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_ID_TRADITIONAL = 1


class FwCfg:
    def __init__(self, *, ram_size: int = 0, cpus: int = 1) -> None:
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: FW_CFG_ID_TRADITIONAL.to_bytes(4, "little"),
        }
        self.selector = 0
        self.offset = 0
        self.describe(ram_size=ram_size, cpus=cpus)

    def describe(self, *, ram_size: int, cpus: int) -> None:
        """The machine the items describe (QEMU's fw_cfg_arch_create / pc_memory_init)."""
        self.items[FW_CFG_RAM_SIZE] = ram_size.to_bytes(8, "little")
        self.items[FW_CFG_NB_CPUS] = cpus.to_bytes(2, "little")
        self.items[FW_CFG_MAX_CPUS] = cpus.to_bytes(2, "little")

    @property
    def io_ranges(self) -> tuple[tuple[int, int, str], ...]:
        return ((FW_CFG_IO_BASE, 2, "fw_cfg"),)

    def _read_data(self) -> int:
        item = self.items.get(self.selector, b"")
        value = item[self.offset] if self.offset < len(item) else 0
        self.offset += 1
        return value

    def io_read(self, port: int, size: int) -> int:
        if port == FW_CFG_IO_BASE:
            return 0  # the selector is write-only on the I/O interface
        return read_bytewise(lambda _p: self._read_data(), port, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == FW_CFG_IO_BASE and size >= 2:
            self.selector = value & 0xFFFF
            self.offset = 0
