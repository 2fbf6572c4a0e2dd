"""Dirty logging through the MMU (no CPU engine): write protection when KVM_MEM_LOG_DIRTY_PAGES
is turned on, the fast path marking pages dirty, KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG
write-protecting again, huge pages split while logging and back afterwards."""

from __future__ import annotations

from pyvmx.kvm.memslots import KVM_MEM_LOG_DIRTY_PAGES, Memslots
from pyvmx.kvm.mmu import RetPf
from pyvmx.kvm.mmu.page_fault import PFERR_PRESENT_MASK, PFERR_USER_MASK, PFERR_WRITE_MASK
from pyvmx.kvm.mmu.spte import PG_LEVEL_2M, PG_LEVEL_4K

from tests.kvm.mmu.harness import KIB4, MIB, MIB2, MmuEnv

READ = PFERR_USER_MASK
WRITE = PFERR_WRITE_MASK
WRITE_PROTECTED = PFERR_WRITE_MASK | PFERR_PRESENT_MASK


def bits(bitmap: bytes) -> set[int]:
    return {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}


def guest_write(env: MmuEnv, gpa: int) -> RetPf:
    """What the processor does on a guest write: fault until the EPT allows it."""
    t = env.walk(gpa)
    if t is not None and t.writable:
        return RetPf.SPURIOUS  # no exit at all
    code = WRITE_PROTECTED if t is not None else WRITE
    return env.mmu.page_fault(gpa, code).result


def test_enabling_logging_splits_and_write_protects() -> None:
    """x86.c kvm_mmu_slot_apply_flags(): with logging turned on, huge pages are split
    (eager_page_split, kvm_mmu_slot_try_split_huge_pages()) and every SPTE of the slot is
    write-protected (kvm_mmu_slot_remove_write_access()), then the TLBs are flushed."""
    env = MmuEnv.create()
    hva = env.add_slot(0, 0, 4 * MIB)
    env.mmu.page_fault(0x1000, WRITE)
    env.mmu.page_fault(MIB2 + 0x1000, WRITE)
    assert env.mmu.stats["pages_2m"] == 2
    env.memslots.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MIB, hva)
    assert env.mmu.stats["pages_2m"] == 0 and env.mmu.stats["pages_4k"] == 1024
    for gpa in (0, 0x1000, MIB2 - KIB4, MIB2, 4 * MIB - KIB4):
        t = env.walk(gpa)
        assert t is not None and t.page_size == KIB4 and not t.writable and t.hpa == env.hpa_of(gpa)
    assert env.flushes == [1]
    assert bits(env.memslots.get_dirty_log(0)) == set()


def test_writes_are_logged_exactly_through_the_fast_path() -> None:
    """mmu.c fast_page_fault() -> fast_pf_fix_direct_spte(): a write to a write-protected page
    makes it writable and mark_page_dirty_in_slot()s it (pf_fast); a first-touch write maps it
    writable and dirty (make_spte()); a first-touch read maps it read-only, not dirty.
    KVM_GET_DIRTY_LOG returns exactly the written pages, clears the bitmap and write-protects
    them again (kvm_arch_mmu_enable_log_dirty_pt_masked()), with flushes."""
    env = MmuEnv.create()
    env.add_slot(0, 0, 4 * MIB, flags=KVM_MEM_LOG_DIRTY_PAGES)
    for page in range(16):
        assert env.mmu.page_fault(page * KIB4, READ).result is RetPf.FIXED  # mapped read-only
    assert env.mmu.page_fault(20 * KIB4, READ).fault.goal_level == PG_LEVEL_4K
    written = {1, 3, 5, 15, 600, 1023}
    for page in sorted(written):
        guest_write(env, page * KIB4)
        guest_write(env, page * KIB4 + 8)  # a second write to the same page: no fault
    stats = env.mmu.stats
    assert stats["pf_fast"] == 4  # pages 1, 3, 5, 15 were present and write-protected
    flushes = len(env.flushes)
    assert bits(env.memslots.get_dirty_log(0)) == written
    # One flush per 64-page word with bits set (pages 0-63, 576-639, 960-1023): the memslots
    # report reprotects word by word; Linux flushes once at the end of the ioctl.
    assert len(env.flushes) == flushes + 3
    for page in written:
        t = env.walk(page * KIB4)
        assert t is not None and not t.writable
    assert bits(env.memslots.get_dirty_log(0)) == set()
    guest_write(env, 3 * KIB4)
    assert bits(env.memslots.get_dirty_log(0)) == {3}


def test_manual_protect_and_clear_dirty_log() -> None:
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET only copies; KVM_CLEAR_DIRTY_LOG clears chosen
    bits and write-protects exactly those pages again (kvm_clear_dirty_log_protect())."""
    memslots = Memslots(manual_dirty_log_protect=True)
    env = MmuEnv.create(memslots=memslots)
    env.add_slot(0, 0, MIB, flags=KVM_MEM_LOG_DIRTY_PAGES)
    for page in (2, 4, 70):
        guest_write(env, page * KIB4)
    assert bits(memslots.get_dirty_log(0)) == {2, 4, 70}
    assert bits(memslots.get_dirty_log(0)) == {2, 4, 70}  # not cleared
    memslots.clear_dirty_log(0, 0, 256, (1 << 4).to_bytes(32, "little"))
    assert bits(memslots.get_dirty_log(0)) == {2, 70}
    assert not env.walk(4 * KIB4).writable  # type: ignore[union-attr]
    assert env.walk(2 * KIB4).writable  # type: ignore[union-attr]


def test_initially_set_skips_write_protection_but_not_splitting_on_clear() -> None:
    """KVM_DIRTY_LOG_INITIALLY_SET: turning logging on write-protects nothing (every page is
    taken as dirty); clearing bits later write-protects -- splitting a huge page first."""
    memslots = Memslots(manual_dirty_log_protect=True, dirty_log_initially_set=True)
    env = MmuEnv.create(memslots=memslots)
    hva = env.add_slot(0, 0, 4 * MIB)
    env.mmu.page_fault(0x1000, WRITE)
    memslots.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MIB, hva)
    assert env.mmu.stats["pages_2m"] == 1
    assert env.walk(0x1000).writable  # type: ignore[union-attr]
    memslots.clear_dirty_log(0, 0, 1024, (0b10).to_bytes(128, "little"))
    assert env.mmu.stats["pages_2m"] == 0
    assert not env.walk(0x1000).writable  # type: ignore[union-attr]
    assert env.walk(0x2000).writable  # type: ignore[union-attr]
    guest_write(env, 0x1000)
    assert 1 in bits(memslots.get_dirty_log(0))


def test_disabling_logging_brings_huge_pages_back() -> None:
    """x86.c kvm_mmu_slot_apply_flags() -> kvm_mmu_zap_collapsible_sptes(): when logging stops,
    4K mappings that could be huge are zapped, and the next fault maps 2M again."""
    env = MmuEnv.create()
    hva = env.add_slot(0, 0, 4 * MIB, flags=KVM_MEM_LOG_DIRTY_PAGES)
    env.host_mm.write(hva, b"x")  # populate the host THP
    for page in (0, 1, 2, 600):
        env.mmu.page_fault(page * KIB4, WRITE)
    assert env.mmu.stats["pages_4k"] == 4
    env.memslots.set_user_memory_region(0, 0, 0, 4 * MIB, hva)
    assert env.mmu.stats["pages_4k"] == 0 and env.walk(0) is None
    outcome = env.mmu.page_fault(0x1000, WRITE)
    assert outcome.fault.goal_level == PG_LEVEL_2M and env.mmu.stats["pages_2m"] == 1
