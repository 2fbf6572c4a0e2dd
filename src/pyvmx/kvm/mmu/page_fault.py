"""The records of the page-fault path: ``struct kvm_page_fault``, the RET_PF_* results, and the
#PF-style error code KVM derives from an EPT-violation exit qualification.

Linux: arch/x86/kvm/mmu/mmu_internal.h (struct kvm_page_fault, enum ret_pf_*,
kvm_mmu_do_page_fault()), arch/x86/kvm/vmx/common.h (__vmx_handle_ept_violation()),
arch/x86/include/asm/kvm_host.h (PFERR_*_MASK). SDM Vol. 3 28.2.1 Table 28-7 (EPT-violation
exit qualification), 4.7 Figure 4-12 (#PF error code).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from pyvmx.arch.qualifications import (
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
    EPT_VIOLATION_PROT_MASK,
)
from pyvmx.arch.x86 import PageFaultErrorCode
from pyvmx.kvm.host_mm import NotResident
from pyvmx.kvm.memslots import MemorySlot
from pyvmx.kvm.mmu.spte import KVM_MAX_HUGEPAGE_LEVEL, PAGE_SHIFT, PG_LEVEL_4K

# asm/kvm_host.h
PFERR_PRESENT_MASK = int(PageFaultErrorCode.PRESENT)
PFERR_WRITE_MASK = int(PageFaultErrorCode.WRITE)
PFERR_USER_MASK = int(PageFaultErrorCode.USER)
PFERR_RSVD_MASK = int(PageFaultErrorCode.RSVD)
PFERR_FETCH_MASK = int(PageFaultErrorCode.FETCH)
PFERR_GUEST_FINAL_MASK = int(PageFaultErrorCode.GUEST_FINAL)
PFERR_GUEST_PAGE_MASK = int(PageFaultErrorCode.GUEST_PAGE)
PFERR_IMPLICIT_ACCESS = int(PageFaultErrorCode.IMPLICIT_ACCESS)

KVM_PFN_NOSLOT = -1
"""``KVM_PFN_NOSLOT``: the gfn has no memslot (MMIO)."""


class RetPf(enum.Enum):
    """``enum ret_pf`` (mmu_internal.h): what a page-fault handler tells its caller.

    CONTINUE: so far so good, keep handling. RETRY: let the vCPU re-enter the guest and fault
    again (nothing was fixed: a racing update, an async page-in). EMULATE: the instruction must
    be emulated (MMIO, or a write to a read-only memslot). INVALID: this step could not decide
    (the MMIO-SPTE check found a stale marker) -- or, as the final result, the fault could not
    be handled at all (Linux returns -EFAULT/-EIO from KVM_RUN; see PageFaultOutcome.error).
    FIXED: an SPTE was installed or made writable. SPURIOUS: the SPTE already allowed the access
    (another vCPU or a lazily flushed TLB)."""

    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    INVALID = 3
    FIXED = 4
    SPURIOUS = 5


def ept_violation_error_code(qualification: int) -> int:
    """The error code ``__vmx_handle_ept_violation()`` (vmx/common.h) hands to
    kvm_mmu_page_fault(), from the EPT-violation exit qualification (SDM 28.2.1, Table 28-7):

    * bit 0 (data read)          -> PFERR_USER_MASK (sic: Linux's encoding of "read")
    * bit 1 (data write)         -> PFERR_WRITE_MASK
    * bit 2 (instruction fetch)  -> PFERR_FETCH_MASK
    * bits 5:3 (any of R/W/X was allowed: the entry was present) -> PFERR_PRESENT_MASK
    * bit 7 (guest-linear address valid): bit 8 set -> PFERR_GUEST_FINAL_MASK (the access was
      to the translated address), clear -> PFERR_GUEST_PAGE_MASK (to a guest paging structure).

    Linux tests bit 7 in the *error code* being built (``if (error_code &
    EPT_VIOLATION_GVA_IS_VALID)``), which can never be set there; the intent -- and what this
    function does -- is to test the qualification."""
    error_code = PFERR_USER_MASK if qualification & EPT_VIOLATION_ACC_READ else 0
    if qualification & EPT_VIOLATION_ACC_WRITE:
        error_code |= PFERR_WRITE_MASK
    if qualification & EPT_VIOLATION_ACC_INSTR:
        error_code |= PFERR_FETCH_MASK
    if qualification & EPT_VIOLATION_PROT_MASK:
        error_code |= PFERR_PRESENT_MASK
    if qualification & EPT_VIOLATION_GVA_IS_VALID:
        error_code |= PFERR_GUEST_FINAL_MASK if qualification & EPT_VIOLATION_GVA_TRANSLATED else PFERR_GUEST_PAGE_MASK
    return error_code


@dataclass(slots=True)
class KvmPageFault:
    """``struct kvm_page_fault``: one record carried through the fault path, step to step.

    The first group is the input (from kvm_mmu_do_page_fault()), the second is derived from the
    memslots, the third is the output of kvm_mmu_faultin_pfn()."""

    addr: int
    error_code: int
    prefetch: bool = False
    exec: bool = False
    write: bool = False
    present: bool = False
    rsvd: bool = False
    user: bool = False
    # The largest page this fault may map, the largest the slot and host mapping allow
    # (kvm_mmu_max_mapping_level()), and the level it will map (kvm_mmu_hugepage_adjust()).
    max_level: int = KVM_MAX_HUGEPAGE_LEVEL
    req_level: int = PG_LEVEL_4K
    goal_level: int = PG_LEVEL_4K
    huge_page_disallowed: bool = False
    gfn: int = 0
    slot: MemorySlot | None = None
    # kvm_mmu_faultin_pfn()
    mmu_seq: int = 0
    pfn: int = KVM_PFN_NOSLOT
    hva: int | None = None
    map_writable: bool = False
    host_level: int = PG_LEVEL_4K

    @classmethod
    def from_error_code(cls, addr: int, error_code: int, *, prefetch: bool = False, max_level: int = KVM_MAX_HUGEPAGE_LEVEL) -> KvmPageFault:
        """As kvm_mmu_do_page_fault() fills it in for a direct (TDP) MMU."""
        return cls(
            addr=addr,
            error_code=error_code,
            prefetch=prefetch,
            exec=bool(error_code & PFERR_FETCH_MASK),
            write=bool(error_code & PFERR_WRITE_MASK),
            present=bool(error_code & PFERR_PRESENT_MASK),
            rsvd=bool(error_code & PFERR_RSVD_MASK),
            user=bool(error_code & PFERR_USER_MASK),
            max_level=max_level,
            gfn=addr >> PAGE_SHIFT,
        )

    def __str__(self) -> str:
        access = "fetch" if self.exec else "write" if self.write else "read"
        return (
            f"#NPF gpa={self.addr:#x} {access}{' present' if self.present else ''}"
            f"{' rsvd' if self.rsvd else ''} slot={'-' if self.slot is None else self.slot.slot} "
            f"goal=L{self.goal_level}"
        )


@dataclass(frozen=True, slots=True)
class PageFaultOutcome:
    """What :meth:`TdpMmu.page_fault` did: the RET_PF_* ``result``, the ``fault`` record;
    ``mmio`` when the result is EMULATE because the access is MMIO (no memslot, or a write to a
    read-only memslot); ``not_resident`` when the host page was swapped out and an asynchronous
    page fault was set up instead of waiting (result RETRY), with ``async_pf`` whatever the
    async-PF hook returned; ``error`` the cause when the fault could not be handled at all
    (result INVALID: Linux's -EFAULT from KVM_RUN, e.g. a memslot over unmapped host memory)."""

    result: RetPf
    fault: KvmPageFault
    mmio: bool = False
    not_resident: NotResident | None = None
    async_pf: object | None = None
    error: Exception | None = None

    @property
    def gpa(self) -> int:
        return self.fault.addr


AsyncPfHook = Callable[[KvmPageFault, NotResident], object | None]
"""Called by the fault path when the host page is swapped out and the fault is not a prefetch:
return a non-None value (the vCPU's async-PF work, a token ...) if an asynchronous page fault
was set up (``kvm_arch_setup_async_pf()``) or the vCPU should halt until the page is in
(KVM_REQ_APF_HALT) -- the fault then ends in RETRY -- or None to page in synchronously."""
