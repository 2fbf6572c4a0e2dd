"""The I/O and MMIO buses (KVM's kvm_io_bus) and interrupt lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmx.kvm.devices.bus import (
    BusAccessError,
    BusConflictError,
    IoBus,
    IrqLine,
    MmioBus,
    UnknownDeviceError,
    read_bytewise,
    write_bytewise,
)


class PortRecorder:
    """A port device that records accesses and reads a constant wider than any access."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []

    def io_read(self, port: int, size: int) -> int:
        self.log.append(("r", port, size, 0))
        return 0x1122334455667788

    def io_write(self, port: int, size: int, value: int) -> None:
        self.log.append(("w", port, size, value))


class MmioRecorder:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int]] = []

    def mmio_read(self, address: int, size: int) -> int:
        self.log.append(("r", address, size, 0))
        return 0x1122334455667788

    def mmio_write(self, address: int, size: int, value: int) -> None:
        self.log.append(("w", address, size, value))


def test_unclaimed_port_goes_to_the_user() -> None:
    """Like KVM_EXIT_IO: no device, no value; the caller reports the access."""
    bus = IoBus()
    assert bus.read(0x80, 1) is None
    assert bus.write(0x80, 1, 0x12) is False
    assert bus.find(0x80) is None


@pytest.mark.parametrize(
    ("port", "claimed"),
    [(0x3F7, False), (0x3F8, True), (0x3FF, True), (0x400, False)],
)
def test_range_bounds(port: int, claimed: bool) -> None:
    bus = IoBus()
    dev = PortRecorder()
    bus.register(0x3F8, 8, dev, "com1")
    assert (bus.find(port) is not None) is claimed
    assert bus.write(port, 1, 0xAB) is claimed


def test_access_goes_whole_to_the_device_of_its_first_port() -> None:
    bus = IoBus()
    dev = PortRecorder()
    bus.register(0x20, 2, dev, "pic")
    assert bus.read(0x21, 4) == 0x55667788  # truncated to the access size
    assert bus.write(0x20, 2, 0x1_2345)
    assert dev.log == [("r", 0x21, 4, 0), ("w", 0x20, 2, 0x2345)]


@pytest.mark.parametrize(
    ("base", "length"),
    [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3FA, 2), (0x3F0, 0x20)],
)
def test_overlap_is_refused(base: int, length: int) -> None:
    bus = IoBus()
    bus.register(0x3F8, 8, PortRecorder(), "com1")
    with pytest.raises(BusConflictError, match="com1"):
        bus.register(base, length, PortRecorder(), "other")


def test_adjacent_ranges_are_fine_and_listed_in_order() -> None:
    bus = IoBus()
    a, b, c = PortRecorder(), PortRecorder(), PortRecorder()
    bus.register(0x400, 1, c, "c")
    bus.register(0x3F8, 8, a, "a")
    bus.register(0x3F0, 8, b, "b")
    assert [(e.base, e.length, e.name) for e in bus.devices()] == [
        (0x3F0, 8, "b"),
        (0x3F8, 8, "a"),
        (0x400, 1, "c"),
    ]
    assert bus.find(0x3F7) == (b, "b")


def test_unregister_removes_every_range_of_the_device() -> None:
    bus = IoBus()
    dev = PortRecorder()
    bus.register_all(dev, [(0x20, 2, "master"), (0xA0, 2, "slave")])
    assert bus.unregister(dev) == 2
    assert bus.devices() == []
    with pytest.raises(UnknownDeviceError):
        bus.unregister(dev)


@pytest.mark.parametrize(
    ("port", "size"), [(0x10000, 1), (-1, 1), (0x80, 3), (0x80, 8), (0x80, 0)]
)
def test_inexpressible_io_access(port: int, size: int) -> None:
    with pytest.raises(BusAccessError):
        IoBus().read(port, size)


@pytest.mark.parametrize(("base", "length"), [(0xFFFF, 2), (0x10, 0), (-1, 1)])
def test_inexpressible_range(base: int, length: int) -> None:
    with pytest.raises(BusAccessError):
        IoBus().register(base, length, PortRecorder(), "x")


def test_mmio_bus_sizes_and_ranges() -> None:
    bus = MmioBus()
    dev = MmioRecorder()
    bus.register(0xFEC0_0000, 0x1000, dev, "ioapic")
    assert bus.read(0xFEC0_0010, 8) == 0x1122334455667788
    assert bus.read(0xFEC0_0010, 2) == 0x7788
    assert bus.write(0xFEC0_0FFF, 1, 0x1FF)
    assert bus.read(0xFEC0_1000, 4) is None
    assert dev.log[-1] == ("w", 0xFEC0_0FFF, 1, 0xFF)
    with pytest.raises(BusConflictError):
        bus.register(0xFEBF_F000, 0x1001, MmioRecorder(), "x")
    for size in (0, 65):
        with pytest.raises(BusAccessError):
            bus.read(0xFEC0_0000, size)


@pytest.mark.parametrize(
    ("address", "size", "cycles"),
    [
        (0x1003, 5, [(0x1003, 1), (0x1004, 4)]),
        (0x1000, 3, [(0x1000, 2), (0x1002, 1)]),
        (0x1001, 3, [(0x1001, 1), (0x1002, 2)]),
        (0x1005, 7, [(0x1005, 1), (0x1006, 2), (0x1008, 4)]),
        (0x1000, 16, [(0x1000, 8), (0x1008, 8)]),
    ],
)
def test_mmio_access_of_no_bus_size_is_split_into_aligned_cycles(address: int, size: int, cycles: list[tuple[int, int]]) -> None:
    """The 3- and 5-byte halves of an access split at a page or RAM/MMIO boundary (and 16-byte
    vector accesses) reach devices as naturally aligned 1/2/4/8-byte cycles, low address first,
    as QEMU's softmmu issues them (accel/tcg/cputlb.c do_ld_mmio_beN / do_st_mmio_leN)."""
    bus = MmioBus()
    dev = MmioRecorder()
    bus.register(0x1000, 0x1000, dev, "dev")
    assert bus.read(address, size) is not None
    assert bus.write(address, size, int.from_bytes(bytes(range(1, size + 1)), "little"))
    reads = [(a, n) for kind, a, n, _ in dev.log if kind == "r"]
    writes = [(a, n, v) for kind, a, n, v in dev.log if kind == "w"]
    assert reads == cycles
    assert [(a, n) for a, n, _ in writes] == cycles
    assert b"".join(v.to_bytes(n, "little") for _, n, v in writes) == bytes(range(1, size + 1))


def test_split_mmio_access_half_on_nothing_reads_ones_and_drops_the_write() -> None:
    """A split access whose other half has no device: that half reads all ones (the bus floats
    high, QEMU's unassigned_mem_ops) and its write is dropped; an access with no device at all
    still goes to the user (None / False: KVM_EXIT_MMIO)."""
    bus = MmioBus()
    dev = MmioRecorder()
    bus.register(0x2000, 0x1000, dev, "dev")
    assert bus.read(0x1FFD, 5) == 0xFFFFFF | (0x7788 << 24)  # 3 bytes of nothing, 2 of the device
    assert bus.write(0x1FFD, 5, 0xAABBCCDDEE)
    assert dev.log[-1] == ("w", 0x2000, 2, 0xAABB)
    assert bus.read(0x0FFD, 5) is None and bus.write(0x0FFD, 5, 0) is False


@given(
    st.lists(st.tuples(st.integers(0, 0xFF), st.integers(1, 8)), max_size=12),
    st.integers(0, 0x107),
)
def test_find_agrees_with_a_naive_port_table(ranges: list[tuple[int, int]], probe: int) -> None:
    """Property: whatever registrations succeed, find() answers like a dict of ports."""
    bus = IoBus()
    table: dict[int, str] = {}
    for i, (base, length) in enumerate(ranges):
        name = f"d{i}"
        ports = range(base, base + length)
        if any(p in table for p in ports):
            with pytest.raises(BusConflictError):
                bus.register(base, length, PortRecorder(), name)
        else:
            bus.register(base, length, PortRecorder(), name)
            table.update(dict.fromkeys(ports, name))
    found = bus.find(probe)
    assert (found[1] if found else None) == table.get(probe)


def test_irq_line_passes_on_changes_only() -> None:
    calls: list[tuple[int, bool]] = []
    line = IrqLine(4, lambda irq, level: calls.append((irq, level)))
    line.raise_()
    line.raise_()
    line.lower()
    line.lower()
    line.pulse()
    assert calls == [(4, True), (4, False), (4, True), (4, False)]
    assert not line.level


def test_bytewise_split_is_little_endian() -> None:
    seen: list[tuple[int, int]] = []
    write_bytewise(lambda port, value: seen.append((port, value)), 0x20, 2, 0xABCD)
    assert seen == [(0x20, 0xCD), (0x21, 0xAB)]
    assert read_bytewise(lambda port: port & 0xFF, 0x40, 4) == 0x43424140
