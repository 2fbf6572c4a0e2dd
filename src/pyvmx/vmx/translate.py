"""Two-dimensional address translation for a guest in VMX non-root operation: the guest's own
paging (linear -> guest-physical, SDM ch. 4) on top of EPT (guest-physical -> host-physical,
SDM 29.3), or guest-physical = host-physical when EPT is off.

The CPU engine calls :meth:`AddressTranslator.translate_page` on every TLB miss; event delivery
and instruction emulation use :meth:`read_linear`/:meth:`write_linear`.  Faults are raised as
:mod:`pyvmx.vmx.faults` exceptions and turned into events or VM exits by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmx.vmx.ept import EptAccess, ept_walk
from pyvmx.vmx.caps import canonical
from pyvmx.vmx.faults import EptViolation, NonCanonicalAccess
from pyvmx.vmx.memory import PAGE_SIZE, PhysicalMemory
from pyvmx.vmx.paging import Access, translate_linear

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
_EFER_LMA = 1 << 10
_CR0_PG = 1 << 31
_CR4_LA57 = 1 << 12


@dataclass(slots=True)
class PagingMode:
    """The control registers that select the guest's translation (read at each TLB miss)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    cpl: int
    pdptes: tuple[int, int, int, int] | None = None
    ac: bool = False  # RFLAGS.AC: explicit supervisor accesses may reach user pages under SMAP


class _GuestPhysical:
    """Guest-physical accesses of the guest's page walker, through EPT (paging-structure
    accesses: A/D-enabled EPT treats them as writes, SDM 29.3.3.2)."""

    __slots__ = ("t", "linear")

    def __init__(self, translator: AddressTranslator) -> None:
        self.t = translator
        self.linear = 0

    def _hpa(self, gpa: int, write: bool, size: int) -> int | None:
        """The host-physical address, or None where no memory is behind it (EPT may map guest
        pages beyond host memory): reads there return all ones, writes are dropped."""
        hpa = self.t.gpa_to_hpa(gpa, EptAccess.WRITE if write else EptAccess.READ, guest_linear=self.linear, paging_structure=True)
        return hpa if self.t.memory.contains(hpa, size) else None

    def read64(self, gpa: int, paging_structure: bool = True) -> int:
        hpa = self._hpa(gpa, False, 8)
        return self.t.memory.read64(hpa) if hpa is not None else (1 << 64) - 1

    def read32(self, gpa: int, paging_structure: bool = True) -> int:
        hpa = self._hpa(gpa, False, 4)
        return self.t.memory.read32(hpa) if hpa is not None else (1 << 32) - 1

    def write64(self, gpa: int, value: int, paging_structure: bool = True) -> None:
        hpa = self._hpa(gpa, True, 8)
        if hpa is not None:
            self.t.memory.write64(hpa, value)

    def write32(self, gpa: int, value: int, paging_structure: bool = True) -> None:
        hpa = self._hpa(gpa, True, 4)
        if hpa is not None:
            self.t.memory.write32(hpa, value)


class AddressTranslator:
    """Linear -> host-physical for one guest: its paging mode plus the VMCS's EPT settings."""

    def __init__(self, memory: PhysicalMemory, maxphyaddr: int = 46, void_page: int | None = None) -> None:
        self.memory = memory
        self.maxphyaddr = maxphyaddr
        self.eptp: int | None = None  # None: EPT disabled, guest-physical = host-physical
        # Without EPT a guest may name physical addresses past the end of memory: they read
        # as all ones (no device answers) through this scratch page.
        self.void_page = void_page
        self._gphys = _GuestPhysical(self)

    # --- guest-physical -> host-physical ---------------------------------------------------
    def gpa_to_hpa(self, gpa: int, access: EptAccess, *, guest_linear: int | None = None, paging_structure: bool = False) -> int:
        if self.eptp is None:
            if gpa < self.memory.size:
                return gpa
            if self.void_page is None:
                raise EptViolation(gpa, int(access))
            return self.void_page + (gpa & (PAGE_SIZE - 1))
        return ept_walk(
            self.memory, self.eptp, gpa, access,
            maxphyaddr=self.maxphyaddr, guest_linear=guest_linear,
            paging_structure_access=paging_structure,
        ).hpa

    # --- linear -> host-physical -------------------------------------------------------------
    def translate_page(self, linear: int, access: Access, mode: PagingMode) -> tuple[int, int]:
        """Translate the page of ``linear`` for one access; returns (host-physical page, the
        UC_PROT permissions the TLB may cache). In IA-32e mode a non-canonical address raises
        :class:`NonCanonicalAccess` (the walk would ignore its upper bits).  Write permission is withheld while a dirty flag
        (guest or EPT) is still clear, so the first write comes back here and sets it."""
        perms = PROT_READ | PROT_WRITE | PROT_EXEC
        if mode.efer & _EFER_LMA and not canonical(linear, 57 if mode.cr4 & _CR4_LA57 else 48):
            raise NonCanonicalAccess(linear)
        if mode.cr0 & _CR0_PG:
            self._gphys.linear = linear
            gt = translate_linear(
                linear, access, mode.cpl, cr0=mode.cr0, cr3=mode.cr3, cr4=mode.cr4, efer=mode.efer,
                memory=self._gphys, pdptes=mode.pdptes, ac=mode.ac,
            )
            gpa = gt.gpa
            if not gt.writable or not gt.dirty:
                perms &= ~PROT_WRITE
            if not gt.executable:
                perms &= ~PROT_EXEC
        else:
            gpa = linear if mode.efer & _EFER_LMA else linear & 0xFFFFFFFF
        if self.eptp is None:
            return self.gpa_to_hpa(gpa, EptAccess(int(access))) & ~(PAGE_SIZE - 1), perms
        et = ept_walk(
            self.memory, self.eptp, gpa, EptAccess(int(access)), maxphyaddr=self.maxphyaddr,
            guest_linear=linear,
        )
        if not et.readable:
            perms &= ~PROT_READ
        if not et.writable or not et.dirty:
            perms &= ~PROT_WRITE
        if not et.executable:
            perms &= ~PROT_EXEC
        hpa = et.hpa & ~(PAGE_SIZE - 1)
        if not self.memory.contains(hpa, PAGE_SIZE) and self.void_page is not None:
            # EPT maps this guest page beyond host memory: nothing answers (reads all ones).
            return self.void_page, perms
        return hpa, perms

    # --- byte access by linear address (event delivery, emulation) -----------------------------
    def _access(self, linear: int, size: int, access: Access, mode: PagingMode) -> list[tuple[int, int]]:
        """(host-physical address, length) pieces of a linear range, page by page."""
        pieces = []
        while size > 0:
            chunk = min(size, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
            page, _ = self.translate_page(linear, access, mode)
            pieces.append((page | (linear & (PAGE_SIZE - 1)), chunk))
            linear = (linear + chunk) & 0xFFFFFFFFFFFFFFFF
            size -= chunk
        return pieces

    def read_linear(self, linear: int, size: int, mode: PagingMode, access: Access = Access.READ) -> bytes:
        return b"".join(self.memory.read(hpa, n) for hpa, n in self._access(linear, size, access, mode))

    def write_linear(self, linear: int, data: bytes, mode: PagingMode) -> None:
        offset = 0
        for hpa, n in self._access(linear, len(data), Access.WRITE, mode):
            self.memory.write(hpa, data[offset : offset + n])
            offset += n
