"""Device models of the KVM-style hypervisor: plain state machines driven by port accesses
and by virtual time, knowing nothing of VMX or the CPU engine.

* :mod:`.bus` -- the I/O port and MMIO buses, and :class:`IrqLine`.
* :mod:`.serial` -- a 16550A UART (PC16550D datasheet).
* :mod:`.pic` -- the PC's cascaded 8259A pair and the ELCR.
* :mod:`.pit` -- the 8254 PIT and port 0x61.
* :mod:`.debug_exit` -- the exit-code port.
* :mod:`.pc_testdev` -- QEMU's pc-testdev, which kvm-unit-tests use.
"""

from pyvmx.kvm.devices.bus import (
    BusAccessError,
    BusConflictError,
    BusEntry,
    IoBus,
    IrqLine,
    MmioBus,
    MmioDevice,
    PortIoDevice,
    UnknownDeviceError,
)
from pyvmx.kvm.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from pyvmx.kvm.devices.pc_testdev import PcTestdev
from pyvmx.kvm.devices.pic import I8259, InvalidIrqError, Pic
from pyvmx.kvm.devices.pit import PIT_HZ, ChannelInfo, ClockError, Pit
from pyvmx.kvm.devices.serial import COM1_BASE, COM1_IRQ, Serial16550A

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "DEBUG_EXIT_PORT",
    "I8259",
    "PIT_HZ",
    "BusAccessError",
    "BusConflictError",
    "BusEntry",
    "ChannelInfo",
    "ClockError",
    "DebugExit",
    "InvalidIrqError",
    "IoBus",
    "IrqLine",
    "MmioBus",
    "MmioDevice",
    "PcTestdev",
    "Pic",
    "Pit",
    "PortIoDevice",
    "Serial16550A",
    "UnknownDeviceError",
]
