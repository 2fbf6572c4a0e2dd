"""Guest memory as a debugger or tracer sees it: linear addresses through the guest's own page
tables (SDM ch. 4) and then EPT (SDM 29.3), read from the VMCS guest-state area -- without side
effects (no accessed/dirty flags written, no faults raised into the guest).

Works on anything that has ``read(VmcsField)`` for the VMCS and ``memory`` (the host-physical
:class:`~pyvmx.vmx.memory.PhysicalMemory`), e.g. a :class:`~pyvmx.guest.sandbox.VmxSandbox`.
"""

from __future__ import annotations

from typing import Protocol

from pyvmx.arch.controls import ProcBasedControls, SecondaryProcBasedControls, VmEntryControls
from pyvmx.arch.vmcs_fields import VmcsField as F
from pyvmx.arch.x86 import VMX_AR_DB_MASK, VMX_AR_L_MASK, Cr0, Efer
from pyvmx.vmx.ept import ept_lookup
from pyvmx.vmx.memory import PAGE_SIZE, PhysicalMemory, PhysicalMemoryError
from pyvmx.vmx.paging import Access, lookup_linear


class GuestMemoryError(LookupError):
    """A guest address with no translation (or outside memory); carries the address."""

    def __init__(self, address: int, what: str = "linear") -> None:
        super().__init__(f"guest-{what} address {address:#x} is not mapped")
        self.address = address


class GuestView(Protocol):
    """A vCPU seen from the host: its VMCS and the host-physical memory behind it."""

    memory: PhysicalMemory

    def read(self, field: F) -> int: ...


def guest_efer(v: GuestView) -> int:
    entry = v.read(F.VM_ENTRY_CONTROLS)
    if entry & VmEntryControls.LOAD_IA32_EFER:
        return v.read(F.GUEST_IA32_EFER)
    # SDM 27.3.2.1: without "load IA32_EFER", LMA and LME follow "IA-32e mode guest".
    return int(Efer.LMA | Efer.LME) if entry & VmEntryControls.IA32E_MODE else 0


def guest_bitness(v: GuestView) -> int:
    """16, 32 or 64: the guest's code size from CR0.PE, EFER.LMA and CS.L/CS.D (SDM 3.4.5)."""
    if not v.read(F.GUEST_CR0) & Cr0.PE:
        return 16
    ar = v.read(F.GUEST_CS_AR_BYTES)
    if guest_efer(v) & Efer.LMA and ar & VMX_AR_L_MASK:
        return 64
    return 32 if ar & VMX_AR_DB_MASK else 16


def rip_linear(v: GuestView) -> int:
    """The linear address of the next instruction: CS.base + RIP (the base is 0 in 64-bit mode)."""
    rip = v.read(F.GUEST_RIP)
    if guest_bitness(v) == 64:
        return rip
    return (v.read(F.GUEST_CS_BASE) + rip) & 0xFFFFFFFF


def ept_enabled(v: GuestView) -> bool:
    cpu_based = v.read(F.CPU_BASED_VM_EXEC_CONTROL)
    return bool(cpu_based & ProcBasedControls.ACTIVATE_SECONDARY_CONTROLS) and bool(
        v.read(F.SECONDARY_VM_EXEC_CONTROL) & SecondaryProcBasedControls.ENABLE_EPT
    )


class _GuestPhysical:
    """The page walker's view of guest-physical memory (read-only: lookups never write)."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem

    def _hpa(self, gpa: int) -> int:
        hpa = self.mem.gpa_to_hpa(gpa)
        if hpa is None:
            raise PhysicalMemoryError(gpa, 8, self.mem.memory.size)
        return hpa

    def read64(self, gpa: int, *, paging_structure: bool = True) -> int:
        return self.mem.memory.read64(self._hpa(gpa))

    def read32(self, gpa: int, *, paging_structure: bool = True) -> int:
        return self.mem.memory.read32(self._hpa(gpa))

    def write64(self, gpa: int, value: int, *, paging_structure: bool = True) -> None:
        raise AssertionError("side-effect-free lookups never write")

    def write32(self, gpa: int, value: int, *, paging_structure: bool = True) -> None:
        raise AssertionError("side-effect-free lookups never write")


class GuestMemory:
    """Linear and guest-physical access to one guest, for debuggers and traces."""

    def __init__(self, view: GuestView) -> None:
        self.view = view
        self.memory = view.memory

    def gpa_to_hpa(self, gpa: int) -> int | None:
        if not ept_enabled(self.view):
            return gpa if self.memory.contains(gpa) else None
        t = ept_lookup(self.memory, self.view.read(F.EPT_POINTER), gpa)
        if t is None:
            return None
        return t.hpa

    def linear_to_gpa(self, linear: int) -> int | None:
        v = self.view
        t = lookup_linear(
            linear, Access.READ, 0,
            cr0=v.read(F.GUEST_CR0), cr3=v.read(F.GUEST_CR3), cr4=v.read(F.GUEST_CR4), efer=guest_efer(v),
            memory=_GuestPhysical(self),
        )
        return None if t is None else t.gpa

    def linear_to_hpa(self, linear: int) -> int | None:
        gpa = self.linear_to_gpa(linear)
        return None if gpa is None else self.gpa_to_hpa(gpa)

    def _pieces(self, linear: int, size: int) -> list[tuple[int, int]]:
        pieces = []
        while size > 0:
            chunk = min(size, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
            hpa = self.linear_to_hpa(linear)
            if hpa is None or not self.memory.contains(hpa, chunk):
                raise GuestMemoryError(linear)
            pieces.append((hpa, chunk))
            linear = (linear + chunk) & 0xFFFFFFFFFFFFFFFF
            size -= chunk
        return pieces

    def read_linear(self, linear: int, size: int) -> bytes:
        return b"".join(self.memory.read(hpa, n) for hpa, n in self._pieces(linear, size))

    def write_linear(self, linear: int, data: bytes) -> None:
        offset = 0
        for hpa, n in self._pieces(linear, len(data)):
            self.memory.write(hpa, data[offset : offset + n])
            offset += n

    def read_code(self, linear: int, size: int = 15) -> bytes:
        """Up to ``size`` bytes at ``linear``, fewer if the instruction runs into an unmapped page."""
        out = b""
        while len(out) < size:
            chunk = min(size - len(out), PAGE_SIZE - ((linear + len(out)) & (PAGE_SIZE - 1)))
            try:
                out += self.read_linear(linear + len(out), chunk)
            except GuestMemoryError:
                break
        return out
