"""The TDP MMU: EPT tables built in host memory on demand, as Linux's arch/x86/kvm/mmu/mmu.c
(the fault path) and tdp_mmu.c (the tables) do for a VM with EPT.

The fault path, step by step, one :class:`KvmPageFault` record passed along (seed 004 is the
same shape, stopping at todo!() where this goes on):

1. :meth:`TdpMmu.page_fault` -- ``kvm_mmu_page_fault()``: a reserved-bit fault (an EPT
   misconfiguration on an MMIO SPTE) is checked against the marker first
   (``handle_mmio_page_fault()``); everything else, and a stale marker, goes to
2. ``kvm_mmu_do_page_fault()``: the record is filled in from the error code, the gfn and its
   memslot; pf_taken is counted; then ``kvm_tdp_mmu_page_fault()``:
3. ``fast_page_fault()``: a write to a present SPTE that is only write-protected (dirty logging)
   is fixed by setting W without the slow path (pf_fast), and an access the SPTE already allows
   is SPURIOUS;
4. ``kvm_mmu_faultin_pfn()``: no memslot -> MMIO (CONTINUE with no pfn, the map step installs
   an MMIO SPTE and the result is EMULATE); an INVALID memslot (being deleted or moved) -> RETRY;
   a write to a read-only memslot -> EMULATE (the emulator treats it as MMIO); otherwise the host
   page through :meth:`HostMm.get_user_page` -- a swapped-out page goes to the async-PF hook
   (RETRY) or is paged in synchronously;
5. ``is_page_fault_stale()``: an MMU-notifier invalidation since step 4 -> RETRY;
6. ``kvm_tdp_mmu_map()``: ``kvm_mmu_hugepage_adjust()`` picks the level (2 MBytes -- or 1 GByte
   -- when the memslot covers the whole aligned range, gfn and hva agree modulo the page size,
   dirty logging is off, and the host maps the hva with a huge page:
   ``kvm_mmu_max_mapping_level()``/``host_pfn_mapping_level()``); the walk links missing tables
   and splits a huge page in the way; ``tdp_mmu_map_handle_target_level()`` writes the leaf --
   FIXED, or SPURIOUS when the SPTE is already what it would write.

Teardown: a memslot DELETE or MOVE zaps the old range in the prepare phase
(``kvm_arch_flush_shadow_memslot()``); a host invalidation (MMU notifier) zaps the gfns of every
slot over the hva range (``kvm_unmap_gfn_range()``); both then call the ``invept`` callback
(``kvm_flush_remote_tlbs()``). Table pages left empty by a zap are freed at once; Linux keeps
them until the root goes away -- freeing them here keeps the tables equal to what is mapped.

Dirty logging: turning KVM_MEM_LOG_DIRTY_PAGES on splits huge pages and write-protects the slot
(``kvm_mmu_slot_apply_flags()``, eager split); a write then takes the fast path, which makes the
SPTE writable and marks the page dirty; a read fault in a logging slot maps the page read-only
(as arm64 KVM does; x86 maps it writable and marks it dirty) so that the bitmap holds exactly the
pages written. Clearing dirty bits write-protects the pages again (the memslots' reprotect
listener, ``kvm_arch_mmu_enable_log_dirty_pt_masked()``). Turning logging off zaps the 4-KByte
mappings that could be huge again (``kvm_mmu_zap_collapsible_sptes()``).

Not modelled: shadow paging (the MMU is TDP-only), the SMM address space (one MMU serves one
address space), NX huge pages (the iTLB-multihit workaround), PML, concurrency (mmu_lock,
frozen SPTEs, RCU), the MMIO-info cache of the vCPU.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyvmx.arch.controls import VMX_EPTP_AD_ENABLE_BIT, VMX_EPTP_MT_WB, VMX_EPTP_PWL_4
from pyvmx.kvm.host_mm import HPAGE_SIZE, HostMemoryError, HostMm, NotResident
from pyvmx.kvm.memslots import (
    KVM_ADDRESS_SPACE_NUM,
    KVM_MEM_LOG_DIRTY_PAGES,
    MemorySlot,
    MemslotChange,
    MemslotPhase,
    Memslots,
)
from pyvmx.kvm.mmu.page_fault import (
    KVM_PFN_NOSLOT,
    AsyncPfHook,
    PFERR_GUEST_FINAL_MASK,
    PFERR_IMPLICIT_ACCESS,
    PFERR_RSVD_MASK,
    KvmPageFault,
    PageFaultOutcome,
    RetPf,
)
from pyvmx.kvm.mmu.spte import (
    KVM_MAX_HUGEPAGE_LEVEL,
    MMIO_SPTE_GEN_MASK,
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT64_ROOT_4LEVEL,
    PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_ENT_PER_PAGE,
    check_rwx_reduced,
    get_mmio_spte_generation,
    gfn_round_for_level,
    is_access_allowed,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_mmio_spte,
    make_nonleaf_spte,
    make_small_spte,
    make_spte,
    pages_per_hpage,
    spte_index,
    spte_to_pfn,
    spte_write_protect,
)
from pyvmx.vmx.memory import PageAllocator, PhysicalMemory

_TABLE = struct.Struct(f"<{SPTE_ENT_PER_PAGE}Q")
_PAGE_STAT = {PG_LEVEL_4K: "pages_4k", PG_LEVEL_2M: "pages_2m", PG_LEVEL_1G: "pages_1g"}
STAT_NAMES = (
    "pf_taken",
    "pf_fixed",
    "pf_emulate",
    "pf_spurious",
    "pf_fast",
    "pf_mmio_spte_created",
    "pf_guest",
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "tdp_mmu_pages",
    "mmu_shadow_zapped",
    "remote_tlb_flush",
)
"""The counters in :attr:`TdpMmu.stats`: the vCPU statistics of the fault path (virt/kvm stats
``pf_*``; pf_guest counts #PFs injected into the guest -- here the async ones), the VM's
``pages_4k/2m/1g`` (leaf SPTEs present per level), the table pages in use besides the root, the
table pages freed, and the TLB flushes requested (``remote_tlb_flush``)."""


@dataclass(eq=False, slots=True)
class KvmMmuPage:
    """``struct kvm_mmu_page`` of the TDP MMU: one table page. ``spt`` is its host-physical
    address, ``gfn`` the first gfn it translates, ``parent``/``parent_index`` the entry that
    points at it (None for the root), ``used`` how many of its entries are not zero."""

    spt: int
    level: int
    gfn: int
    parent: KvmMmuPage | None
    parent_index: int
    used: int = 0


@dataclass(slots=True)
class _Extras:
    """What a fault learnt on the way that the result alone does not say."""

    mmio: bool = False
    not_resident: NotResident | None = None
    async_pf: object | None = None
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class MappedLeaf:
    """One leaf SPTE: guest frames ``[gfn, gfn + pages)`` -> host frames from ``pfn``."""

    gfn: int
    level: int
    spte: int
    address: int  # host-physical address of the SPTE

    @property
    def pages(self) -> int:
        return pages_per_hpage(self.level)

    @property
    def pfn(self) -> int:
        return spte_to_pfn(self.spte)

    @property
    def mmio(self) -> bool:
        return is_mmio_spte(self.spte)


class TdpMmu:
    """The TDP MMU of one VM (one address space); see the module docstring.

    ``memory``/``allocator``: host-physical memory and where table pages come from.
    ``memslots``/``host_mm``: the VM's memslots and the VMM's address space; the MMU listens to
    both. ``invept``: called after SPTEs were zapped or write-protected (flush the EPT-derived
    translations of every vCPU: INVEPT). ``huge_pages``: allow huge leaves -- 2 MBytes; 1 GByte
    is coded (KVM_MAX_HUGEPAGE_LEVEL) but needs a 1-GByte host mapping, which HostMm never makes.
    ``maxphyaddr``: the processor's; gfns above it cannot be mapped (MMIO without a marker).
    """

    def __init__(
        self,
        memory: PhysicalMemory,
        allocator: PageAllocator,
        memslots: Memslots,
        host_mm: HostMm,
        invept: Callable[[], None] | None = None,
        huge_pages: bool = True,
        *,
        maxphyaddr: int = 46,
        as_id: int = 0,
    ) -> None:
        if not 0 <= as_id < KVM_ADDRESS_SPACE_NUM:
            raise ValueError(f"address space {as_id} is not below {KVM_ADDRESS_SPACE_NUM}")
        self.memory = memory
        self.allocator = allocator
        self.memslots = memslots
        self.host_mm = host_mm
        self.invept = invept
        self.huge_pages = huge_pages
        self.maxphyaddr = maxphyaddr
        self.max_gfn = (1 << (maxphyaddr - PAGE_SHIFT)) - 1
        self.as_id = as_id
        self.max_level = KVM_MAX_HUGEPAGE_LEVEL if huge_pages else PG_LEVEL_4K
        self._stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._pages: dict[int, KvmMmuPage] = {}
        self._root = KvmMmuPage(int(allocator.alloc_page()), PT64_ROOT_4LEVEL, 0, None, 0)
        self._pages[self._root.spt] = self._root
        # mmu_notifier bookkeeping (kvm->mmu_invalidate_seq / _in_progress / _range_*).
        self._mmu_invalidate_seq = 0
        self._mmu_invalidate_in_progress = 0
        self._mmu_invalidate_range = (0, 0)
        self._mmio_generation = self._current_mmio_generation()
        self._tracked: Counter[int] = Counter()  # gfn -> trackers (kvm_page_track, for every access)
        memslots.add_listener(self._on_memslot_update)
        memslots.add_reprotect_listener(self._on_reprotect)
        host_mm.add_invalidate_listener(self._on_host_invalidate)
        self._closed = False

    # --- public ----------------------------------------------------------------------------------
    @property
    def eptp(self) -> int:
        """The EPT pointer for the VMCS (SDM 25.6.11): the root, write-back paging structures,
        page-walk length 4, accessed/dirty flags on (construct_eptp())."""
        return self._root.spt | VMX_EPTP_MT_WB | VMX_EPTP_PWL_4 | VMX_EPTP_AD_ENABLE_BIT

    @property
    def root(self) -> int:
        """Host-physical address of the EPT PML4 table."""
        return self._root.spt

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of the counters (see :data:`STAT_NAMES`)."""
        return dict(self._stats)

    def account_guest_page_fault(self) -> None:
        """Count a #PF injected into the guest (kvm_inject_page_fault(): ``pf_guest``)."""
        self._stats["pf_guest"] += 1

    def page_fault(
        self, gpa: int, error_code: int, *, prefetch: bool = False, async_pf: AsyncPfHook | None = None
    ) -> PageFaultOutcome:
        """``kvm_mmu_page_fault()`` for a TDP MMU: handle an EPT violation (``error_code`` from
        :func:`ept_violation_error_code`) or, with PFERR_RSVD_MASK, an EPT misconfiguration.
        ``prefetch``: not a guest access (async-PF completion, KVM_PRE_FAULT_MEMORY): not counted
        as taken, never asynchronous. ``async_pf``: see :data:`AsyncPfHook`."""
        self._check_open()
        error_code &= ~PFERR_IMPLICIT_ACCESS
        extras = _Extras()
        if error_code & PFERR_RSVD_MASK:
            r = self._handle_mmio_page_fault(gpa)
            if r is not RetPf.INVALID:
                fault = KvmPageFault.from_error_code(gpa, error_code, prefetch=prefetch, max_level=self.max_level)
                return PageFaultOutcome(r, fault, mmio=r is RetPf.EMULATE)
        fault, r = self._do_page_fault(gpa, error_code, prefetch, async_pf, extras)
        return PageFaultOutcome(r, fault, extras.mmio, extras.not_resident, extras.async_pf, extras.error)

    def handle_ept_misconfig(self, gpa: int) -> PageFaultOutcome:
        """``handle_ept_misconfig()``: kvm_mmu_page_fault(gpa, PFERR_RSVD_MASK). EMULATE (mmio)
        for a current MMIO marker; a stale one (memslots changed since it was made) goes down
        the normal path, which maps the page or makes a fresh marker."""
        return self.page_fault(gpa, PFERR_RSVD_MASK)

    def pre_fault_memory(self, gpa: int, size: int) -> int:
        """KVM_PRE_FAULT_MEMORY (kvm_arch_vcpu_pre_fault_memory() -> kvm_tdp_map_page()): map
        ``[gpa, gpa + size)`` as prefetch faults; returns how many faults were taken."""
        taken = 0
        address, end = gpa & ~0xFFF, gpa + size
        while address < end:
            outcome = self.page_fault(address, PFERR_GUEST_FINAL_MASK, prefetch=True)
            taken += 1
            level = outcome.fault.goal_level if outcome.result in (RetPf.FIXED, RetPf.SPURIOUS) else PG_LEVEL_4K
            step = pages_per_hpage(level) << PAGE_SHIFT
            address = (address & -step) + step
        return taken

    def zap_all(self) -> None:
        """``kvm_mmu_zap_all()``: remove every mapping and table (the root stays), flush."""
        self._check_open()
        if self._zap_range(self._root, 0, pages_per_hpage(PT64_ROOT_4LEVEL + 1), mmio=True):
            self._flush()

    def zap_gfn_range(self, gfn_start: int, gfn_end: int) -> None:
        """``kvm_zap_gfn_range()``: remove the mappings of ``[gfn_start, gfn_end)`` -- a huge
        page that overlaps the range goes whole -- and flush if anything was mapped."""
        self._check_open()
        if self._zap_range(self._root, gfn_start, gfn_end, mmio=True):
            self._flush()

    # --- page tracking (kvm_page_track) -------------------------------------------------------------
    def track_gfn(self, gfn: int) -> None:
        """Make every access to ``gfn`` an EPT violation the hypervisor gives to the user (a gdb
        watchpoint): its mapping goes (a huge page holding it too, then remapped in 4-KByte
        pages around it: no huge page may cover a tracked gfn, as kvm_write_track_add_gfn()
        disallows them) and comes back only while the tracking is off."""
        self._check_open()
        self._tracked[gfn] += 1
        self.zap_gfn_range(gfn, gfn + 1)

    def untrack_gfn(self, gfn: int) -> None:
        if self._tracked[gfn] <= 1:
            del self._tracked[gfn]
        else:
            self._tracked[gfn] -= 1

    def is_tracked(self, gfn: int) -> bool:
        return gfn in self._tracked

    def _tracked_in(self, start: int, end: int) -> bool:
        return any(start <= gfn < end for gfn in self._tracked)

    def leaves(self) -> Iterator[MappedLeaf]:
        """Every leaf SPTE (present or MMIO), lowest gfn first."""
        yield from self._leaves(self._root)

    def spte(self, gpa: int) -> tuple[int, int]:
        """The last SPTE the walk for ``gpa`` reaches and its level (0 if none is there)."""
        gfn = gpa >> PAGE_SHIFT
        sp = self._root
        while True:
            spte = self.memory.read64(sp.spt + spte_index(gfn, sp.level) * 8)
            if not is_shadow_present_pte(spte) or is_last_spte(spte, sp.level):
                return spte, sp.level
            sp = self._pages[spte & SPTE_BASE_ADDR_MASK]

    def close(self) -> None:
        """Zap everything, free the root, and stop listening (kvm_mmu_uninit_tdp_mmu())."""
        if self._closed:
            return
        self.zap_all()
        self.memslots.remove_listener(self._on_memslot_update)
        reprotect = getattr(self.memslots, "remove_reprotect_listener", None)
        if reprotect is not None:
            reprotect(self._on_reprotect)
        else:  # Memslots has no remove_reprotect_listener() yet
            self.memslots._reprotect_listeners.remove(self._on_reprotect)
        self.host_mm.remove_invalidate_listener(self._on_host_invalidate)
        self.allocator.free_page(self._root.spt)
        self._closed = True

    def __repr__(self) -> str:
        s = self._stats
        return (
            f"TdpMmu(root={self._root.spt:#x}, {s['pages_4k']} 4K / {s['pages_2m']} 2M / "
            f"{s['pages_1g']} 1G leaves, {s['tdp_mmu_pages']} tables)"
        )

    # --- the fault path (mmu.c) ---------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the MMU has been closed")

    def _handle_mmio_page_fault(self, gpa: int) -> RetPf:
        """``handle_mmio_page_fault()``: EMULATE on a current MMIO SPTE, INVALID on a stale one
        (the caller re-faults), RETRY if the SPTE was zapped meanwhile."""
        spte, _ = self.spte(gpa)
        if is_mmio_spte(spte):
            if not self._check_mmio_spte(spte):
                return RetPf.INVALID
            return RetPf.EMULATE
        return RetPf.RETRY

    def _check_mmio_spte(self, spte: int) -> bool:
        """``check_mmio_spte()``: the marker's generation is the memslots' (and no update is
        in progress)."""
        gen = self.memslots.memslots_generation(self.as_id)
        if gen >> 63:
            return False
        return (gen & MMIO_SPTE_GEN_MASK) == get_mmio_spte_generation(spte)

    def _do_page_fault(
        self, gpa: int, error_code: int, prefetch: bool, async_pf: AsyncPfHook | None, extras: _Extras
    ) -> tuple[KvmPageFault, RetPf]:
        """``kvm_mmu_do_page_fault()``: build the record, count, handle."""
        fault = KvmPageFault.from_error_code(gpa, error_code, prefetch=prefetch, max_level=self.max_level)
        fault.slot = self.memslots.gfn_to_memslot(fault.gfn, self.as_id)
        stats = self._stats
        if not prefetch:
            stats["pf_taken"] += 1
        r = self._tdp_mmu_page_fault(fault, async_pf, extras)
        if r is RetPf.FIXED:
            stats["pf_fixed"] += 1
        elif prefetch:
            pass
        elif r is RetPf.EMULATE:
            stats["pf_emulate"] += 1
        elif r is RetPf.SPURIOUS:
            stats["pf_spurious"] += 1
        return fault, r

    def _tdp_mmu_page_fault(self, fault: KvmPageFault, async_pf: AsyncPfHook | None, extras: _Extras) -> RetPf:
        """``kvm_tdp_mmu_page_fault()``."""
        r = self._fast_page_fault(fault)
        if r is not RetPf.INVALID:
            return r
        r = self._faultin_pfn(fault, async_pf, extras)
        if r is not RetPf.CONTINUE:
            return r
        if self._is_page_fault_stale(fault):
            return RetPf.RETRY
        r = self._tdp_mmu_map(fault)
        if r is RetPf.EMULATE:
            extras.mmio = True
        return r

    @staticmethod
    def _page_fault_can_be_fast(fault: KvmPageFault) -> bool:
        """``page_fault_can_be_fast()`` with A/D bits enabled: only a write to a present SPTE
        (a write-protection fault) -- never a reserved-bit (MMIO) fault."""
        if fault.rsvd:
            return False
        if not fault.present:
            return False  # "return !kvm_ad_enabled": A/D bits are on
        return fault.write

    def _fast_page_fault(self, fault: KvmPageFault) -> RetPf:
        """``fast_page_fault()``: SPURIOUS if the last SPTE already allows the access; FIXED if
        setting W on an MMU-writable SPTE allows it (and then the page is dirty). A huge SPTE in
        a logging slot is left to the slow path, which splits it."""
        if not self._page_fault_can_be_fast(fault):
            return RetPf.INVALID
        ret = RetPf.INVALID
        sp, index, spte = self._last_sptep(fault.gfn)
        if is_shadow_present_pte(spte) and is_last_spte(spte, sp.level):
            if is_access_allowed(fault.write, fault.exec, spte):
                ret = RetPf.SPURIOUS
            else:
                new_spte = spte
                if fault.write and is_mmu_writable_spte(spte):
                    new_spte |= PT_WRITABLE_MASK
                    if sp.level > PG_LEVEL_4K and fault.slot is not None and fault.slot.dirty_logging:
                        new_spte = spte
                if new_spte != spte and is_access_allowed(fault.write, fault.exec, new_spte):
                    # fast_pf_fix_direct_spte(): no dirty *bit* here, the bitmap instead.
                    self._set_spte(sp, index, spte, new_spte)
                    if is_writable_pte(new_spte) and not is_writable_pte(spte):
                        self.memslots.mark_page_dirty(fault.slot, fault.gfn)
                    ret = RetPf.FIXED
        if ret is not RetPf.INVALID:
            self._stats["pf_fast"] += 1
        return ret

    def _faultin_pfn(self, fault: KvmPageFault, async_pf: AsyncPfHook | None, extras: _Extras) -> RetPf:
        """``kvm_mmu_faultin_pfn()`` and ``__kvm_mmu_faultin_pfn()``."""
        fault.mmu_seq = self._mmu_invalidate_seq
        slot = fault.slot
        if slot is None:
            r = self._handle_noslot_fault(fault)
            extras.mmio = r is RetPf.EMULATE
            return r
        # "Retry the page fault if the gfn hit a memslot that is being deleted or moved."
        if slot.invalid:
            return RetPf.RETRY
        if self._mmu_invalidate_retry_gfn(fault.mmu_seq, fault.gfn, unsafe=True):
            return RetPf.RETRY
        hva = slot.gfn_to_hva(fault.gfn)
        fault.hva = hva
        if slot.readonly and fault.write:
            # __gfn_to_pfn_memslot() -> KVM_PFN_ERR_RO_FAULT; kvm_handle_error_pfn() -> EMULATE.
            extras.mmio = True
            return RetPf.EMULATE
        try:
            pfn = self.host_mm.get_user_page(hva, fault.write)
            if isinstance(pfn, NotResident):
                if not fault.prefetch and async_pf is not None:
                    work = async_pf(fault, pfn)
                    if work is not None:
                        extras.not_resident = pfn
                        extras.async_pf = work
                        return RetPf.RETRY
                pfn = self.host_mm.page_in_now(hva)
            host_size = self.host_mm.mapping_level(hva)
        except (HostMemoryError, MemoryError) as error:
            # KVM_PFN_ERR_FAULT -> kvm_handle_error_pfn() -> -EFAULT out of KVM_RUN.
            extras.error = error
            return RetPf.INVALID
        fault.pfn = pfn
        fault.map_writable = not slot.readonly
        fault.host_level = PG_LEVEL_2M if host_size >= HPAGE_SIZE else PG_LEVEL_4K
        return RetPf.CONTINUE

    def _handle_noslot_fault(self, fault: KvmPageFault) -> RetPf:
        """``kvm_handle_noslot_fault()``: MMIO. CONTINUE to install an MMIO SPTE, unless the gfn
        is beyond what an SPTE can hold (then EMULATE without one)."""
        fault.slot = None
        fault.pfn = KVM_PFN_NOSLOT
        fault.map_writable = False
        if fault.gfn > self.max_gfn:
            return RetPf.EMULATE
        return RetPf.CONTINUE

    def _mmu_invalidate_retry_gfn(self, mmu_seq: int, gfn: int, *, unsafe: bool = False) -> bool:
        """``mmu_invalidate_retry_gfn()``: an invalidation covering ``gfn`` is in progress, or one
        finished since ``mmu_seq`` was read."""
        if self._mmu_invalidate_in_progress:
            start, end = self._mmu_invalidate_range
            if start <= gfn < end:
                return True
        return not unsafe and self._mmu_invalidate_seq != mmu_seq

    def _is_page_fault_stale(self, fault: KvmPageFault) -> bool:
        """``is_page_fault_stale()``."""
        return fault.slot is not None and self._mmu_invalidate_retry_gfn(fault.mmu_seq, fault.gfn)

    def _max_mapping_level(self, slot: MemorySlot, gfn: int, max_level: int, host_level: int) -> int:
        """``kvm_mmu_max_mapping_level()``: the largest level at or below ``max_level`` whose page
        holding ``gfn`` the slot maps whole, with gfn and hva congruent modulo that page size
        (the slot's ``lpage_info.disallow_lpage``), capped by the host mapping level."""
        level = max_level
        while level > PG_LEVEL_4K:
            npages = pages_per_hpage(level)
            base = gfn_round_for_level(gfn, level)
            aligned = not (slot.base_gfn ^ (slot.userspace_addr >> PAGE_SHIFT)) & (npages - 1)
            if aligned and slot.base_gfn <= base and base + npages <= slot.end_gfn and not self._tracked_in(base, base + npages):
                break
            level -= 1
        return min(level, host_level)

    def _hugepage_adjust(self, fault: KvmPageFault) -> None:
        """``kvm_mmu_hugepage_adjust()``."""
        fault.huge_page_disallowed = False  # no NX-huge-page (iTLB multihit) workaround
        slot = fault.slot
        if fault.max_level == PG_LEVEL_4K or slot is None or fault.pfn == KVM_PFN_NOSLOT:
            return
        if slot.dirty_logging:
            return
        fault.req_level = self._max_mapping_level(slot, fault.gfn, fault.max_level, fault.host_level)
        if fault.req_level == PG_LEVEL_4K:
            return
        fault.goal_level = fault.req_level
        mask = pages_per_hpage(fault.goal_level) - 1
        if (fault.gfn & mask) != (fault.pfn & mask):
            raise AssertionError(f"huge page: gfn {fault.gfn:#x} and pfn {fault.pfn:#x} disagree")  # VM_BUG_ON
        fault.pfn &= ~mask

    # --- tdp_mmu.c: mapping --------------------------------------------------------------------------
    def _tdp_mmu_map(self, fault: KvmPageFault) -> RetPf:
        """``kvm_tdp_mmu_map()``: walk down to the goal level, linking tables and splitting huge
        pages on the way, then set the leaf."""
        self._hugepage_adjust(fault)
        read64 = self.memory.read64
        gfn = fault.gfn
        sp = self._root
        while True:
            level = sp.level
            index = spte_index(gfn, level)
            old = read64(sp.spt + index * 8)
            if level == fault.goal_level:
                return self._map_handle_target_level(fault, sp, index, old)
            if is_shadow_present_pte(old) and not is_large_pte(old):
                sp = self._pages[old & SPTE_BASE_ADDR_MASK]
                continue
            child = self._alloc_sp(sp, index)
            if is_shadow_present_pte(old):
                self._split_huge_page(sp, index, old, child)
            else:
                self._set_spte(sp, index, old, make_nonleaf_spte(child.spt))
            sp = child

    def _map_handle_target_level(self, fault: KvmPageFault, sp: KvmMmuPage, index: int, old: int) -> RetPf:
        """``tdp_mmu_map_handle_target_level()``."""
        slot = fault.slot
        writable = False
        if slot is None:
            new = make_mmio_spte(fault.gfn, self.memslots.memslots_generation(self.as_id), self.maxphyaddr)
        else:
            writable = fault.map_writable and (fault.write or not slot.dirty_logging)
            new = make_spte(
                fault.pfn, fault.goal_level, writable=writable, host_writable=fault.map_writable, prefetch=fault.prefetch
            )
        if new == old:
            ret = RetPf.SPURIOUS
        else:
            if self._set_spte(sp, index, old, new):
                self._flush()
            ret = RetPf.FIXED
        if writable and slot is not None and slot.dirty_logging:
            self.memslots.mark_page_dirty(slot, fault.gfn)  # make_spte(): logging is 4K-only
        if is_mmio_spte(new):
            self._stats["pf_mmio_spte_created"] += 1
            return RetPf.EMULATE
        return ret

    def _alloc_sp(self, parent: KvmMmuPage, index: int) -> KvmMmuPage:
        """``tdp_mmu_alloc_sp()`` + ``tdp_mmu_init_child_sp()``: a zeroed table one level below
        ``parent``'s entry ``index`` (not linked yet)."""
        level = parent.level - 1
        gfn = parent.gfn + index * pages_per_hpage(parent.level)
        sp = KvmMmuPage(int(self.allocator.alloc_page()), level, gfn, parent, index)
        self._pages[sp.spt] = sp
        self._stats["tdp_mmu_pages"] += 1
        return sp

    def _split_huge_page(self, sp: KvmMmuPage, index: int, huge: int, child: KvmMmuPage) -> None:
        """``tdp_mmu_split_huge_page()``: fill ``child`` with 512 SPTEs covering the huge page
        with the same permissions, then point the entry at it. The translation does not change,
        so no flush."""
        entries = [make_small_spte(huge, sp.level, i) for i in range(SPTE_ENT_PER_PAGE)]
        self.memory.write(child.spt, _TABLE.pack(*entries))
        child.used = SPTE_ENT_PER_PAGE
        if child.level in _PAGE_STAT:
            self._stats[_PAGE_STAT[child.level]] += SPTE_ENT_PER_PAGE
        self._set_spte(sp, index, huge, make_nonleaf_spte(child.spt))

    def _set_spte(self, sp: KvmMmuPage, index: int, old: int, new: int) -> bool:
        """Write an SPTE and account for the change (``tdp_mmu_set_spte()`` +
        ``handle_changed_spte()``): page counts per level, tables that are unlinked are freed
        (``handle_removed_pt()``). Returns whether the change needs a TLB flush: a present
        SPTE went away, lost a permission, or changed its target (a split changes nothing)."""
        self.memory.write64(sp.spt + index * 8, new)
        if (old != 0) != (new != 0):
            sp.used += 1 if new else -1
        level = sp.level
        was_present = is_shadow_present_pte(old)
        present = is_shadow_present_pte(new)
        was_leaf = was_present and is_last_spte(old, level)
        leaf = present and is_last_spte(new, level)
        if was_leaf != leaf:
            name = _PAGE_STAT.get(level)
            if name is not None:
                self._stats[name] += 1 if leaf else -1
        if not was_present:
            return False
        if not was_leaf:
            # A table entry: replaced by something else, the table goes (with all below it).
            if not present or (new & SPTE_BASE_ADDR_MASK) != (old & SPTE_BASE_ADDR_MASK):
                self._free_table(old & SPTE_BASE_ADDR_MASK)
                return True
            return False
        if not present:
            return True
        if not leaf:
            return False  # huge page split into a table with the same translation
        return spte_to_pfn(old) != spte_to_pfn(new) or check_rwx_reduced(old, new)

    def _free_table(self, spt: int) -> None:
        """``handle_removed_pt()``: drop the table at ``spt`` and everything below it."""
        sp = self._pages.pop(spt)
        if sp.used:
            entries = _TABLE.unpack(self.memory.read(spt, 4096))
            name = _PAGE_STAT.get(sp.level)
            for spte in entries:
                if not is_shadow_present_pte(spte):
                    continue
                if is_last_spte(spte, sp.level):
                    if name is not None:
                        self._stats[name] -= 1
                else:
                    self._free_table(spte & SPTE_BASE_ADDR_MASK)
        self.allocator.free_page(spt)
        self._stats["tdp_mmu_pages"] -= 1
        self._stats["mmu_shadow_zapped"] += 1

    def _last_sptep(self, gfn: int) -> tuple[KvmMmuPage, int, int]:
        """``kvm_tdp_mmu_fast_pf_get_last_sptep()``: the table, index and value of the last SPTE
        on the walk for ``gfn``."""
        read64 = self.memory.read64
        sp = self._root
        while True:
            index = spte_index(gfn, sp.level)
            spte = read64(sp.spt + index * 8)
            if not is_shadow_present_pte(spte) or is_last_spte(spte, sp.level):
                return sp, index, spte
            sp = self._pages[spte & SPTE_BASE_ADDR_MASK]

    def _flush(self) -> None:
        """``kvm_flush_remote_tlbs()``: INVEPT through the hypervisor's callback."""
        self._stats["remote_tlb_flush"] += 1
        if self.invept is not None:
            self.invept()

    # --- tdp_mmu.c: range operations -----------------------------------------------------------------
    def _child_range(self, sp: KvmMmuPage, start: int, end: int) -> range:
        """Indices of ``sp``'s entries that meet gfns ``[start, end)``."""
        span = pages_per_hpage(sp.level)
        first = max(0, (start - sp.gfn) // span)
        last = min(SPTE_ENT_PER_PAGE, -(-(end - sp.gfn) // span))
        return range(first, last)

    def _zap_range(self, sp: KvmMmuPage, start: int, end: int, *, mmio: bool) -> bool:
        """Zap every present leaf meeting ``[start, end)`` under ``sp`` (and MMIO SPTEs if
        ``mmio``), removing tables wholly inside the range at once and tables left empty
        afterwards (``tdp_mmu_zap_leafs()``). Returns whether a flush is needed."""
        if end <= sp.gfn or not sp.used:
            return False
        span = pages_per_hpage(sp.level)
        entries = _TABLE.unpack(self.memory.read(sp.spt, 4096))
        flush = False
        for index in self._child_range(sp, start, end):
            spte = entries[index]
            if not spte:
                continue
            if not is_shadow_present_pte(spte):
                if mmio and is_mmio_spte(spte):
                    self._set_spte(sp, index, spte, 0)
                continue
            if is_last_spte(spte, sp.level):
                flush |= self._set_spte(sp, index, spte, 0)
                continue
            gfn = sp.gfn + index * span
            child = self._pages[spte & SPTE_BASE_ADDR_MASK]
            if start <= gfn and gfn + span <= end:
                flush |= self._set_spte(sp, index, spte, 0)
                continue
            flush |= self._zap_range(child, start, end, mmio=mmio)
            if not child.used:
                self._set_spte(sp, index, spte, 0)
        return flush

    def _leaves(self, sp: KvmMmuPage, start: int = 0, end: int | None = None) -> Iterator[MappedLeaf]:
        if not sp.used:
            return
        span = pages_per_hpage(sp.level)
        entries = _TABLE.unpack(self.memory.read(sp.spt, 4096))
        indices = range(SPTE_ENT_PER_PAGE) if end is None else self._child_range(sp, start, end)
        for index in indices:
            spte = entries[index]
            if not spte:
                continue
            gfn = sp.gfn + index * span
            if is_mmio_spte(spte) or is_last_spte(spte, sp.level):
                yield MappedLeaf(gfn, sp.level, spte, sp.spt + index * 8)
            elif is_shadow_present_pte(spte):
                yield from self._leaves(self._pages[spte & SPTE_BASE_ADDR_MASK], start, end)

    def _split_huge_pages(self, start: int, end: int) -> None:
        """``kvm_tdp_mmu_try_split_huge_pages()`` to 4 KBytes over ``[start, end)``."""
        while True:
            huge = [leaf for leaf in self._leaves(self._root, start, end) if leaf.level > PG_LEVEL_4K and not leaf.mmio]
            if not huge:
                return
            for leaf in huge:
                sp = self._table_of(leaf.address)
                index = (leaf.address - sp.spt) // 8
                child = self._alloc_sp(sp, index)
                self._split_huge_page(sp, index, leaf.spte, child)

    def _table_of(self, sptep: int) -> KvmMmuPage:
        return self._pages[sptep & ~0xFFF]

    def _write_protect(self, start: int, end: int) -> bool:
        """``kvm_tdp_mmu_wrprot_slot()``: clear W on the leaves meeting ``[start, end)``."""
        flush = False
        for leaf in list(self._leaves(self._root, start, end)):
            if not leaf.mmio and is_writable_pte(leaf.spte):
                sp = self._table_of(leaf.address)
                flush |= self._set_spte(sp, (leaf.address - sp.spt) // 8, leaf.spte, spte_write_protect(leaf.spte))
        return flush

    def _zap_collapsible(self, slot: MemorySlot) -> bool:
        """``kvm_mmu_zap_collapsible_sptes()``: remove the 4-KByte tables of ranges that could be
        mapped huge again, so that the next faults map them huge."""
        if not self.huge_pages:
            return False
        flush = False
        tables = [sp for sp in self._pages.values() if sp.level == PG_LEVEL_4K and slot.contains(sp.gfn)]
        for sp in tables:
            if sp.spt not in self._pages or sp.parent is None:
                continue
            hva = slot.gfn_to_hva(sp.gfn)
            try:
                host_size = self.host_mm.mapping_level(hva)
            except HostMemoryError:
                continue
            host_level = PG_LEVEL_2M if host_size >= HPAGE_SIZE else PG_LEVEL_4K
            if self._max_mapping_level(slot, sp.gfn, PG_LEVEL_2M, host_level) < PG_LEVEL_2M:
                continue
            parent = sp.parent
            spte = self.memory.read64(parent.spt + sp.parent_index * 8)
            flush |= self._set_spte(parent, sp.parent_index, spte, 0)
        return flush

    # --- listeners ------------------------------------------------------------------------------------
    def _current_mmio_generation(self) -> int:
        return self.memslots.memslots_generation(self.as_id) & MMIO_SPTE_GEN_MASK & ~(KVM_ADDRESS_SPACE_NUM - 1)

    def _on_memslot_update(
        self, phase: MemslotPhase, change: MemslotChange, old: MemorySlot | None, new: MemorySlot | None
    ) -> None:
        target = old if old is not None else new
        if target is None or target.as_id != self.as_id:
            return
        if phase is MemslotPhase.PREPARE:
            if change in (MemslotChange.DELETE, MemslotChange.MOVE) and old is not None:
                # kvm_arch_flush_shadow_memslot(): the old range goes before the slot does.
                if self._zap_range(self._root, old.base_gfn, old.end_gfn, mmio=False):
                    self._flush()
            return
        # kvm_mmu_invalidate_mmio_sptes(): if the MMIO generation wrapped, old markers could
        # match again: zap everything.
        gen = self._current_mmio_generation()
        if gen < self._mmio_generation:
            self.zap_all()
        self._mmio_generation = gen
        if change is MemslotChange.FLAGS_ONLY and old is not None and new is not None:
            self._slot_apply_flags(old, new)

    def _slot_apply_flags(self, old: MemorySlot, new: MemorySlot) -> None:
        """``kvm_mmu_slot_apply_flags()``: dirty logging on -> split huge pages and write-protect
        (unless KVM_DIRTY_LOG_INITIALLY_SET: every page counts as dirty already); off -> let
        the slot be mapped with huge pages again."""
        if not (old.flags ^ new.flags) & KVM_MEM_LOG_DIRTY_PAGES or new.readonly:
            return
        if new.flags & KVM_MEM_LOG_DIRTY_PAGES:
            if self.memslots.manual_dirty_log_protect and self.memslots.dirty_log_initially_set:
                return
            self._split_huge_pages(new.base_gfn, new.end_gfn)
            if self._write_protect(new.base_gfn, new.end_gfn):
                self._flush()
        elif self._zap_collapsible(new):
            self._flush()

    def _on_reprotect(self, slot: MemorySlot, gfn_offset: int, mask: int) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked()``: write-protect again the pages whose
        dirty bits were just cleared (a huge page in the way is split first), then flush."""
        if slot.as_id != self.as_id:
            return
        base = slot.base_gfn + gfn_offset
        lo = base + (mask & -mask).bit_length() - 1
        hi = base + mask.bit_length()
        self._split_huge_pages(lo, hi)
        flush = False
        for leaf in list(self._leaves(self._root, lo, hi)):
            if leaf.mmio or not is_writable_pte(leaf.spte) or not mask >> (leaf.gfn - base) & 1:
                continue
            sp = self._table_of(leaf.address)
            flush |= self._set_spte(sp, (leaf.address - sp.spt) // 8, leaf.spte, spte_write_protect(leaf.spte))
        if flush:
            self._flush()

    def _on_host_invalidate(self, hva_start: int, hva_end: int) -> None:
        """``kvm_mmu_notifier_invalidate_range_start()``/``_end()``: zap every gfn backed by the
        host range, flush, and move the invalidation sequence on so that a fault that looked
        the page up before retries."""
        ranges = [
            (gfn_start, gfn_end)
            for slot, gfn_start, gfn_end in self.memslots.slots_in_hva_range(hva_start, hva_end)
            if slot.as_id == self.as_id
        ]
        if not ranges:
            return
        self._mmu_invalidate_in_progress += 1
        self._mmu_invalidate_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
        try:
            flush = False
            for gfn_start, gfn_end in ranges:
                flush |= self._zap_range(self._root, gfn_start, gfn_end, mmio=False)
            if flush:
                self._flush()
        finally:
            self._mmu_invalidate_seq += 1
            self._mmu_invalidate_in_progress -= 1
