"""A virtual machine: memslots over the VMM's memory, the MMU that maps them with EPT, the I/O
and MMIO buses with the PC devices, and the vCPUs (``struct kvm``; the KVM_CREATE_VM fd's ioctls).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvmx.kvm.devices.bus import IoBus, MmioBus
from pyvmx.kvm.mmu.guest_memory import GuestMemory, GuestMemoryError
from pyvmx.kvm.memslots import KVM_MEM_READONLY, Memslots
from pyvmx.kvm.mmu import TdpMmu
from pyvmx.kvm.platform import PcPlatform

if TYPE_CHECKING:
    from pyvmx.kvm.kvm import Kvm, PhysicalCpu
    from pyvmx.kvm.vcpu import Vcpu

KVM_MAX_VCPUS = 1024


class Vm:
    """One VM. Made by :meth:`Kvm.create_vm`."""

    def __init__(self, kvm: Kvm, vm_id: int, *, name: str = "", platform: bool = True) -> None:
        self.kvm = kvm
        self.id = vm_id
        self.name = name
        self.memslots = Memslots(max_gpa_bits=kvm.config.maxphyaddr)
        self.memory = GuestMemory(self.memslots, kvm.host_mm)
        self.mmu = TdpMmu(
            kvm.memory, kvm.allocator, self.memslots, kvm.host_mm, invept=self.flush_remote_tlbs,
            huge_pages=True, maxphyaddr=kvm.config.maxphyaddr,
        )
        self.io_bus = IoBus()
        self.mmio_bus = MmioBus()
        self.vcpus: list[Vcpu] = []
        # Guest time = host clock + tsc_offset; starts near 0 (kvm_synchronize_tsc(vcpu, 0)).
        self.tsc_offset = -kvm.host_clock()
        self._last_clock = 0
        self.running_on: PhysicalCpu | None = None
        self.hypercall_output = bytearray()
        self._next_slot = 0
        self._ram: list[tuple[int, int]] = []  # what add_ram() mapped, unmapped by close()
        self.platform: PcPlatform | None = None
        if platform:
            self.platform = PcPlatform(self.io_bus, self.clock, kvm.tsc_hz, mmio_bus=self.mmio_bus, flush_page=self.zap_guest_page)

    # --- time --------------------------------------------------------------------------------------
    def clock_at(self, host_time: int) -> int:
        """VM time (guest TSC ticks, before any per-vCPU adjustment) at a host time, never going
        backwards (kvmclock's monotonic guarantee across CPUs whose clocks differ slightly)."""
        t = host_time + self.tsc_offset
        if t < self._last_clock:
            t = self._last_clock
        self._last_clock = t
        return t

    def clock(self) -> int:
        """The VM's time now: from the CPU a vCPU of this VM is running on, else the last
        value seen. The PIT reads this."""
        if self.running_on is None:
            return self._last_clock
        return self.clock_at(self.running_on.clock())

    def host_time_of(self, vm_time: int) -> int:
        return vm_time - self.tsc_offset

    def run_timers(self, host_time: int) -> None:
        """Deliver device timer events due by ``host_time`` (the PIT's IRQ 0 edges)."""
        if self.platform is not None:
            self.platform.advance(self.clock_at(host_time))

    def next_timer_event(self, *, wakeup: bool = False) -> int | None:
        """Host time of the next device timer event, or None; with ``wakeup``, only an event
        whose interrupt can reach the CPU (what may end a HLT)."""
        if self.platform is None:
            return None
        now = self._last_clock
        event = self.platform.next_wakeup(now) if wakeup else self.platform.next_event(now)
        return None if event is None else self.host_time_of(event)

    def zap_guest_page(self, gpa: int) -> None:
        """Drop the EPT mapping of the page at ``gpa`` -- what KVM's MMU notifier does when the
        VMM changes the protection of the page's host mapping (kvm_unmap_gfn_range()); the
        next guest access faults it in again."""
        gfn = gpa >> 12
        self.mmu.zap_gfn_range(gfn, gfn + 1)

    def flush_remote_tlbs(self) -> None:
        """``kvm_flush_remote_tlbs()``: INVEPT (all contexts) on every CPU."""
        for pcpu in self.kvm.pcpus:
            pcpu.processor.invept(2, 0)

    # --- memory --------------------------------------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION (raises :class:`~pyvmx.kvm.memslots.MemslotError`)."""
        self.memslots.set_user_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        self._next_slot = max(self._next_slot, (slot & 0xFFFF) + 1)

    def add_ram(self, gpa: int, size: int, *, readonly: bool = False, huge: bool = True) -> int:
        """mmap ``size`` bytes in the VMM and make them guest RAM at ``gpa`` (a new slot);
        returns the host-virtual address."""
        hva = self.kvm.host_mm.mmap(size, huge=huge, name=f"{self.name} ram@{gpa:#x}")
        self.set_user_memory_region(self._next_slot, KVM_MEM_READONLY if readonly else 0, gpa, size, hva)
        self._ram.append((hva, size))
        return hva

    def write_guest(self, gpa: int, data: bytes | bytearray) -> None:
        """Write guest-physical memory (raises GuestMemoryError outside RAM)."""
        self.memory.write(gpa, data)

    def read_guest(self, gpa: int, size: int) -> bytes:
        return self.memory.read(gpa, size)

    def try_read_guest(self, gpa: int, size: int) -> bytes | None:
        try:
            return self.memory.read(gpa, size)
        except GuestMemoryError:
            return None

    # --- devices ----------------------------------------------------------------------------------------
    def set_irq(self, irq: int, level: bool) -> None:
        """KVM_IRQ_LINE: drive a PIC input."""
        if self.platform is None:
            raise RuntimeError("this VM has no interrupt controller (create_vm(platform=True))")
        self.platform.pic.set_irq(irq, level)

    @property
    def serial_output(self) -> bytes:
        return bytes(self.platform.serial_output) if self.platform is not None else b""

    # --- vCPUs -------------------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None, *, pcpu: int | None = None) -> Vcpu:
        """KVM_CREATE_VCPU: a vCPU in the reset state (real mode at F000:FFF0). ``pcpu``: the
        physical CPU ``run()`` uses (by default vCPU n runs on CPU n mod the CPU count)."""
        from pyvmx.kvm.vcpu import Vcpu

        vid = len(self.vcpus) if vcpu_id is None else vcpu_id
        if any(v.id == vid for v in self.vcpus):
            raise ValueError(f"vCPU {vid} already exists (EEXIST)")
        if len(self.vcpus) >= KVM_MAX_VCPUS:
            raise ValueError(f"at most {KVM_MAX_VCPUS} vCPUs (EINVAL)")
        home = self.kvm.pcpus[(vid if pcpu is None else pcpu) % len(self.kvm.pcpus)]
        vcpu = Vcpu(self, vid, home)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """``kvm_destroy_vm()``: free the vCPUs (VMCLEAR, their pages, their VPIDs), delete the
        memslots, tear the EPT tables down and unmap the RAM this VM mapped."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        for slot in list(self.memslots):
            self.memslots.set_user_memory_region(slot.slot, 0, 0, 0, 0)
        self.mmu.close()
        for hva, size in self._ram:
            self.kvm.host_mm.munmap(hva, size)
        self._ram.clear()
        if self in self.kvm.vms:
            self.kvm.vms.remove(self)

    @property
    def bsp(self) -> Vcpu | None:
        """The vCPU that takes the PIC's interrupts (the first one)."""
        return self.vcpus[0] if self.vcpus else None

    def __repr__(self) -> str:
        return f"Vm({self.name}, {len(self.vcpus)} vCPUs, {len(self.memslots)} memslots)"
