"""SPTE encodings and the EPT-violation error code: pure functions, no CPU engine."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmx.arch.controls import VMX_EPT_IPAT_BIT, VMX_EPT_LARGE_PAGE_BIT
from pyvmx.arch.qualifications import (
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
    EPT_VIOLATION_PROT_READ,
    EPT_VIOLATION_PROT_WRITE,
)
from pyvmx.kvm.mmu import ept_violation_error_code
from pyvmx.kvm.mmu.page_fault import (
    PFERR_FETCH_MASK,
    PFERR_GUEST_FINAL_MASK,
    PFERR_GUEST_PAGE_MASK,
    PFERR_PRESENT_MASK,
    PFERR_USER_MASK,
    PFERR_WRITE_MASK,
)
from pyvmx.kvm.mmu.spte import (
    EPT_SPTE_HOST_WRITABLE,
    EPT_SPTE_MMU_WRITABLE,
    MMIO_SPTE_GEN_MASK,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    SPTE_MMU_PRESENT_MASK,
    get_mmio_spte_gfn,
    get_mmio_spte_generation,
    is_mmio_spte,
    is_shadow_present_pte,
    make_mmio_spte,
    make_small_spte,
    make_spte,
    spte_to_pfn,
)
from pyvmx.vmx.ept import ept_walk
from pyvmx.vmx.faults import EptMisconfig
from pyvmx.vmx.memory import PageAllocator, PhysicalMemory
from pyvmx.vmx.paging import Access

R, W, X = EPT_VIOLATION_ACC_READ, EPT_VIOLATION_ACC_WRITE, EPT_VIOLATION_ACC_INSTR
GLA = EPT_VIOLATION_GVA_IS_VALID
FINAL = EPT_VIOLATION_GVA_TRANSLATED


@pytest.mark.parametrize(
    ("qualification", "error_code"),
    [
        (R | GLA | FINAL, PFERR_USER_MASK | PFERR_GUEST_FINAL_MASK),
        (W | GLA | FINAL, PFERR_WRITE_MASK | PFERR_GUEST_FINAL_MASK),
        (X | GLA | FINAL, PFERR_FETCH_MASK | PFERR_GUEST_FINAL_MASK),
        (R | W | GLA, PFERR_USER_MASK | PFERR_WRITE_MASK | PFERR_GUEST_PAGE_MASK),  # guest page walk, A/D on
        (W | EPT_VIOLATION_PROT_READ | GLA | FINAL, PFERR_WRITE_MASK | PFERR_PRESENT_MASK | PFERR_GUEST_FINAL_MASK),
        (W | EPT_VIOLATION_PROT_WRITE, PFERR_WRITE_MASK | PFERR_PRESENT_MASK),  # no linear address: neither
        (R, PFERR_USER_MASK),
    ],
)
def test_ept_violation_error_code(qualification: int, error_code: int) -> None:
    """arch/x86/kvm/vmx/common.h __vmx_handle_ept_violation(): qualification bits 0-2 -> USER
    (read) / WRITE / FETCH, bits 3-5 -> PRESENT, bits 7/8 -> GUEST_FINAL or GUEST_PAGE (SDM
    28.2.1 Table 28-7)."""
    assert ept_violation_error_code(qualification) == error_code


@given(gfn=st.integers(0, (1 << 34) - 1), gen=st.integers(0, 2**64 - 1))
def test_mmio_spte_round_trips_gfn_and_generation(gfn: int, gen: int) -> None:
    """spte.c make_mmio_spte() / spte.h get_mmio_spte_generation(): the 19-bit generation is
    split over bits 10:3 and 62:52 and comes back intact, and so does the gfn; the marker is
    write+execute without read and never looks shadow-present."""
    spte = make_mmio_spte(gfn, gen)
    assert is_mmio_spte(spte) and not is_shadow_present_pte(spte)
    assert spte & 0b111 == 0b110
    assert get_mmio_spte_generation(spte) == gen & MMIO_SPTE_GEN_MASK
    assert get_mmio_spte_gfn(spte) == gfn


def test_mmio_spte_is_an_ept_misconfiguration_for_the_machine() -> None:
    """vmx.c kvm_mmu_set_ept_masks(): the MMIO value (W without R) makes the processor raise an
    EPT misconfiguration (SDM 29.3.3.1), checked with the machine's own EPT walk."""
    memory = PhysicalMemory(1 << 20)
    pages = PageAllocator(memory, 0x1000)
    tables = [int(pages.alloc_page()) for _ in range(4)]
    for parent, child in zip(tables, tables[1:]):
        memory.write64(parent, child | SPTE_MMU_PRESENT_MASK | 7)
    memory.write64(tables[3] + 5 * 8, make_mmio_spte(5, 1234))
    with pytest.raises(EptMisconfig):
        ept_walk(memory, tables[0] | 6 | 3 << 3, 5 << 12, Access.READ)


def test_make_spte_bits() -> None:
    """spte.c make_spte() for EPT: R+X always, W only when writable (then dirty, with the A/D
    bits on), WB memory type with IPAT (vmx_get_mt_mask()), bit 7 above 4K, the host- and
    MMU-writable software bits 57/58, accessed unless prefetched."""
    leaf = make_spte(0x1234, PG_LEVEL_4K, writable=True, host_writable=True)
    assert leaf & 7 == 7 and leaf >> 3 & 7 == 6 and leaf & VMX_EPT_IPAT_BIT
    assert leaf & (1 << 8) and leaf & (1 << 9) and not leaf & VMX_EPT_LARGE_PAGE_BIT
    assert leaf & EPT_SPTE_HOST_WRITABLE and leaf & EPT_SPTE_MMU_WRITABLE
    assert spte_to_pfn(leaf) == 0x1234
    ro = make_spte(0x200, PG_LEVEL_2M, writable=False, host_writable=False, prefetch=True)
    assert ro & 7 == 0b101 and ro & VMX_EPT_LARGE_PAGE_BIT
    assert not ro & (EPT_SPTE_MMU_WRITABLE | (1 << 8) | (1 << 9))


def test_split_spte_keeps_bits_and_drops_page_size_at_4k() -> None:
    """tdp_mmu.c tdp_mmu_split_huge_page() / spte.c make_small_spte(): child i maps the i-th
    4K frame with the huge SPTE's permissions; bit 7 goes."""
    huge = make_spte(0x400, PG_LEVEL_2M, writable=False, host_writable=True)
    child = make_small_spte(huge, PG_LEVEL_2M, 7)
    assert spte_to_pfn(child) == 0x407
    assert child & ~(VMX_EPT_LARGE_PAGE_BIT | ((1 << 52) - 1) & ~0xFFF) == huge & ~(
        VMX_EPT_LARGE_PAGE_BIT | ((1 << 52) - 1) & ~0xFFF
    )
