"""SPTEs: the EPT entries the MMU writes, with the bits KVM gives them (arch/x86/kvm/mmu/spte.h,
spte.c; SDM Vol. 3 29.3.2 "EPT Translation Mechanism", Tables 29-1 ... 29-6).

Hardware bits (SDM 29.3.2):

* bits 2:0 -- read, write, execute (``VMX_EPT_RWX_MASK``);
* bits 5:3 -- memory type of a leaf (WB, 6), bit 6 -- ignore PAT (IPAT). KVM sets both on RAM
  leaves when no non-coherent DMA is attached (vmx_get_mt_mask());
* bit 7 -- the entry maps a 2-MByte (PDE) or 1-GByte (PDPTE) page (``PT_PAGE_SIZE_MASK``);
* bits 8/9 -- accessed / dirty, written by the processor when EPTP bit 6 enables them
  (SDM 29.3.5; ``shadow_accessed_mask``/``shadow_dirty_mask``).

Software bits, in positions the processor ignores with the controls this MMU leaves off:

* bit 11 -- :data:`SPTE_MMU_PRESENT_MASK`: the SPTE is "shadow present" (is_shadow_present_pte);
* bit 57 -- :data:`EPT_SPTE_HOST_WRITABLE`: the host page may be written (the memslot is not
  read-only and the host mapping is writable), ``shadow_host_writable_mask``;
* bit 58 -- :data:`EPT_SPTE_MMU_WRITABLE`: the MMU may make this SPTE writable -- set on a
  writable mapping that is write-protected only for dirty logging, so the fast path
  (fast_page_fault) can restore write access without the MMU lock (``shadow_mmu_writable_mask``).

MMIO SPTEs. A gfn with no memslot gets a leaf KVM calls an MMIO SPTE (make_mmio_spte()): write
and execute without read (``VMX_EPT_MISCONFIG_WX_VALUE``), which the processor reports as an EPT
misconfiguration (SDM 29.3.3.1) -- so the next access exits with EXIT_REASON_EPT_MISCONFIG and
the hypervisor goes straight to emulation without a memslot lookup. The SPTE also carries the
gfn (bits 51:12) and the memslot generation (19 bits, split over bits 10:3 and 62:52 as in
spte.h's MMIO_SPTE_GEN_*), so that a marker made before a memslot update is recognised as stale
(check_mmio_spte()). Bit 63 (suppress #VE) is left clear: #VE is not modelled.
"""

from __future__ import annotations

from pyvmx.arch.controls import (
    EPT_MEMTYPE_WB,
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT,
    VMX_EPT_EXECUTABLE_MASK,
    VMX_EPT_IPAT_BIT,
    VMX_EPT_LARGE_PAGE_BIT,
    VMX_EPT_MISCONFIG_WX_VALUE,
    VMX_EPT_MT_EPTE_SHIFT,
    VMX_EPT_READABLE_MASK,
    VMX_EPT_RWX_MASK,
    VMX_EPT_SUPPRESS_VE_BIT,
    VMX_EPT_WRITABLE_MASK,
)

# --- levels (arch/x86/include/asm/kvm_host.h enum pg_level) ---------------------------------
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
PG_LEVEL_512G = 4
PT64_ROOT_4LEVEL = 4
KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G

PAGE_SHIFT = 12
SPTE_ENT_PER_PAGE = 512


def level_shift(level: int) -> int:
    """Bits of guest-physical address translated below an entry at ``level`` (12, 21, 30, 39)."""
    return PAGE_SHIFT + 9 * (level - 1)


def pages_per_hpage(level: int) -> int:
    """``KVM_PAGES_PER_HPAGE(level)``: 4-KByte pages in one page of ``level`` (1, 512, 262144)."""
    return 1 << (9 * (level - 1))


def gfn_round_for_level(gfn: int, level: int) -> int:
    """``gfn_round_for_level()``: the first gfn of the ``level`` page holding ``gfn``."""
    return gfn & -pages_per_hpage(level)


def spte_index(gfn: int, level: int) -> int:
    """``SPTE_INDEX()``: the entry for ``gfn`` in a table at ``level``."""
    return (gfn >> (9 * (level - 1))) & 0x1FF


# --- bits -------------------------------------------------------------------------------------
PT_PRESENT_MASK = VMX_EPT_READABLE_MASK  # "present" for a read access (is_access_allowed())
PT_WRITABLE_MASK = VMX_EPT_WRITABLE_MASK
PT_EXEC_MASK = VMX_EPT_EXECUTABLE_MASK
PT_PAGE_SIZE_MASK = VMX_EPT_LARGE_PAGE_BIT
SHADOW_ACCESSED_MASK = VMX_EPT_ACCESS_BIT
SHADOW_DIRTY_MASK = VMX_EPT_DIRTY_BIT
SPTE_MMU_PRESENT_MASK = 1 << 11
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
SHADOW_NONPRESENT_VALUE = 0
"""A not-present SPTE. Linux now uses bit 63 (suppress #VE) here; #VE is not modelled."""

SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # bits 51:12
LEAF_MEMTYPE_BITS = EPT_MEMTYPE_WB << VMX_EPT_MT_EPTE_SHIFT | VMX_EPT_IPAT_BIT
"""What vmx_get_mt_mask() returns for RAM with no non-coherent DMA: WB, ignore PAT."""

ACC_EXEC_MASK = 1
ACC_WRITE_MASK = PT_WRITABLE_MASK
ACC_USER_MASK = 4
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

# --- MMIO SPTEs (spte.h MMIO_SPTE_GEN_*; vmx.c: kvm_mmu_set_ept_masks()) ----------------------
SHADOW_MMIO_VALUE = VMX_EPT_MISCONFIG_WX_VALUE
SHADOW_MMIO_MASK = VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT
MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_END = 10
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_HIGH_END = 62
MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1  # 8
MMIO_SPTE_GEN_HIGH_BITS = MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1  # 11
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1
MMIO_SPTE_GEN_LOW_MASK = ((1 << (MMIO_SPTE_GEN_LOW_END + 1)) - 1) & ~((1 << MMIO_SPTE_GEN_LOW_START) - 1)
MMIO_SPTE_GEN_HIGH_MASK = ((1 << (MMIO_SPTE_GEN_HIGH_END + 1)) - 1) & ~((1 << MMIO_SPTE_GEN_HIGH_START) - 1)
MMIO_SPTE_GEN_LOW_SHIFT = MMIO_SPTE_GEN_LOW_START
MMIO_SPTE_GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS


def generation_mmio_spte_mask(gen: int) -> int:
    """``generation_mmio_spte_mask()``: the 19 low bits of ``gen`` spread over the SPTE."""
    gen &= MMIO_SPTE_GEN_MASK
    mask = (gen << MMIO_SPTE_GEN_LOW_SHIFT) & MMIO_SPTE_GEN_LOW_MASK
    mask |= (gen << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK
    return mask


def get_mmio_spte_generation(spte: int) -> int:
    """``get_mmio_spte_generation()``: the generation stored by :func:`make_mmio_spte`."""
    gen = (spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_SHIFT
    gen |= (spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_SHIFT
    return gen


def make_mmio_spte(gfn: int, generation: int, maxphyaddr: int = 46) -> int:
    """``make_mmio_spte()``: an MMIO marker for ``gfn`` stamped with memslot ``generation``.
    The gfn must fit below MAXPHYADDR (bits 51:MAXPHYADDR of an EPT entry are reserved)."""
    if gfn >> (maxphyaddr - PAGE_SHIFT):
        raise ValueError(f"gfn {gfn:#x} does not fit below MAXPHYADDR {maxphyaddr}")
    return SHADOW_MMIO_VALUE | generation_mmio_spte_mask(generation) | gfn << PAGE_SHIFT


def is_mmio_spte(spte: int) -> bool:
    """``is_mmio_spte()``."""
    return spte & SHADOW_MMIO_MASK == SHADOW_MMIO_VALUE


def get_mmio_spte_gfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


# --- predicates (spte.h) ------------------------------------------------------------------------
def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte: int) -> bool:
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    return level == PG_LEVEL_4K or is_large_pte(spte)


def is_writable_pte(spte: int) -> bool:
    return bool(spte & PT_WRITABLE_MASK)


def is_executable_pte(spte: int) -> bool:
    return bool(spte & PT_EXEC_MASK)


def is_mmu_writable_spte(spte: int) -> bool:
    return bool(spte & EPT_SPTE_MMU_WRITABLE)


def spte_to_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT


def is_access_allowed(write: bool, exec_: bool, spte: int) -> bool:
    """``is_access_allowed()``: would the access that faulted succeed against ``spte`` now?"""
    if exec_:
        return is_executable_pte(spte)
    if write:
        return is_writable_pte(spte)
    return bool(spte & PT_PRESENT_MASK)


# --- making SPTEs (spte.c) ------------------------------------------------------------------------
def make_nonleaf_spte(child_table: int) -> int:
    """``make_nonleaf_spte()``: a table entry, RWX (upper levels are always ACC_ALL)."""
    return child_table | SPTE_MMU_PRESENT_MASK | VMX_EPT_RWX_MASK


def make_spte(
    pfn: int,
    level: int,
    *,
    writable: bool,
    host_writable: bool,
    prefetch: bool = False,
) -> int:
    """``make_spte()`` for a TDP leaf: R and X always, W when ``writable``; WB + IPAT; bit 7 above
    4 KByte. A non-prefetch SPTE starts accessed (the access that faulted is about to happen),
    and a writable one dirty (spte_shadow_dirty_mask()). ``host_writable`` sets the host- and
    MMU-writable software bits: the SPTE may become writable later without a full fault."""
    spte = SPTE_MMU_PRESENT_MASK | VMX_EPT_READABLE_MASK | VMX_EPT_EXECUTABLE_MASK | LEAF_MEMTYPE_BITS
    spte |= pfn << PAGE_SHIFT
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    if host_writable:
        spte |= EPT_SPTE_HOST_WRITABLE | EPT_SPTE_MMU_WRITABLE
    if writable:
        spte |= PT_WRITABLE_MASK | SHADOW_DIRTY_MASK
    if not prefetch:
        spte |= SHADOW_ACCESSED_MASK
    return spte


def make_small_spte(huge_spte: int, huge_level: int, index: int) -> int:
    """``make_small_spte()`` (was make_huge_page_split_spte()): entry ``index`` of the table that
    replaces a huge SPTE: the same bits for 1/512th of the range; bit 7 stays only above 4 KByte."""
    child_level = huge_level - 1
    spte = huge_spte + ((index * pages_per_hpage(child_level)) << PAGE_SHIFT)
    if child_level == PG_LEVEL_4K:
        spte &= ~PT_PAGE_SIZE_MASK
    return spte


def check_rwx_reduced(old: int, new: int) -> bool:
    """Whether ``new`` lacks one of R/W/X that ``old`` had (a TLB flush is then needed:
    leaf_spte_change_needs_tlb_flush())."""
    return bool(old & VMX_EPT_RWX_MASK & ~new)


def spte_write_protect(spte: int) -> int:
    """``spte_write_protect()`` for dirty logging: clear W, keep MMU-writable."""
    return spte & ~PT_WRITABLE_MASK


def describe_spte(spte: int, level: int) -> str:
    """A one-line description for dumps and assertion messages."""
    if is_mmio_spte(spte):
        return f"mmio gfn={get_mmio_spte_gfn(spte):#x} gen={get_mmio_spte_generation(spte)}"
    if not is_shadow_present_pte(spte):
        return "not present"
    perms = "".join(c if spte & bit else "-" for c, bit in (("r", 1), ("w", 2), ("x", 4)))
    kind = "leaf" if is_last_spte(spte, level) else "table"
    return f"{kind} L{level} {perms} -> {spte & SPTE_BASE_ADDR_MASK:#x}"
