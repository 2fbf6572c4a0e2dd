"""The PC devices of a VM, wired the way a PC wires them and KVM's in-kernel irqchip and PIT
(KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2) plus a VMM's serial port do:

* the 8259A master/slave pair at 0x20/0x21, 0xA0/0xA1 and the ELCR at 0x4D0/0x4D1; its INTR
  output goes to the VM's first vCPU (the BSP, as LINT0 in ExtINT mode would take it);
* the 8254 PIT at 0x40-0x43 and port 0x61; channel 0's OUT drives IRQ 0. The PIT is clocked by
  the VM's clock -- guest TSC ticks at ``tsc_hz`` -- so its ticks fall in guest time;
* a 16550A UART at 0x3F8, IRQ 4 (COM1); what the guest transmits is collected in
  :attr:`PcPlatform.serial_output`;
* the debug-exit port at 0xF4: a write ends ``run()`` with ``DebugExit(code)``;
* QEMU's pc-testdev (ports 0xE0-0xEB, 0x2000-0x2017, MMIO at 0xFF000000), which kvm-unit-tests
  use: its interrupt lines drive the PIC's inputs (there is no IOAPIC: lines 2 and 16-23 go
  nowhere), its page flush drops the page's EPT mapping (``flush_page``);
* what QEMU's PC gives a kernel it boots (``-kernel``), added by :meth:`PcPlatform.add_firmware`
  with the RAM size and CPU count they report: fw_cfg at 0x510/0x511, the CMOS/RTC at 0x70/0x71
  and port 0x92. Without them those ports are unclaimed (exits to the VMM's user).

Nothing here knows VMX: the vCPU asks :meth:`PcPlatform.next_event` when to arm the VMX-preemption
timer, calls :meth:`PcPlatform.advance` before each VM entry to deliver the PIT's edges to the
PIC, and asks the PIC for INTR / INTA (:meth:`Pic.output`, :meth:`Pic.acknowledge`) to inject the
interrupt through VM-entry event injection (SDM 27.6).
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmx.kvm.devices.bus import IoBus, IrqLine, MmioBus
from pyvmx.kvm.devices.cmos import Cmos
from pyvmx.kvm.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from pyvmx.kvm.devices.fw_cfg import FwCfg
from pyvmx.kvm.devices.pc_testdev import PcTestdev
from pyvmx.kvm.devices.pic import CASCADE_IRQ, NR_PIC_IRQS, Pic
from pyvmx.kvm.devices.pit import PIT_IRQ, Pit
from pyvmx.kvm.devices.port92 import Port92
from pyvmx.kvm.devices.serial import COM1_BASE, COM1_IRQ, Serial16550A


class PcPlatform:
    """The devices of one VM on its I/O bus (see the module docstring)."""

    def __init__(
        self,
        io_bus: IoBus,
        clock: Callable[[], int],
        tsc_hz: int,
        *,
        debug_exit_port: int = DEBUG_EXIT_PORT,
        mmio_bus: MmioBus | None = None,
        flush_page: Callable[[int], None] | None = None,
    ) -> None:
        self.pic = Pic()
        self.pit = Pit(tsc_hz, clock, IrqLine(PIT_IRQ, self.pic.set_irq))
        self.serial_output = bytearray()
        self.serial = Serial16550A(COM1_BASE, IrqLine(COM1_IRQ, self.pic.set_irq), self.serial_output.extend)
        self.exit_codes: list[int] = []
        self.debug_exit = DebugExit(debug_exit_port, self.exit_codes.append)
        self.testdev = PcTestdev(self._testdev_irq, flush_page)
        self.io_bus = io_bus
        self.clock = clock
        self.tsc_hz = tsc_hz
        self.fw_cfg: FwCfg | None = None
        self.cmos: Cmos | None = None
        self.port92: Port92 | None = None
        for device in (self.pic, self.pit, self.serial, self.debug_exit, self.testdev):
            io_bus.register_all(device, device.io_ranges)
        if mmio_bus is not None:
            for base, length, name in self.testdev.mmio_ranges:
                mmio_bus.register(base, length, self.testdev, name)

    def _testdev_irq(self, line: int, level: bool) -> None:
        """pc-testdev's ISA lines: to the PIC input of the same number, where there is one."""
        if line < NR_PIC_IRQS and line != CASCADE_IRQ:
            self.pic.set_irq(line, level)

    def add_firmware(self, *, ram_size: int, cpus: int) -> None:
        """fw_cfg, the CMOS/RTC and port 0x92, describing ``ram_size`` bytes and ``cpus`` CPUs."""
        if self.fw_cfg is not None:
            raise ValueError("the firmware devices are already present")
        self.fw_cfg = FwCfg(ram_size=ram_size, cpus=cpus)
        self.cmos = Cmos(self.clock, self.tsc_hz)
        self.cmos.describe(ram_size=ram_size, cpus=cpus)
        self.port92 = Port92()
        for device in (self.fw_cfg, self.cmos, self.port92):
            self.io_bus.register_all(device, device.io_ranges)

    def advance(self, now: int) -> None:
        """Deliver the PIT's IRQ 0 edges that fell by VM time ``now`` to the PIC."""
        self.pit.advance(now)

    def next_event(self, now: int) -> int | None:
        """The VM time of the next interrupt a device will raise by itself, or None."""
        return self.pit.next_event(now)

    def next_wakeup(self, now: int) -> int | None:
        """Like :meth:`next_event`, but None when that interrupt cannot reach the CPU: IRQ 0
        masked in the master PIC's IMR (a halted vCPU waiting for it would wait forever)."""
        if self.pic.master.imr & (1 << PIT_IRQ):
            return None
        return self.pit.next_event(now)

    def take_exit_code(self) -> int | None:
        """The code the guest wrote to the debug-exit port since the last call, if any."""
        return self.exit_codes.pop(0) if self.exit_codes else None

    @property
    def serial_text(self) -> str:
        return self.serial_output.decode("latin-1")
