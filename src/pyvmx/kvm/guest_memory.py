"""Guest-linear memory as the hypervisor reaches it: through the guest's own page tables
(``kvm_mmu_gva_to_gpa_*()``, ``kvm_read_guest_virt()``; SDM ch. 4) and then the memslots
(:class:`pyvmx.kvm.mmu.guest_memory.GuestMemory`, kvm_read_guest()). The hypervisor never reads
guest memory through EPT.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmx.kvm.mmu.guest_memory import GuestMemory, GuestMemoryError, GuestPhysicalView
from pyvmx.vmx.paging import Access, GuestTranslation, translate_linear

PAGE_SIZE = 4096

__all__ = ["GuestMemory", "GuestMemoryError", "PagingState", "read_linear", "translate", "write_linear"]


@dataclass(frozen=True)
class PagingState:
    """The guest registers a linear-address walk needs (SDM 4.1.1, 4.6)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    cpl: int
    rflags_ac: bool = False
    maxphyaddr: int = 46


def translate(memory: GuestMemory, linear: int, access: Access, state: PagingState) -> GuestTranslation:
    """The guest's walk, with its accessed/dirty updates; raises
    :class:`pyvmx.vmx.faults.X86Fault` (#PF with the error code the processor would give) or
    :class:`GuestMemoryError` (a paging structure outside RAM)."""
    return translate_linear(
        linear, access, state.cpl, cr0=state.cr0, cr3=state.cr3, cr4=state.cr4, efer=state.efer,
        memory=GuestPhysicalView(memory), ac=state.rflags_ac, maxphyaddr=state.maxphyaddr,
    )


def read_linear(memory: GuestMemory, linear: int, size: int, state: PagingState) -> bytes:
    out = bytearray()
    while size:
        n = min(size, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
        out += memory.read(translate(memory, linear, Access.READ, state).gpa, n)
        linear += n
        size -= n
    return bytes(out)


def write_linear(memory: GuestMemory, linear: int, data: bytes, state: PagingState) -> None:
    offset = 0
    while offset < len(data):
        n = min(len(data) - offset, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
        memory.write(translate(memory, linear, Access.WRITE, state).gpa, data[offset : offset + n])
        linear += n
        offset += n
