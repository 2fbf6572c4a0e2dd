"""The debug-exit port: the written value is the exit code, unmangled."""

from __future__ import annotations

import pytest

from pyvmx.kvm.devices import DEBUG_EXIT_PORT, DebugExit, IoBus


@pytest.mark.parametrize(
    ("size", "value", "code"),
    [(1, 0x00, 0), (1, 0x2A, 0x2A), (2, 0xBEEF, 0xBEEF), (4, 0xDEADBEEF, 0xDEADBEEF)],
)
def test_write_records_the_code_and_calls_on_exit(size: int, value: int, code: int) -> None:
    """Unlike QEMU's isa-debug-exit, no (v << 1) | 1: the guest's value is the code."""
    codes: list[int] = []
    dev = DebugExit(on_exit=codes.append)
    bus = IoBus()
    bus.register_all(dev, dev.io_ranges)
    assert bus.write(DEBUG_EXIT_PORT, size, value)
    assert dev.code == code
    assert codes == [code]


def test_configurable_port_reads_zero() -> None:
    dev = DebugExit(port=0x501)
    bus = IoBus()
    bus.register_all(dev, dev.io_ranges)
    assert bus.read(0x501, 4) == 0
    assert bus.find(DEBUG_EXIT_PORT) is None
    assert dev.code is None
    bus.write(0x501, 1, 3)
    assert dev.code == 3
