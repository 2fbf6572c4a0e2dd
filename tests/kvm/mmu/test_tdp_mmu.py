"""The TDP MMU driven with synthetic faults (no CPU engine): what it maps, at which level, what
it counts, and what it tears down. Every EPT check uses the machine's own walk
(pyvmx.vmx.ept.ept_lookup / ept_walk) of the tables the MMU built in host memory."""

from __future__ import annotations

import pytest

from pyvmx.kvm.host_mm import HPAGE_SIZE, NotResident
from pyvmx.kvm.memslots import KVM_MEM_READONLY, MemslotPhase
from pyvmx.kvm.mmu import KvmPageFault, RetPf, ept_violation_error_code
from pyvmx.kvm.mmu.page_fault import PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK
from pyvmx.kvm.mmu.spte import PG_LEVEL_4K, is_mmio_spte
from pyvmx.vmx.ept import ept_walk
from pyvmx.vmx.faults import EptMisconfig, EptViolation
from pyvmx.vmx.paging import Access

from tests.kvm.mmu.harness import KIB4, MIB, MIB2, MmuEnv

READ = PFERR_USER_MASK  # what a read EPT violation becomes (ept_violation_error_code)
WRITE = PFERR_WRITE_MASK
WRITE_PROTECTED = PFERR_WRITE_MASK | PFERR_PRESENT_MASK


def counters(env: MmuEnv, *names: str) -> tuple[int, ...]:
    stats = env.mmu.stats
    return tuple(stats[name] for name in names)


def test_fault_fixed_then_spurious() -> None:
    """mmu.c kvm_mmu_do_page_fault() counting + tdp_mmu.c tdp_mmu_map_handle_target_level():
    the first read fault maps the page (FIXED); the same fault again finds the SPTE it would
    write (SPURIOUS); a write to the now-writable page is recognised by fast_page_fault()
    (SPURIOUS, pf_fast)."""
    env = MmuEnv.create(huge_pages=False)
    env.add_slot(0, 0, 4 * MIB)
    first = env.mmu.page_fault(0x5123, READ)
    assert first.result is RetPf.FIXED and not first.mmio
    assert first.fault.gfn == 5 and first.fault.slot is not None and first.fault.goal_level == PG_LEVEL_4K
    assert env.mmu.page_fault(0x5123, READ).result is RetPf.SPURIOUS
    assert env.mmu.page_fault(0x5FF0, WRITE_PROTECTED).result is RetPf.SPURIOUS
    assert counters(env, "pf_taken", "pf_fixed", "pf_spurious", "pf_fast", "pf_emulate") == (3, 1, 2, 1, 0)
    t = env.walk(0x5123)
    assert t is not None and t.hpa == env.hpa_of(0x5123) and t.page_size == KIB4
    assert t.readable and t.writable and t.executable and t.memory_type == 6


def test_aligned_thp_backed_slot_gets_2m_leaves() -> None:
    """mmu.c kvm_mmu_hugepage_adjust() / kvm_mmu_max_mapping_level() / host_pfn_mapping_level():
    a slot whose gfn and hva agree modulo 2M, covering the block, over a THP host mapping, is
    mapped with one 2-MByte leaf per block; every 4K page in the block is then reachable."""
    env = MmuEnv.create()
    env.add_slot(0, 4 * MIB, 8 * MIB)
    assert env.mmu.page_fault(4 * MIB + 0x3000, WRITE).result is RetPf.FIXED
    assert env.host_mm.mapping_level(env.memslots.get(0).userspace_addr) == HPAGE_SIZE  # type: ignore[union-attr]
    for offset in (0, 0x3000, MIB2 - KIB4):
        t = env.walk(4 * MIB + offset)
        assert t is not None and t.page_size == MIB2 and t.hpa == env.hpa_of(4 * MIB + offset)
    assert env.walk(6 * MIB) is None
    assert counters(env, "pages_2m", "pages_4k", "pf_fixed") == (1, 0, 1)
    # 3 tables below the root: PDPT, PD; the 2M leaf needs no page table.
    assert env.mmu.stats["tdp_mmu_pages"] == 2


@pytest.mark.parametrize(
    ("why", "offset", "size", "thp"),
    [
        ("gfn and hva disagree modulo 2M", KIB4, 8 * MIB, True),
        ("the slot covers only part of the 2M block", 0, MIB, True),
        ("the host maps the hva with 4K pages (no THP)", 0, 8 * MIB, False),
    ],
)
def test_4k_leaves_when_a_huge_page_is_not_allowed(why: str, offset: int, size: int, thp: bool) -> None:
    """mmu.c kvm_mmu_max_mapping_level(): lpage_info.disallow_lpage (misaligned slot, slot edge)
    and host_pfn_mapping_level() (4K host page) each force a 4-KByte leaf."""
    env = MmuEnv.create()
    env.add_slot(0, 0, size, huge=thp, offset=offset)
    outcome = env.mmu.page_fault(0x1000, WRITE)
    assert outcome.result is RetPf.FIXED, why
    assert outcome.fault.goal_level == PG_LEVEL_4K, why
    t = env.walk(0x1000)
    assert t is not None and t.page_size == KIB4 and t.hpa == env.hpa_of(0x1000), why
    assert env.walk(0x2000) is None, why
    assert counters(env, "pages_4k", "pages_2m") == (1, 0), why


def test_huge_pages_off_maps_4k() -> None:
    """TdpMmu(huge_pages=False): KVM_MAX_HUGEPAGE_LEVEL becomes 4K (fault->max_level)."""
    env = MmuEnv.create(huge_pages=False)
    env.add_slot(0, 0, 4 * MIB)
    assert env.mmu.page_fault(0x0, READ).fault.goal_level == PG_LEVEL_4K
    assert counters(env, "pages_4k", "pages_2m") == (1, 0)


def test_counters_match_faults_over_a_range() -> None:
    """The pf_* statistics of kvm_mmu_do_page_fault() are exact: N first touches give N taken
    and N fixed, N 4K leaves and 1 + 1 + N/512 tables below the root."""
    env = MmuEnv.create(huge_pages=False)
    env.add_slot(0, 0, 4 * MIB)
    pages = 700
    for n in range(pages):
        assert env.mmu.page_fault(n * KIB4, READ).result is RetPf.FIXED
    assert counters(env, "pf_taken", "pf_fixed", "pf_spurious", "pages_4k", "tdp_mmu_pages") == (
        pages, pages, 0, pages, 2 + 2,
    )


def test_deleted_slot_is_zapped_tables_freed_and_flushed() -> None:
    """kvm_main.c kvm_set_memslot() -> x86.c kvm_arch_flush_shadow_memslot(): in the prepare
    phase of DELETE the slot's SPTEs are zapped (table pages freed here) and the TLBs flushed
    (the invept callback); afterwards the range is MMIO."""
    env = MmuEnv.create(huge_pages=False)
    hva = env.add_slot(0, 0, 2 * MIB)
    for gpa in (0, 0x1000, 0x1F_F000):
        env.mmu.page_fault(gpa, WRITE)
    assert env.mmu.stats["tdp_mmu_pages"] == 3
    env.memslots.set_user_memory_region(0, 0, 0, 0, hva)
    for gpa in (0, 0x1000, 0x1F_F000):
        assert env.walk(gpa) is None
        with pytest.raises(EptViolation):
            ept_walk(env.memory, env.mmu.eptp, gpa, Access.READ)
    assert env.flushes == [1]
    assert counters(env, "pages_4k", "tdp_mmu_pages", "mmu_shadow_zapped", "remote_tlb_flush") == (0, 0, 3, 1)
    outcome = env.mmu.page_fault(0x1000, READ)
    assert outcome.result is RetPf.EMULATE and outcome.mmio


def test_moved_slot_is_remapped() -> None:
    """KVM_MR_MOVE: the old range is zapped in the prepare phase; faults at the new address map
    the same host pages (the slot keeps its userspace_addr)."""
    env = MmuEnv.create()
    hva = env.add_slot(0, 0, 4 * MIB)
    env.mmu.page_fault(0x3000, WRITE)
    hpa = env.hpa_of(0x3000)
    env.memslots.set_user_memory_region(0, 0, 64 * MIB, 4 * MIB, hva)
    assert env.walk(0x3000) is None and env.flushes == [1]
    assert env.mmu.page_fault(64 * MIB + 0x3000, READ).result is RetPf.FIXED
    t = env.walk(64 * MIB + 0x3000)
    assert t is not None and t.hpa == hpa
    assert env.mmu.page_fault(0x3000, READ).mmio


def test_read_only_slot_maps_reads_and_emulates_writes() -> None:
    """KVM_MEM_READONLY: a read fault maps the page without W (map_writable false); a write is
    KVM_PFN_ERR_RO_FAULT -> kvm_handle_error_pfn() -> RET_PF_EMULATE, i.e. MMIO for the
    emulator; no MMIO SPTE is made."""
    env = MmuEnv.create()
    env.add_slot(0, 0, 2 * MIB, flags=KVM_MEM_READONLY)
    assert env.mmu.page_fault(0x2000, READ).result is RetPf.FIXED
    t = env.walk(0x2000)
    assert t is not None and t.readable and not t.writable and t.executable
    write = env.mmu.page_fault(0x2000, WRITE_PROTECTED)
    assert write.result is RetPf.EMULATE and write.mmio
    assert counters(env, "pf_emulate", "pf_mmio_spte_created", "pf_fast") == (1, 0, 0)
    t = env.walk(0x2000)
    assert t is not None and not t.writable


def test_invalid_slot_during_update_retries() -> None:
    """mmu.c kvm_mmu_faultin_pfn(): "Retry the page fault if the gfn hit a memslot that is being
    deleted or moved" -- a fault racing with the update (here: from a memslot listener in the
    prepare phase) finds the KVM_MEMSLOT_INVALID copy and gets RET_PF_RETRY."""
    env = MmuEnv.create()
    hva = env.add_slot(0, 0, 2 * MIB)
    seen: list[RetPf] = []

    def racing_fault(phase, change, old, new):  # type: ignore[no-untyped-def]
        if phase is MemslotPhase.PREPARE:
            seen.append(env.mmu.page_fault(0x1000, READ).result)

    env.memslots.add_listener(racing_fault)
    env.memslots.set_user_memory_region(0, 0, 0, 0, hva)
    assert seen == [RetPf.RETRY]
    assert env.walk(0x1000) is None


def test_mmio_marker_then_misconfig_then_stale_marker_refaults() -> None:
    """mmu.c kvm_handle_noslot_fault() + tdp_mmu.c: a gfn without a slot gets an MMIO SPTE
    (EMULATE, pf_mmio_spte_created); the machine then reports an EPT misconfiguration there;
    handle_ept_misconfig() -> handle_mmio_page_fault() answers EMULATE without the slow path.
    Once a slot appears the marker's generation is stale (check_mmio_spte()) and the fault goes
    down the normal path, mapping RAM."""
    env = MmuEnv.create()
    env.add_slot(0, 0, 2 * MIB)
    gpa = 0x4000_0000 + 0x18
    first = env.mmu.page_fault(gpa, WRITE)
    assert first.result is RetPf.EMULATE and first.mmio and first.fault.slot is None
    spte, level = env.mmu.spte(gpa)
    assert is_mmio_spte(spte) and level == PG_LEVEL_4K
    with pytest.raises(EptMisconfig):
        ept_walk(env.memory, env.mmu.eptp, gpa, Access.READ)
    again = env.mmu.handle_ept_misconfig(gpa)
    assert again.result is RetPf.EMULATE and again.mmio
    assert counters(env, "pf_taken", "pf_emulate", "pf_mmio_spte_created") == (1, 1, 1)

    env.add_slot(1, 0x4000_0000, 2 * MIB)
    stale = env.mmu.handle_ept_misconfig(gpa)
    assert stale.result is RetPf.FIXED and not stale.mmio
    t = env.walk(gpa)
    assert t is not None and t.hpa == env.hpa_of(gpa)


def test_gfn_beyond_maxphyaddr_is_emulated_without_a_marker() -> None:
    """kvm_handle_noslot_fault(): gfn > kvm_mmu_max_gfn() -> RET_PF_EMULATE, no SPTE."""
    env = MmuEnv.create()
    outcome = env.mmu.page_fault(1 << 47, READ)
    assert outcome.result is RetPf.EMULATE and outcome.mmio
    assert env.mmu.stats["pf_mmio_spte_created"] == 0 and env.mmu.stats["tdp_mmu_pages"] == 0


def test_host_swap_out_zaps_through_the_mmu_notifier() -> None:
    """mmu_notifier invalidate_range_start -> kvm_unmap_gfn_range(): swapping the host page out
    removes the SPTE and flushes; the next fault brings the page back (synchronously, without
    an async-PF hook: __kvm_mmu_faultin_pfn()'s second, waiting, attempt)."""
    env = MmuEnv.create(huge_pages=False)
    hva = env.add_slot(0, 0, 2 * MIB, huge=False)
    env.mmu.page_fault(0x7000, WRITE)
    env.host_mm.write(hva + 0x7000, b"kept")
    env.host_mm.swap_out(hva + 0x7000, KIB4)
    assert env.walk(0x7000) is None and env.flushes == [1]
    assert env.mmu.page_fault(0x7000, READ).result is RetPf.FIXED
    t = env.walk(0x7000)
    assert t is not None and env.memory.read(t.hpa, 4) == b"kept"


def test_thp_split_zaps_the_2m_leaf() -> None:
    """A partial swap-out splits the host THP (split_huge_pmd -> invalidate of the whole 2M
    block): the 2M SPTE goes, and the next fault maps 4K (host level is now 4K)."""
    env = MmuEnv.create()
    hva = env.add_slot(0, 0, 4 * MIB)
    env.mmu.page_fault(0x1000, WRITE)
    assert env.mmu.stats["pages_2m"] == 1
    env.host_mm.swap_out(hva + 0x10_0000, KIB4)
    assert env.walk(0x1000) is None and env.mmu.stats["pages_2m"] == 0
    assert env.mmu.page_fault(0x1000, READ).fault.goal_level == PG_LEVEL_4K


def test_not_resident_page_goes_to_the_async_hook() -> None:
    """__kvm_mmu_faultin_pfn(): a page that needs I/O (KVM_PFN_ERR_NEEDS_IO) goes to the async
    path when the vCPU can take it (RET_PF_RETRY), and is waited for otherwise; a prefetch fault
    never goes asynchronous."""
    env = MmuEnv.create(huge_pages=False)
    hva = env.add_slot(0, 0, 2 * MIB, huge=False)
    env.mmu.page_fault(0x3000, WRITE)
    env.host_mm.swap_out(hva + 0x3000, KIB4)
    calls: list[tuple[KvmPageFault, NotResident]] = []

    def hook(fault: KvmPageFault, nr: NotResident) -> object | None:
        calls.append((fault, nr))
        return "work"

    outcome = env.mmu.page_fault(0x3000, READ, async_pf=hook)
    assert outcome.result is RetPf.RETRY and outcome.async_pf == "work"
    assert outcome.not_resident == NotResident(hva + 0x3000, env.host_mm.page_in_latency)
    assert env.walk(0x3000) is None
    assert env.mmu.page_fault(0x3000, READ, prefetch=True, async_pf=hook).result is RetPf.FIXED
    assert len(calls) == 1
    assert env.mmu.stats["pf_taken"] == 2  # the prefetch fault is not counted


def test_write_fault_on_write_protected_page_is_fast() -> None:
    """mmu.c fast_page_fault(): a write to a present, MMU-writable but write-protected SPTE is
    fixed by setting W only (FIXED, pf_fast), with no faultin."""
    env = MmuEnv.create(huge_pages=False)
    env.add_slot(0, 0, 2 * MIB)
    env.mmu.page_fault(0x9000, WRITE)
    env.mmu._on_reprotect(env.memslots.get(0), 9, 1)  # type: ignore[arg-type]
    t = env.walk(0x9000)
    assert t is not None and not t.writable
    outcome = env.mmu.page_fault(0x9000, WRITE_PROTECTED)
    assert outcome.result is RetPf.FIXED
    assert counters(env, "pf_fast", "pf_fixed") == (1, 2)
    t = env.walk(0x9000)
    assert t is not None and t.writable


def test_reserved_fault_without_marker_retries() -> None:
    """handle_mmio_page_fault(): an EPT misconfiguration whose SPTE was zapped meanwhile ->
    RET_PF_RETRY (the processor faults again)."""
    env = MmuEnv.create()
    assert env.mmu.page_fault(0x1000, PFERR_RSVD_MASK).result is RetPf.RETRY


def test_zap_all_and_zap_range() -> None:
    """mmu.c kvm_zap_gfn_range() / kvm_mmu_zap_all(): a huge page overlapping the range goes
    whole; zap_all frees every table but the root."""
    env = MmuEnv.create()
    env.add_slot(0, 0, 8 * MIB)
    env.add_slot(1, 64 * MIB, MIB)
    env.mmu.page_fault(0x1000, WRITE)
    env.mmu.page_fault(2 * MIB, WRITE)
    env.mmu.page_fault(64 * MIB, WRITE)
    env.mmu.zap_gfn_range(0x1FF, 0x200)  # last 4K of the first 2M page
    assert env.walk(0) is None and env.walk(2 * MIB) is not None
    env.mmu.zap_all()
    assert env.walk(2 * MIB) is None and env.walk(64 * MIB) is None
    assert counters(env, "pages_4k", "pages_2m", "tdp_mmu_pages") == (0, 0, 0)
    assert list(env.mmu.leaves()) == []


def test_eptp_points_at_the_root_with_wb_walk4_and_ad() -> None:
    """vmx.c construct_eptp(): WB (6), page-walk length 4 (bits 5:3 = 3), A/D enable (bit 6)."""
    env = MmuEnv.create()
    assert env.mmu.eptp == env.mmu.root | 6 | 3 << 3 | 1 << 6
    assert ept_violation_error_code(0x181) == PFERR_USER_MASK | (1 << 32)


def test_slot_over_unmapped_host_memory_is_an_error_not_an_exception() -> None:
    """mmu.c kvm_handle_error_pfn(): a memslot whose host range was munmap()ed gives
    KVM_PFN_ERR_FAULT -> -EFAULT out of KVM_RUN; here RET_PF_INVALID with the HostMemoryError
    as the cause, and nothing mapped. The munmap itself zapped the page (MMU notifier)."""
    env = MmuEnv.create(huge_pages=False)
    hva = env.add_slot(0, 0, MIB, huge=False)
    env.mmu.page_fault(0x3000, WRITE)
    env.host_mm.munmap(hva, MIB)
    assert env.walk(0x3000) is None
    outcome = env.mmu.page_fault(0x3000, READ)
    assert outcome.result is RetPf.INVALID and outcome.error is not None
    assert env.walk(0x3000) is None
