"""The KVM-style MMU: TDP (EPT) page tables built on demand, MMIO emulation, dirty logging and
asynchronous page faults -- Linux's arch/x86/kvm/mmu/ (mmu.c, tdp_mmu.c, spte.c), the MMIO
part of arch/x86/kvm/emulate.c and x86.c, and virt/kvm/async_pf.c.

The MMU knows nothing of VMX beyond EPT entry bits: the hypervisor hands it the EPT-violation
error code (:func:`ept_violation_error_code`) and the guest-physical address, and installs
:attr:`TdpMmu.eptp` in the VMCS.

Modules: :mod:`.spte` (entry bits, MMIO markers), :mod:`.page_fault` (the fault record, RET_PF_*,
the error code), :mod:`.tdp_mmu` (:class:`TdpMmu`), :mod:`.emulate` (the MMIO instruction
emulator), :mod:`.guest_memory` (kvm_read_guest/kvm_write_guest), :mod:`.async_pf`.
"""

from pyvmx.kvm.mmu.async_pf import ApfEvent, ApfEventKind, ApfVcpuState, AsyncPf
from pyvmx.kvm.mmu.emulate import EmulationOutcome, EmulationResult, EmulatorContext, MmioEmulator, MmioExit
from pyvmx.kvm.mmu.guest_memory import GuestMemory, GuestMemoryError
from pyvmx.kvm.mmu.page_fault import AsyncPfHook, KvmPageFault, PageFaultOutcome, RetPf, ept_violation_error_code
from pyvmx.kvm.mmu.tdp_mmu import STAT_NAMES, MappedLeaf, TdpMmu

__all__ = [
    "STAT_NAMES",
    "ApfEvent",
    "ApfEventKind",
    "ApfVcpuState",
    "AsyncPf",
    "AsyncPfHook",
    "EmulationOutcome",
    "EmulationResult",
    "EmulatorContext",
    "GuestMemory",
    "GuestMemoryError",
    "KvmPageFault",
    "MappedLeaf",
    "MmioEmulator",
    "MmioExit",
    "PageFaultOutcome",
    "RetPf",
    "TdpMmu",
    "ept_violation_error_code",
]
