"""EPT: guest-physical -> host-physical translation (SDM Vol. 3 29.3).

A 4-level walk (page-walk length 4) from the EPT PML4 table named by EPTP bits 51:12, with
4-KByte, 2-MByte and 1-GByte pages (SDM 29.3.2), EPT misconfigurations (SDM 29.3.3.1), EPT
violations and their exit qualification (SDM 29.3.3.2, 28.2.1 Table 28-7), and accessed and
dirty flags when EPTP bit 6 is set (SDM 29.3.5).

Order of checks: the walk reads one entry per level; an entry that is not present (bits 2:0 = 0)
ends it with an EPT violation; a present entry is then checked for misconfiguration; the access
is checked against the AND of the permissions only once the leaf is reached. Accessed and dirty
flags are written only after the access is known to be allowed (the SDM lets a processor set
accessed flags on a walk that ends in a violation; this model never does).

Not modelled: mode-based execute control (bit 10, qualification bit 6), sub-page permissions,
#VE, 5-level EPT, and advanced VM-exit information for EPT violations (qualification bits 11:9
stay 0: the model does not report IA32_VMX_EPT_VPID_CAP bit 22).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvmx.arch.controls import (
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT,
    VMX_EPT_EXECUTABLE_MASK,
    VMX_EPT_LARGE_PAGE_BIT,
    VMX_EPT_MT_MASK,
    VMX_EPT_MT_SHIFT,
    VMX_EPT_READABLE_MASK,
    VMX_EPT_RWX_MASK,
    VMX_EPT_WRITABLE_MASK,
    VMX_EPTP_AD_ENABLE_BIT,
)
from pyvmx.arch.qualifications import (
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
    EPT_VIOLATION_RWX_SHIFT,
)
from pyvmx.vmx.faults import EptMisconfig, EptViolation
from pyvmx.vmx.memory import PhysicalMemory, PhysicalMemoryError
from pyvmx.vmx.paging import Access

EptAccess = Access
"""An access to guest-physical memory: READ, WRITE, FETCH -- the bit positions of exit
qualification bits 2:0 and of the R/W/X bits of an EPT entry (SDM 28.2.1, 29.3.2)."""

_ADDRESS_MASK = ((1 << 52) - 1) & ~0xFFF  # bits 51:12
_WRITE_WITHOUT_READ = (0b010, 0b110)  # SDM 29.3.3.1
_EXECUTE_ONLY = 0b100
_RESERVED_MEMORY_TYPES = (2, 3, 7)  # SDM 29.3.3.1, 29.3.7


@dataclass(frozen=True, slots=True)
class EptTranslation:
    """A successful EPT translation. ``readable``/``writable``/``executable`` are bits 0/1/2 ANDed
    over every entry used -- the rights the processor may cache (SDM 29.4.1). ``dirty`` is the
    leaf's dirty flag after this access when A/D flags are enabled, else True."""

    hpa: int
    readable: bool
    writable: bool
    executable: bool
    page_size: int
    leaf_address: int
    dirty: bool
    memory_type: int


def ept_walk(
    memory: PhysicalMemory,
    eptp: int,
    gpa: int,
    access: Access,
    *,
    maxphyaddr: int = 46,
    execute_only_supported: bool = True,
    huge_1g_supported: bool = True,
    guest_linear: int | None = None,
    paging_structure_access: bool = False,
) -> EptTranslation:
    """Translate ``gpa`` for ``access`` (SDM 29.3). ``guest_linear`` is the linear address
    whose translation led here, if any (qualification bit 7); ``paging_structure_access`` is
    True for the guest page walker's own accesses (qualification bit 8 clear; with A/D flags
    enabled they are treated as writes, SDM 29.3.3.2). Raises EptViolation or EptMisconfig."""
    return _walk(
        memory, eptp, gpa, int(access), maxphyaddr, execute_only_supported, huge_1g_supported,
        guest_linear, paging_structure_access, True,
    )


def ept_lookup(
    memory: PhysicalMemory,
    eptp: int,
    gpa: int,
    maxphyaddr: int = 46,
    *,
    execute_only_supported: bool = True,
    huge_1g_supported: bool = True,
) -> EptTranslation | None:
    """The translation of ``gpa`` without side effects, for debuggers and dumps: no permission
    check, no A/D update; None if the walk meets a not-present or misconfigured entry (or a
    table outside memory). ``dirty`` is the leaf's dirty flag as found."""
    try:
        return _walk(memory, eptp, gpa, 0, maxphyaddr, execute_only_supported, huge_1g_supported, None, False, False)
    except (EptViolation, EptMisconfig, PhysicalMemoryError):
        return None


def _qualification(access: int, rwx: int, guest_linear: int | None, paging_structure_access: bool) -> int:
    """Exit qualification for an EPT violation (SDM 28.2.1, Table 28-7): bits 2:0 the access,
    bits 5:3 the AND of bits 2:0 of the entries used, bit 7 guest-linear address valid, bit 8
    the access was to the translation of that linear address (not to a paging structure)."""
    qualification = access | rwx << EPT_VIOLATION_RWX_SHIFT
    if guest_linear is not None:
        qualification |= EPT_VIOLATION_GVA_IS_VALID
        if not paging_structure_access:
            qualification |= EPT_VIOLATION_GVA_TRANSLATED
    return qualification


def _walk(
    memory: PhysicalMemory,
    eptp: int,
    gpa: int,
    access: int,
    maxphyaddr: int,
    execute_only_supported: bool,
    huge_1g_supported: bool,
    guest_linear: int | None,
    paging_structure_access: bool,
    update: bool,
) -> EptTranslation:
    """The walk behind :func:`ept_walk` (``update``: check ``access`` and set A/D flags) and
    :func:`ept_lookup` (``access`` 0, no update)."""
    ad_enabled = bool(eptp & VMX_EPTP_AD_ENABLE_BIT)
    if ad_enabled and paging_structure_access:
        # SDM 29.3.3.2 and Table 28-7 note 1: with A/D flags enabled, accesses to guest paging
        # structures are writes for EPT, and a violation sets both bit 0 and bit 1.
        access |= EPT_VIOLATION_ACC_READ | EPT_VIOLATION_ACC_WRITE

    # Reserved bits (SDM 29.3.2, Tables 29-1 ... 29-6): bits 51:MAXPHYADDR everywhere; PML4E
    # bits 7:3; bits 6:3 of a PDPTE or PDE that references a table (bit 7 too of a PDPTE when
    # 1-GByte pages are not supported); bits 29:12 of a 1-GByte PDPTE; bits 20:12 of a 2-MByte
    # PDE. A PTE's bit 7 is ignored.
    high = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)
    table_reserved = high | (0x78 if huge_1g_supported else 0xF8)

    table = eptp & _ADDRESS_MASK
    rwx = VMX_EPT_RWX_MASK
    accessed = VMX_EPT_ACCESS_BIT  # stays set while every non-leaf entry used has its accessed flag
    used: list[int] = []  # addresses of the entries used, for setting accessed flags
    shift = 39
    while True:
        address = table + ((gpa >> shift) & 0x1FF) * 8
        if not memory.contains(address, 8):
            # No memory answers there: the read returns all ones, which sets reserved bits.
            raise EptMisconfig(gpa, paging_structure_access)
        entry = memory.read64(address)
        entry_rwx = entry & VMX_EPT_RWX_MASK
        rwx &= entry_rwx
        if not entry_rwx:
            raise EptViolation(gpa, _qualification(access, 0, guest_linear, paging_structure_access), guest_linear)

        if entry_rwx in _WRITE_WITHOUT_READ or (entry_rwx == _EXECUTE_ONLY and not execute_only_supported):
            raise EptMisconfig(gpa, paging_structure_access)
        if shift == 12:
            leaf, reserved = True, high
        elif shift == 39:
            leaf, reserved = False, high | 0xF8
        elif entry & VMX_EPT_LARGE_PAGE_BIT and (shift == 21 or huge_1g_supported):
            leaf, reserved = True, high | (((1 << shift) - 1) & ~0xFFF)
        else:
            leaf, reserved = False, table_reserved
        if entry & reserved:
            raise EptMisconfig(gpa, paging_structure_access)
        if leaf and (entry & VMX_EPT_MT_MASK) >> VMX_EPT_MT_SHIFT in _RESERVED_MEMORY_TYPES:
            raise EptMisconfig(gpa, paging_structure_access)

        if leaf:
            break
        accessed &= entry
        used.append(address)
        table = entry & _ADDRESS_MASK
        shift -= 9

    # SDM 29.3.3.2: read needs bit 0, write bit 1, instruction fetch bit 2, in every entry.
    if access & ~rwx & VMX_EPT_RWX_MASK:
        raise EptViolation(gpa, _qualification(access, rwx, guest_linear, paging_structure_access), guest_linear)

    page_size = 1 << shift
    dirty = True
    if ad_enabled:
        # SDM 29.3.5: accessed flag in every entry used; dirty flag in the leaf on a write.
        new_entry = entry | VMX_EPT_ACCESS_BIT
        if access & EPT_VIOLATION_ACC_WRITE:
            new_entry |= VMX_EPT_DIRTY_BIT
        if not update:
            new_entry = entry
        else:
            if not accessed:
                for table_entry in used:
                    value = memory.read64(table_entry)
                    if not value & VMX_EPT_ACCESS_BIT:
                        memory.write64(table_entry, value | VMX_EPT_ACCESS_BIT)
            if new_entry != entry:
                memory.write64(address, new_entry)
        dirty = bool(new_entry & VMX_EPT_DIRTY_BIT)

    return EptTranslation(
        hpa=(entry & _ADDRESS_MASK & ~(page_size - 1)) | (gpa & (page_size - 1)),
        readable=bool(rwx & VMX_EPT_READABLE_MASK),
        writable=bool(rwx & VMX_EPT_WRITABLE_MASK),
        executable=bool(rwx & VMX_EPT_EXECUTABLE_MASK),
        page_size=page_size,
        leaf_address=address,
        dirty=dirty,
        memory_type=(entry & VMX_EPT_MT_MASK) >> VMX_EPT_MT_SHIFT,
    )
