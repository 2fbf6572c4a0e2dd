"""What the hypervisor's own work costs in guest time -- the one place these charges live.

Guest time is the physical CPU's TSC (retired instructions, plus time idle or otherwise spent
without retiring any). Work the host does for a guest in VMX root operation takes time too: on
real hardware the TSC runs on while KVM handles an exit. Charging it keeps every run bounded in
guest time: no chain of exits handled in the kernel, and no string instruction the hypervisor
emulates element by element, can hold the clock still while the host works for ever. (The
processor's own VM-exit/VM-entry latency is the CPU profile's ``vmexit_tsc_cost``, charged by
the CPU engine: 1,200 ticks in the default profile; the bare-machine sandbox sets it to 0 so that
its timers count instructions exactly.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvmx.kvm.kvm import PhysicalCpu

EXIT_HANDLING_TSC = 1  # each VM exit the hypervisor handles (vcpu_enter_guest() round trip)
STRING_IO_ELEMENT_TSC = 1  # each INS/OUTS element the hypervisor moves (one REP iteration)
EMULATED_ACCESS_TSC = 1  # each MMIO access the emulator completes with the VMM's data


def charge(pcpu: PhysicalCpu, ticks: int) -> None:
    """Let ``ticks`` of guest time pass on ``pcpu`` for the host's work."""
    if ticks > 0:
        pcpu.processor.advance_tsc(ticks)
