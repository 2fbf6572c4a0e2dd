"""fw_cfg (QEMU docs/specs/fw_cfg.rst), the MC146818A CMOS/RTC and port 0x92 (QEMU port92.c)."""

from __future__ import annotations

import struct

from pyvmx.kvm.devices.cmos import Cmos
from pyvmx.kvm.devices.fw_cfg import FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FwCfg
from pyvmx.kvm.devices.port92 import Port92


def _fw_read(dev: FwCfg, key: int, n: int) -> bytes:
    dev.io_write(0x510, 2, key)
    return bytes(dev.io_read(0x511, 1) for _ in range(n))


def test_fw_cfg_items_read_bytewise_from_the_selected_key_fw_cfg_rst() -> None:
    dev = FwCfg(ram_size=128 << 20, cpus=3)
    assert _fw_read(dev, 0, 4) == b"QEMU"
    assert struct.unpack("<Q", _fw_read(dev, FW_CFG_RAM_SIZE, 8))[0] == 128 << 20
    assert struct.unpack("<H", _fw_read(dev, FW_CFG_NB_CPUS, 2))[0] == 3


def test_fw_cfg_reads_past_the_end_or_of_an_unknown_key_are_zero_fw_cfg_rst() -> None:
    dev = FwCfg(ram_size=1 << 20, cpus=1)
    assert _fw_read(dev, 0, 6) == b"QEMU\0\0"
    assert _fw_read(dev, 0x11, 8) == bytes(8)


def test_fw_cfg_selector_write_rewinds_the_offset_fw_cfg_rst() -> None:
    dev = FwCfg()
    _fw_read(dev, 0, 2)
    assert _fw_read(dev, 0, 4) == b"QEMU"


def test_cmos_time_is_bcd_24h_by_default_and_binary_with_dm_mc146818a() -> None:
    now = [3725 * 1000]  # 1 h 2 min 5 s of guest time at 1000 ticks/s
    cmos = Cmos(lambda: now[0], 1000)
    def rd(i: int) -> int:
        cmos.io_write(0x70, 1, i)
        return cmos.io_read(0x71, 1)
    assert (rd(4), rd(2), rd(0)) == (0x01, 0x02, 0x05)
    assert (rd(9), rd(8), rd(7)) == (0x00, 0x01, 0x01)  # 2000-01-01
    cmos.io_write(0x70, 1, 0x0B)
    cmos.io_write(0x71, 1, 0x06)  # DM = binary, 24 h
    assert rd(0) == 5 and rd(2) == 2
    assert rd(0x0D) == 0x80  # register D: VRT
    assert rd(0x0A) & 0x80 == 0  # UIP never set when sampled


def test_cmos_index_bit7_is_the_nmi_mask_not_part_of_the_index_mc146818a() -> None:
    cmos = Cmos(lambda: 0, 1)
    cmos.io_write(0x70, 1, 0x80 | 0x40)
    cmos.io_write(0x71, 1, 0x5A)
    cmos.io_write(0x70, 1, 0x40)
    assert cmos.io_read(0x71, 1) == 0x5A and cmos.nmi_masked is False


def test_cmos_memory_bytes_as_qemu_pc_cmos_init() -> None:
    cmos = Cmos(lambda: 0, 1)
    cmos.describe(ram_size=128 << 20, cpus=2)
    assert int.from_bytes(cmos.ram[0x34:0x36], "little") == (112 << 20) // 0x10000
    assert int.from_bytes(cmos.ram[0x30:0x32], "little") == 0xFFFF  # capped at 64 MiB
    assert cmos.ram[0x5F] == 1


def test_port92_a20_reads_back_and_bit0_requests_a_reset_port92_c() -> None:
    resets: list[int] = []
    port = Port92(lambda: resets.append(1))
    assert port.io_read(0x92, 1) & 2
    port.io_write(0x92, 1, 0x03)
    assert resets == [1] and port.io_read(0x92, 1) == 0x02
