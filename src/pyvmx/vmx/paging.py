"""The guest's own paging: linear -> guest-physical translation (SDM Vol. 3 ch. 4).

One walker for the four modes of SDM 4.1.1 -- paging off, 32-bit paging (4.3), PAE paging (4.4)
and 4-level / 5-level paging (4.5) -- with the access-rights rules of SDM 4.6, the #PF error code
of SDM 4.7 and the accessed and dirty flags of SDM 4.8.

The walker reads the guest's paging structures through a :class:`GuestPhysicalAccess`, which the
caller implements on top of EPT (SDM 29.3): EPT violations and misconfigurations met on the way
propagate unchanged. Guest faults are raised as :func:`pyvmx.vmx.faults.page_fault`.

Choices where the SDM leaves latitude (or this model simplifies):

* Accessed and dirty flags are written only after the whole walk has succeeded, so a faulting
  walk leaves memory untouched (SDM 4.8 allows a processor to set accessed flags on a walk that
  ends in #PF; this model never does).
* PAE PDPTEs are normally loaded by MOV to CR0/CR3/CR4 (which raises #GP on a reserved bit, SDM
  4.4.1) or by VM entry from the VMCS (SDM 27.3.1.6). When ``pdptes`` is not given they are read
  from CR3[31:5] on every walk, and a present PDPTE with a reserved bit set raises #PF with
  PRESENT|RSVD, like any other paging-structure entry.
* Protection keys (CR4.PKE/PKS), shadow stacks, HLAT and implicit supervisor-mode accesses are
  not modelled: every access is explicit, and supervisor-mode exactly when CPL < 3.
* 1-GByte pages are always supported (CPUID.80000001H:EDX.Page1GB = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag
from typing import Protocol

from pyvmx.arch.x86 import Cr0, Cr4, Efer, PageFaultErrorCode as PFErr, PteFlags
from pyvmx.vmx.faults import TranslationFault, X86Fault, page_fault
from pyvmx.vmx.memory import PAGE_SIZE, PhysicalMemoryError


class Access(IntFlag):
    """The kind of a memory access. The bit positions are those of bits 2:0 of the exit
    qualification for EPT violations (SDM 28.2.1, Table 28-7), so an :class:`Access` is also
    an EPT access (:data:`pyvmx.vmx.ept.EptAccess` is this class). A read-modify-write is
    ``READ | WRITE``."""

    READ = 1 << 0
    WRITE = 1 << 1
    FETCH = 1 << 2


@dataclass(frozen=True, slots=True)
class GuestTranslation:
    """The result of a successful linear-address translation.

    ``readable``, ``writable`` and ``executable`` say whether an access of that kind, by the same
    CPL under the same CR0.WP, CR4.SMEP/SMAP, RFLAGS.AC and EFER.NXE, would be allowed (SDM
    4.6.1) -- the rights a TLB entry for this page may carry. ``user`` is the U/S flag ANDed
    over every paging-structure entry used (a user-mode address, SDM 4.6). ``dirty`` is the D
    flag of the leaf entry after this access (SDM 4.8); ``global_`` its G flag when CR4.PGE = 1.
    With paging off every right is granted and ``dirty`` is True.
    """

    gpa: int
    writable: bool
    user: bool
    executable: bool
    page_size: int
    dirty: bool
    global_: bool
    readable: bool


class GuestPhysicalAccess(Protocol):
    """Guest-physical memory as the page walker sees it. ``paging_structure`` is True for the
    walker's own accesses to paging-structure entries (SDM 28.2.1 exit-qualification bit 8 and,
    with EPT A/D flags enabled, SDM 29.3.3.2). Implementations may raise EptViolation or
    EptMisconfig; they propagate unchanged."""

    def read64(self, gpa: int, *, paging_structure: bool = True) -> int: ...

    def read32(self, gpa: int, *, paging_structure: bool = True) -> int: ...

    def write64(self, gpa: int, value: int, *, paging_structure: bool = True) -> None: ...

    def write32(self, gpa: int, value: int, *, paging_structure: bool = True) -> None: ...


_P = int(PteFlags.PRESENT)
_RW = int(PteFlags.RW)
_US = int(PteFlags.USER)
_A = int(PteFlags.ACCESSED)
_D = int(PteFlags.DIRTY)
_PS = int(PteFlags.PSE)
_G = int(PteFlags.GLOBAL)
_XD = int(PteFlags.NX)

# PAE PDPTE bits 2:1 and 8:5 are reserved (SDM 4.4.1, Table 4-8); so are bits 63:MAXPHYADDR.
_PAE_PDPTE_RESERVED_LOW = 0x1E6


def pae_pdpte_reserved_bits(maxphyaddr: int = 46) -> int:
    """The bits that must be 0 in a present PAE PDPTE (SDM 4.4.1, Table 4-8). Bit 63 is
    included: PDPTEs have no XD flag."""
    return _PAE_PDPTE_RESERVED_LOW | (((1 << 64) - 1) & ~((1 << maxphyaddr) - 1))


@dataclass(slots=True)
class _Walk:
    """What a mode's walker found: the entries used (address, value), the leaf last."""

    entries: list[tuple[int, int]]
    wide: bool  # 64-bit entries (PAE, 4-level) rather than 32-bit ones
    gpa: int
    page_size: int
    rw: bool  # R/W = 1 in every entry that controls access rights
    us: bool  # U/S = 1 in every such entry
    xd: bool  # XD = 1 in some such entry (only with EFER.NXE = 1)


def translate_linear(
    linear: int,
    access: Access,
    cpl: int,
    *,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    memory: GuestPhysicalAccess,
    pdptes: tuple[int, int, int, int] | None = None,
    ac: bool = False,
    maxphyaddr: int = 46,
    pse36: bool = True,
) -> GuestTranslation:
    """Translate ``linear`` for one ``access`` at ``cpl`` (SDM 4.1-4.8). ``ac`` is RFLAGS.AC
    (for SMAP); ``pse36`` whether 4-MByte pages of 32-bit paging may map above 4 GBytes.
    Sets accessed/dirty flags (SDM 4.8) and raises #PF (:class:`X86Fault`) on a fault."""
    return _translate(linear, access, cpl, cr0, cr3, cr4, efer, memory, pdptes, ac, maxphyaddr, pse36, True)


def lookup_linear(
    linear: int,
    access: Access,
    cpl: int,
    *,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    memory: GuestPhysicalAccess,
    pdptes: tuple[int, int, int, int] | None = None,
    ac: bool = False,
    maxphyaddr: int = 46,
    pse36: bool = True,
) -> GuestTranslation | None:
    """:func:`translate_linear` without side effects, for debuggers and traces: no accessed or
    dirty flag is written, and any fault (#PF, EPT, outside memory) gives None. ``dirty`` is
    the leaf's D flag as found."""
    try:
        return _translate(linear, access, cpl, cr0, cr3, cr4, efer, memory, pdptes, ac, maxphyaddr, pse36, False)
    except (TranslationFault, PhysicalMemoryError):
        return None


def _translate(
    linear: int,
    access: Access,
    cpl: int,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    memory: GuestPhysicalAccess,
    pdptes: tuple[int, int, int, int] | None,
    ac: bool,
    maxphyaddr: int,
    pse36: bool,
    update: bool,
) -> GuestTranslation:
    long_mode = bool(efer & Efer.LMA)
    if not cr0 & Cr0.PG:
        # SDM 4.1.1: with paging off a linear address is a physical address.
        gpa = linear if long_mode else linear & 0xFFFFFFFF
        return GuestTranslation(gpa, True, True, True, PAGE_SIZE, True, False, True)

    nxe = bool(efer & Efer.NX)
    # SDM 4.7: the error code's W/R, U/S and I/D flags describe the access, whatever the fault.
    error_code = 0
    if access & Access.WRITE:
        error_code |= PFErr.WRITE
    if cpl == 3:
        error_code |= PFErr.USER
    if access & Access.FETCH and (cr4 & Cr4.SMEP or (cr4 & Cr4.PAE and nxe)):
        error_code |= PFErr.FETCH

    if long_mode:
        levels = 5 if cr4 & Cr4.LA57 else 4
        walk = _walk_4level(linear, levels, cr3, memory, error_code, nxe, maxphyaddr)
    elif cr4 & Cr4.PAE:
        walk = _walk_pae(linear & 0xFFFFFFFF, cr3, memory, pdptes, error_code, nxe, maxphyaddr)
    else:
        walk = _walk_32bit(linear & 0xFFFFFFFF, cr3, cr4, memory, error_code, maxphyaddr, pse36)

    # SDM 4.6.1: access rights.
    supervisor = cpl < 3
    smap_blocks = bool(cr4 & Cr4.SMAP) and not ac
    wp = bool(cr0 & Cr0.WP)
    if supervisor:
        readable = not (walk.us and smap_blocks)
        writable = readable and (walk.rw or not wp)
        executable = not (walk.us and cr4 & Cr4.SMEP) and not walk.xd
    else:
        readable = walk.us
        writable = walk.us and walk.rw
        executable = walk.us and not walk.xd
    if (
        (access & Access.READ and not readable)
        or (access & Access.WRITE and not writable)
        or (access & Access.FETCH and not executable)
    ):
        raise page_fault(linear, error_code | PFErr.PRESENT)

    # SDM 4.8: accessed flag in every entry used, dirty flag in the leaf on a write.
    leaf_address, leaf = walk.entries[-1]
    new_leaf = leaf | _A
    if access & Access.WRITE:
        new_leaf |= _D
    if update:
        write = memory.write64 if walk.wide else memory.write32
        for address, entry in walk.entries[:-1]:
            if not entry & _A:
                write(address, entry | _A, paging_structure=True)
        if new_leaf != leaf:
            write(leaf_address, new_leaf, paging_structure=True)
    else:
        new_leaf = leaf
    return GuestTranslation(
        gpa=walk.gpa,
        writable=writable,
        user=walk.us,
        executable=executable,
        page_size=walk.page_size,
        dirty=bool(new_leaf & _D),
        global_=bool(leaf & _G) and bool(cr4 & Cr4.PGE),
        readable=readable,
    )


def _not_present(linear: int, error_code: int) -> X86Fault:
    return page_fault(linear, error_code)


def _reserved(linear: int, error_code: int) -> X86Fault:
    return page_fault(linear, error_code | PFErr.PRESENT | PFErr.RSVD)


def _walk_32bit(
    linear: int, cr3: int, cr4: int, memory: GuestPhysicalAccess, error_code: int, maxphyaddr: int, pse36: bool
) -> _Walk:
    """32-bit paging (SDM 4.3): a page directory and page tables of 32-bit entries; 4-MByte
    pages when CR4.PSE = 1, mapping up to 40 physical-address bits with PSE-36 (Table 4-4)."""
    pde_address = (cr3 & 0xFFFFF000) | (linear >> 22) << 2
    pde = memory.read32(pde_address, paging_structure=True)
    if not pde & _P:
        raise _not_present(linear, error_code)
    if cr4 & Cr4.PSE and pde & _PS:
        # Bits 20:13 hold physical-address bits 39:32; bits 21:(M-19) are reserved, where M is
        # min(MAXPHYADDR, 40) with PSE-36 and 32 without (Table 4-4).
        width = min(maxphyaddr, 40) if pse36 else 32
        if pde & (((1 << 22) - 1) & ~((1 << (width - 19)) - 1)):
            raise _reserved(linear, error_code)
        gpa = (pde & 0xFFC00000) | ((pde >> 13) & 0xFF) << 32 | (linear & 0x3FFFFF)
        return _Walk([(pde_address, pde)], False, gpa, 4 << 20, bool(pde & _RW), bool(pde & _US), False)
    pte_address = (pde & 0xFFFFF000) | ((linear >> 12) & 0x3FF) << 2
    pte = memory.read32(pte_address, paging_structure=True)
    if not pte & _P:
        raise _not_present(linear, error_code)
    gpa = (pte & 0xFFFFF000) | (linear & 0xFFF)
    rw = bool(pde & pte & _RW)
    us = bool(pde & pte & _US)
    return _Walk([(pde_address, pde), (pte_address, pte)], False, gpa, PAGE_SIZE, rw, us, False)


def _walk_pae(
    linear: int,
    cr3: int,
    memory: GuestPhysicalAccess,
    pdptes: tuple[int, int, int, int] | None,
    error_code: int,
    nxe: bool,
    maxphyaddr: int,
) -> _Walk:
    """PAE paging (SDM 4.4): one of four PDPTEs (which control no access rights and have no
    accessed flag), then a page directory and page tables of 64-bit entries."""
    index = linear >> 30
    if pdptes is not None:
        pdpte = pdptes[index]
    else:
        pdpte = memory.read64((cr3 & 0xFFFFFFE0) + index * 8, paging_structure=True)
    if not pdpte & _P:
        raise _not_present(linear, error_code)
    if pdpte & pae_pdpte_reserved_bits(maxphyaddr):
        raise _reserved(linear, error_code)
    # SDM 4.4.2: bits 62:MAXPHYADDR of PDEs and PTEs are reserved, and bit 63 unless NXE = 1.
    high_reserved = ((1 << 63) - 1) & ~((1 << maxphyaddr) - 1)
    table = pdpte & ((1 << maxphyaddr) - 1) & ~0xFFF
    return _walk_tables(linear, table, 2, memory, error_code, nxe, maxphyaddr, high_reserved)


def _walk_4level(
    linear: int, levels: int, cr3: int, memory: GuestPhysicalAccess, error_code: int, nxe: bool, maxphyaddr: int
) -> _Walk:
    """4-level and 5-level paging (SDM 4.5): 64-bit entries from the PML4 (or PML5) table at
    CR3[M-1:12]; bits 51:MAXPHYADDR are reserved (bits 62:52 are ignored)."""
    high_reserved = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)
    table = cr3 & ((1 << maxphyaddr) - 1) & ~0xFFF
    return _walk_tables(linear, table, levels, memory, error_code, nxe, maxphyaddr, high_reserved)


def _walk_tables(
    linear: int,
    table: int,
    level: int,
    memory: GuestPhysicalAccess,
    error_code: int,
    nxe: bool,
    maxphyaddr: int,
    high_reserved: int,
) -> _Walk:
    """The walk through 512-entry tables of 64-bit entries shared by PAE paging (from the page
    directory, level 2) and 4-/5-level paging (from level 4 or 5). Reserved bits (SDM 4.4.2,
    4.5.4 and Tables 4-9 ... 4-20): ``high_reserved``; bit 63 when EFER.NXE = 0; PS in a PML5E
    or PML4E; bits 29:13 of a 1-GByte PDPTE and bits 20:13 of a 2-MByte PDE."""
    reserved = high_reserved if nxe else high_reserved | _XD
    entries: list[tuple[int, int]] = []
    rw = us = True
    xd = False
    while True:
        shift = 12 + 9 * (level - 1)
        address = table + ((linear >> shift) & 0x1FF) * 8
        entry = memory.read64(address, paging_structure=True)
        if not entry & _P:
            raise _not_present(linear, error_code)
        large = level in (2, 3) and bool(entry & _PS)
        entry_reserved = reserved
        if level >= 4:
            entry_reserved |= _PS
        elif large:
            entry_reserved |= ((1 << shift) - 1) & ~0x1FFF  # bits shift-1:13 (bit 12 is PAT)
        if entry & entry_reserved:
            raise _reserved(linear, error_code)
        entries.append((address, entry))
        rw = rw and bool(entry & _RW)
        us = us and bool(entry & _US)
        xd = xd or (nxe and bool(entry & _XD))
        if level == 1 or large:
            size = 1 << shift
            gpa = (entry & ((1 << maxphyaddr) - 1) & ~(size - 1)) | (linear & (size - 1))
            return _Walk(entries, True, gpa, size, rw, us, xd)
        table = entry & ((1 << maxphyaddr) - 1) & ~0xFFF
        level -= 1
