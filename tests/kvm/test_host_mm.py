"""The VMM's address space (pyvmx.kvm.host_mm): demand paging, transparent huge pages, swap for
asynchronous page faults, MMU-notifier invalidations, and the VMM's own reads and writes."""

from __future__ import annotations

import pytest

from pyvmx.kvm.host_mm import HPAGE_PAGES, HPAGE_SIZE, HVA_BASE, HostMemoryError, HostMm, NotResident
from pyvmx.vmx.memory import PAGE_SHIFT, PAGE_SIZE, PageAllocator, PhysicalMemory

MIB = 1 << 20
LATENCY = 1000


def new_mm(pool_start: int = 2 * MIB, pool_end: int = 16 * MIB) -> tuple[HostMm, PageAllocator, list[tuple[int, int]]]:
    """A HostMm over pages [pool_start, pool_end), and the list its invalidations land in."""
    allocator = PageAllocator(PhysicalMemory(16 * MIB), pool_start, pool_end)
    mm = HostMm(allocator, page_in_latency=LATENCY)
    invalidations: list[tuple[int, int]] = []
    mm.add_invalidate_listener(lambda start, end: invalidations.append((start, end)))
    return mm, allocator, invalidations


def pfn(mm: HostMm, hva: int) -> int:
    result = mm.get_user_page(hva, write=True)
    assert isinstance(result, int), result
    return result


# --- mappings and demand paging --------------------------------------------------------------------
def test_mmap_reserves_2mib_aligned_ranges_with_no_pages() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(3 * PAGE_SIZE, name="ram")
    b = mm.mmap(5 * MIB)
    assert a == HVA_BASE
    assert b % HPAGE_SIZE == 0 and b >= a + HPAGE_SIZE
    assert [(v.start, v.end, v.name) for v in mm.vmas] == [(a, a + 3 * PAGE_SIZE, "ram"), (b, b + 5 * MIB, "")]
    assert mm.resident_pages == 0
    assert not mm.is_resident(a)


def test_mmap_rounds_size_up_to_whole_pages() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(1)
    assert mm.vmas[0].end == a + PAGE_SIZE


def test_first_touch_allocates_one_zeroed_page() -> None:
    mm, allocator, _ = new_mm()
    a = mm.mmap(4 * PAGE_SIZE, huge=False)
    frame = pfn(mm, a + 0x123)
    assert mm.resident_pages == 1 and mm.is_resident(a) and not mm.is_resident(a + PAGE_SIZE)
    assert allocator.memory.read(frame << PAGE_SHIFT, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert pfn(mm, a + 0xFFF) == frame  # the same page the second time
    assert mm.mapping_level(a) == PAGE_SIZE


def test_thp_populates_the_whole_block_with_one_aligned_contiguous_run() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(4 * MIB)
    frame = pfn(mm, a + HPAGE_SIZE + 0x5123)
    block = a + HPAGE_SIZE
    first = pfn(mm, block)
    assert first % HPAGE_PAGES == 0
    assert frame == first + 5
    assert [pfn(mm, block + i * PAGE_SIZE) for i in range(HPAGE_PAGES)] == list(range(first, first + HPAGE_PAGES))
    assert mm.resident_pages == HPAGE_PAGES
    assert mm.mapping_level(block + 0x1FFFFF) == HPAGE_SIZE
    assert mm.mapping_level(a) == PAGE_SIZE  # the other block is still empty


def test_no_thp_when_the_mapping_does_not_allow_it() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(2 * MIB, huge=False)
    pfn(mm, a)
    assert mm.resident_pages == 1 and mm.mapping_level(a) == PAGE_SIZE


def test_no_thp_when_the_block_is_not_wholly_inside_the_mapping() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(3 * MIB)  # the second block is only half mapped
    pfn(mm, a + 2 * MIB)
    assert mm.resident_pages == 1
    assert mm.mapping_level(a + 2 * MIB) == PAGE_SIZE


def test_no_thp_without_a_free_contiguous_run_falls_back_to_4k() -> None:
    mm, _, _ = new_mm(2 * MIB, 3 * MIB)  # 1 MiB of pages: no 2 MiB run can exist
    a = mm.mmap(2 * MIB)
    pfn(mm, a)
    assert mm.resident_pages == 1 and mm.mapping_level(a) == PAGE_SIZE


def test_no_thp_once_part_of_the_block_is_populated() -> None:
    mm, allocator, _ = new_mm(2 * MIB, 6 * MIB)
    held = [allocator.alloc_page() for _ in range(600)]  # no aligned 2 MiB run left
    a = mm.mmap(2 * MIB)
    pfn(mm, a)  # falls back to a 4 KiB page
    for page in held:
        allocator.free_page(page)  # now [2 MiB, 4 MiB) is free again
    pfn(mm, a + PAGE_SIZE)
    assert mm.resident_pages == 2 and mm.mapping_level(a + PAGE_SIZE) == PAGE_SIZE
    b = mm.mmap(2 * MIB)
    assert pfn(mm, b) == (2 * MIB) >> PAGE_SHIFT  # an empty block does get the freed run
    assert mm.mapping_level(b) == HPAGE_SIZE


# --- the VMM's own accesses ------------------------------------------------------------------------
def test_vmm_write_then_read_round_trips_across_pages() -> None:
    mm, allocator, _ = new_mm()
    a = mm.mmap(8 * PAGE_SIZE, huge=False)
    data = bytes(range(256)) * 40  # 10240 bytes, three pages
    mm.write(a + 0xF00, data)
    assert mm.read(a + 0xF00, len(data)) == data
    second = pfn(mm, a + PAGE_SIZE) << PAGE_SHIFT
    assert allocator.memory.read(second, 16) == data[0x100 : 0x110]


def test_vmm_read_of_untouched_memory_is_zero_and_populates() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(2 * PAGE_SIZE, huge=False)
    assert mm.read(a, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
    assert mm.resident_pages == 2


@pytest.mark.parametrize("what", ["read", "write", "fault", "level"])
@pytest.mark.parametrize("where", ["below", "gap", "straddle"])
def test_access_outside_every_mapping_raises_with_the_address(what: str, where: str) -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(PAGE_SIZE, huge=False)
    bad = {"below": HVA_BASE - PAGE_SIZE, "gap": a + PAGE_SIZE, "straddle": a + PAGE_SIZE - 4}[where]
    first_bad = a + PAGE_SIZE if where == "straddle" else bad
    if what in ("fault", "level") and where == "straddle":
        bad = first_bad
    with pytest.raises(HostMemoryError) as info:
        if what == "read":
            mm.read(bad, 8)
        elif what == "write":
            mm.write(bad, bytes(8))
        elif what == "fault":
            mm.get_user_page(bad, write=False)
        else:
            mm.mapping_level(bad)
    assert info.value.address == first_bad
    assert isinstance(info.value, ValueError)
    assert mm.resident_pages == 0  # a refused access touches nothing


# --- munmap ----------------------------------------------------------------------------------------
def test_munmap_frees_4k_pages_for_reuse_and_notifies() -> None:
    mm, allocator, invalidations = new_mm()
    a = mm.mmap(2 * PAGE_SIZE, huge=False)
    frames = {pfn(mm, a), pfn(mm, a + PAGE_SIZE)}
    mm.munmap(a, 2 * PAGE_SIZE)
    assert invalidations == [(a, a + 2 * PAGE_SIZE)]
    assert mm.resident_pages == 0 and mm.vmas == ()
    assert {allocator.alloc_page() >> PAGE_SHIFT for _ in range(2)} == frames
    with pytest.raises(HostMemoryError):
        mm.read(a, 1)


def test_munmap_of_a_whole_huge_page_returns_the_run() -> None:
    mm, allocator, _ = new_mm()
    a = mm.mmap(2 * MIB)
    first = pfn(mm, a)
    mm.munmap(a, 2 * MIB)
    assert allocator.alloc_contiguous(HPAGE_PAGES, HPAGE_PAGES) == first << PAGE_SHIFT


def test_munmap_of_untouched_memory_notifies_nobody() -> None:
    mm, _, invalidations = new_mm()
    a = mm.mmap(2 * MIB)
    mm.munmap(a, 2 * MIB)
    assert invalidations == []


def test_partial_munmap_splits_the_mapping_and_the_huge_page() -> None:
    mm, _, invalidations = new_mm()
    a = mm.mmap(2 * MIB, name="ram")
    first = pfn(mm, a)
    hole = a + MIB
    mm.munmap(hole, PAGE_SIZE)
    assert invalidations == [(a, a + HPAGE_SIZE), (hole, hole + PAGE_SIZE)]  # split, then unmap
    assert [(v.start, v.end) for v in mm.vmas] == [(a, hole), (hole + PAGE_SIZE, a + 2 * MIB)]
    assert mm.resident_pages == HPAGE_PAGES - 1
    assert pfn(mm, a + 0x3000) == first + 3  # the rest keep their frames, now as 4 KiB pages
    assert mm.mapping_level(a) == PAGE_SIZE
    with pytest.raises(HostMemoryError) as info:
        mm.get_user_page(hole, write=False)
    assert info.value.address == hole


# --- swap and page-in ------------------------------------------------------------------------------
def test_swap_out_then_asynchronous_page_in_restores_contents() -> None:
    mm, _, invalidations = new_mm()
    a = mm.mmap(4 * PAGE_SIZE, huge=False)
    mm.write(a + PAGE_SIZE, b"guest data")
    mm.swap_out(a + PAGE_SIZE, PAGE_SIZE)
    assert invalidations == [(a + PAGE_SIZE, a + 2 * PAGE_SIZE)]
    assert not mm.is_resident(a + PAGE_SIZE) and mm.resident_pages == 0

    assert mm.get_user_page(a + PAGE_SIZE + 0x10, write=False) == NotResident(a + PAGE_SIZE, LATENCY)
    assert not mm.is_resident(a + PAGE_SIZE)  # reporting it starts nothing
    assert mm.complete_page_ins(10**9) == []

    done = mm.start_page_in(a + PAGE_SIZE + 0x10, now=500)
    assert done == 500 + LATENCY
    assert mm.start_page_in(a + PAGE_SIZE, now=900) == done  # already under way
    assert mm.complete_page_ins(done - 1) == []
    assert mm.complete_page_ins(done) == [a + PAGE_SIZE]
    assert mm.is_resident(a + PAGE_SIZE)
    assert isinstance(mm.get_user_page(a + PAGE_SIZE, write=False), int)
    assert mm.read(a + PAGE_SIZE, 10) == b"guest data"
    assert mm.complete_page_ins(10**9) == []


def test_page_ins_complete_in_time_order() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(4 * PAGE_SIZE, huge=False)
    mm.write(a, bytes(4 * PAGE_SIZE))
    mm.swap_out(a, 4 * PAGE_SIZE)
    mm.start_page_in(a + 3 * PAGE_SIZE, now=0)
    mm.start_page_in(a, now=10)
    mm.start_page_in(a + 2 * PAGE_SIZE, now=5000)
    assert mm.complete_page_ins(LATENCY + 10) == [a + 3 * PAGE_SIZE, a]
    assert mm.pending_page_ins() == {a + 2 * PAGE_SIZE: 5000 + LATENCY}


def test_page_in_now_is_synchronous_and_cancels_the_pending_one() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(PAGE_SIZE, huge=False)
    mm.write(a, b"\xAA" * 8)
    mm.swap_out(a, PAGE_SIZE)
    mm.start_page_in(a, now=0)
    frame = mm.page_in_now(a)
    assert mm.is_resident(a) and pfn(mm, a) == frame
    assert mm.read(a, 8) == b"\xAA" * 8
    assert mm.complete_page_ins(10**9) == []


def test_vmm_access_to_a_swapped_page_waits_for_it() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(PAGE_SIZE, huge=False)
    mm.write(a, b"kernel")
    mm.swap_out(a, PAGE_SIZE)
    assert mm.read(a, 6) == b"kernel"
    assert mm.is_resident(a)


def test_start_page_in_of_a_resident_page_is_already_done() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(PAGE_SIZE, huge=False)
    pfn(mm, a)
    assert mm.start_page_in(a, now=77) == 77
    assert mm.pending_page_ins() == {}


def test_swap_out_of_part_of_a_huge_page_splits_it_first() -> None:
    mm, _, invalidations = new_mm()
    a = mm.mmap(2 * MIB)
    first = pfn(mm, a)
    mm.swap_out(a + 0x10000, 2 * PAGE_SIZE)
    assert invalidations == [(a, a + HPAGE_SIZE), (a + 0x10000, a + 0x12000)]
    assert mm.mapping_level(a) == PAGE_SIZE
    assert mm.resident_pages == HPAGE_PAGES - 2
    assert pfn(mm, a + 0x13000) == first + 0x13
    assert isinstance(mm.get_user_page(a + 0x11000, write=False), NotResident)


def test_swap_out_of_a_whole_huge_page_comes_back_as_small_pages() -> None:
    mm, _, invalidations = new_mm()
    a = mm.mmap(2 * MIB)
    mm.write(a + 0x1FFFF8, b"lastword")
    mm.swap_out(a, 2 * MIB)
    assert invalidations == [(a, a + 2 * MIB)]  # no split needed
    assert mm.resident_pages == 0
    assert mm.read(a + 0x1FFFF8, 8) == b"lastword"
    assert mm.resident_pages == 1 and mm.mapping_level(a) == PAGE_SIZE


def test_swap_out_of_untouched_pages_does_nothing() -> None:
    mm, _, invalidations = new_mm()
    a = mm.mmap(2 * MIB)
    mm.swap_out(a, 2 * MIB)
    assert invalidations == []
    assert pfn(mm, a) % HPAGE_PAGES == 0  # still eligible for a huge page


def test_munmap_drops_swapped_pages_and_their_page_ins() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(PAGE_SIZE, huge=False)
    pfn(mm, a)
    mm.swap_out(a, PAGE_SIZE)
    mm.start_page_in(a, now=0)
    mm.munmap(a, PAGE_SIZE)
    assert mm.complete_page_ins(10**9) == []
    with pytest.raises(HostMemoryError):
        mm.start_page_in(a, now=0)


def test_swap_out_outside_every_mapping_raises() -> None:
    mm, _, _ = new_mm()
    a = mm.mmap(PAGE_SIZE, huge=False)
    with pytest.raises(HostMemoryError) as info:
        mm.swap_out(a, 2 * PAGE_SIZE)
    assert info.value.address == a + PAGE_SIZE


def test_removed_listener_is_not_called() -> None:
    mm, _, invalidations = new_mm()
    seen: list[tuple[int, int]] = []

    def listener(start: int, end: int) -> None:
        seen.append((start, end))

    mm.add_invalidate_listener(listener)
    mm.remove_invalidate_listener(listener)
    a = mm.mmap(PAGE_SIZE, huge=False)
    pfn(mm, a)
    mm.munmap(a, PAGE_SIZE)
    assert seen == [] and invalidations == [(a, a + PAGE_SIZE)]


# --- the allocator additions -----------------------------------------------------------------------
def test_alloc_contiguous_aligns_and_keeps_skipped_pages() -> None:
    allocator = PageAllocator(PhysicalMemory(8 * MIB), PAGE_SIZE, 8 * MIB)
    run = allocator.alloc_contiguous(HPAGE_PAGES, HPAGE_PAGES)
    assert run == 2 * MIB
    assert allocator.alloc_page() == 2 * MIB - PAGE_SIZE  # a skipped page, not lost
    assert allocator.alloc_contiguous(HPAGE_PAGES * 4, HPAGE_PAGES) is None
    allocator.free_contiguous(2 * MIB, HPAGE_PAGES)
    assert allocator.alloc_contiguous(HPAGE_PAGES, HPAGE_PAGES) == 2 * MIB  # found on the free list
